"""bench/qlora_memory.py: what a QLoRA training step saves for the backward, on the CPU.

The fused path must save no more than PEFT QLoRA and never the dequantised W (an
out x in tensor in the compute dtype) for the backward.
"""
import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from bench import qlora_memory  # noqa: E402


def test_lorakern_saves_no_more_than_peft_qlora():
    record = qlora_memory.measure(m=24, k=96, n=80, r=6, p=0.1)
    print(record)
    assert record["base"] == "nf4"
    assert 0 < record["saved_bytes_lorakern"] <= record["saved_bytes_peft"]


def test_lorakern_saves_no_dequantised_weight():
    from lorakern.functional.quantized_weight import bnb_base_weight, quantized_lora_linear

    m, k, n, r = 24, 96, 80, 6
    layer, x = qlora_memory.build(m, k, n, r, 0.1)
    base = layer.get_base_layer()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = quantized_lora_linear(x, bnb_base_weight(base, "layer", x.dtype),
                                    layer.lora_A["default"].weight,
                                    layer.lora_B["default"].weight,
                                    layer.scaling["default"], None, 0.1)
    out.float().sum().backward()
    assert saved, "nothing saved for the backward"
    w_shaped = [s for s in saved if s[0] in ((n, k), (k, n)) and s[1] == x.dtype]
    assert not w_shaped, f"a dequantised W was saved: {w_shaped}"
