"""Memory of a QLoRA training step, measured on the CPU: what autograd saves for the
backward (bytes beyond the parameters, each storage once) for one LoRA linear over an
NF4 double-quant base, per provider:

- ``peft``: PEFT's ``lora.bnb.Linear4bit`` over bitsandbytes' ``Linear4bit``, fp32
  adapters (QLoRA as built by default);
- ``dequant-addmm``: bench/composition.py's ``DequantAddmmLoRA`` (W dequantised by
  bitsandbytes in the forward and again for dX, the LoRA term by addmm);
- ``lorakern``: ``quantized_lora_linear`` (the Triton dequantisation, in the
  interpreter here, and the cublas strategy).

Saved-tensor bytes depend on shapes and dtypes only, not on the device. The
transient buffer of the dequantised W (out x in in the compute dtype, alive during
one GEMM) is the same for all three and is reported beside them.

    python -m bench.qlora_memory --m 64 --k 1024 --n 1024 --r 16 --p 0.1
"""
import argparse
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def saved_bytes(step, parameters):
    """Bytes of the distinct non-parameter storages autograd saves during ``step()``."""
    own = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    out.float().sum().backward()
    return sum(storages.values())


def build(m, k, n, r, p, seed=0):
    import bitsandbytes as bnb
    import peft

    torch.manual_seed(seed)
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16,
                             quant_type="nf4", compress_statistics=True)
    base.load_state_dict({"weight": torch.randn(n, k).bfloat16() * 0.02}, strict=False)
    base = base.to("cpu")
    holder = torch.nn.ModuleDict({"proj": base})
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"])
    layer = peft.get_peft_model(holder, config).base_model.model["proj"]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    x = torch.randn(m, k).bfloat16().requires_grad_()
    return layer.train(), x


def measure(m, k, n, r, p):
    import bitsandbytes.functional as bnb_functional
    from bench.composition import dequant_addmm_lora
    from lorakern.functional.quantized_weight import bnb_base_weight, quantized_lora_linear

    layer, x = build(m, k, n, r, p)
    base = layer.get_base_layer()
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    params = list(layer.parameters())
    scale = layer.scaling["default"]

    def dequantize():
        return bnb_functional.dequantize_4bit(base.weight.data,
                                              base.weight.quant_state).to(x.dtype)

    providers = {
        "peft": lambda: layer(x),
        "dequant-addmm": lambda: dequant_addmm_lora(x, dequantize, lora_A, lora_B, scale,
                                                    None, p),
        "lorakern": lambda: quantized_lora_linear(x, bnb_base_weight(base, "layer", x.dtype),
                                                  lora_A, lora_B, scale, None, p),
    }
    record = {"base": "nf4", "m": m, "k": k, "n": n, "r": r, "dropout_p": p,
              "transient_w_bytes": n * k * 2, "x_bytes": m * k * 2}
    for name, step in providers.items():
        record[f"saved_bytes_{name}"] = saved_bytes(step, params)
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default in (("--m", 64), ("--k", 1024), ("--n", 1024), ("--r", 16)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--p", type=float, default=0.1)
    args = parser.parse_args()
    print(json.dumps(measure(args.m, args.k, args.n, args.r, args.p)))


if __name__ == "__main__":
    main()
