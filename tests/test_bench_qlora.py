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


def test_bench_run_base_times_every_qlora_provider_on_one_bitsandbytes_base(tmp_path):
    """``bench.run --base nf4,int8``: each base's records carry it, every provider is
    timed on the same quantised W, lorakern's forward matches the LoRA over the weight
    bitsandbytes dequantises, and the quantised W is not counted as saved."""
    import json

    from bench import run

    code = run.main(["--device", "cpu", "--base", "bf16,nf4,int8", "--shapes", "128x64",
                     "--tokens", "16", "--ranks", "5", "--dtypes", "bf16", "--dropout", "0",
                     "--modes", "fwd+bwd", "--no-e2e", "--no-embedding", "--warmup-ms", "1",
                     "--rep-ms", "2", "--out", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("*.json")
    records = json.loads(path.read_text())["layer"]
    by = {(r["base"], r["provider"]): r for r in records}
    assert set(by) == {("bf16", p) for p in run.CPU_PROVIDERS if p != "merged"} | {
        (base, p) for base in ("nf4", "int8") for p in run.CPU_QLORA_PROVIDERS}
    for (base, provider), record in by.items():
        assert record["status"] == "ok", record
        assert record["case"].endswith("" if base == "bf16" else f" base={base}")
        if provider != "linear":
            assert record["max_rel_err"] < 2e-2, record  # bf16 rounding, not quantisation
    for base in ("nf4", "int8"):
        lorakern = by[base, "lorakern"]
        assert set(lorakern["speedup_vs"]) == {"linear", "peft-qlora", "dequant-addmm"}
        # x is excluded, W is quantised: nothing of out x in is saved
        assert lorakern["saved_bytes"] < 64 * 128 * 2


def test_a_patched_qlora_decoder_saves_less_than_peft_and_no_copy_of_w():
    """A training step of a 4-block Llama in NF4 (fp32 adapters on every linear, p =
    0.1): the patched model saves fewer bytes than PEFT's, no 16-bit copy of any base
    W, and every saved dimension is one of the model's sizes (so the rescaled
    Llama-3-8B-shaped prediction counts every tensor)."""
    record = qlora_memory.measure_decoder(dropout_p=0.1)
    print(record)
    assert record["saved_w_copies_peft"] == record["saved_w_copies_lorakern"] == 0
    assert 0 < record["saved_bytes_lorakern"] < record["saved_bytes_peft"]
    assert record["unmapped_dims_peft"] == record["unmapped_dims_lorakern"] == []
    assert 0 < record["predicted_saved_bytes_lorakern"] < record["predicted_saved_bytes_peft"]
