"""The providers of ``python -m bench.run --base nf4|fp4|int8``: LoRA over a
bitsandbytes base made from the case's W (4-bit: ``Linear4bit`` with double
quantisation, blocksize 64, the case's dtype as compute dtype; int8:
``Linear8bitLt`` with ``threshold=0``, PEFT's default), one base per input set,
shared by the providers:

- ``linear``: a 16-bit nn.Linear over the unquantised W (the floor);
- ``peft-qlora``: PEFT's ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` as ``get_peft_model``
  builds it on a model loaded in 4 or 8 bits (fp32 adapters by default);
- ``dequant-addmm``: bench/composition.py's ``DequantAddmmLoRA`` (bitsandbytes'
  dequantisation into a buffer per direction, the LoRA term by addmm);
- ``lorakern`` (and ``lorakern:fused``, ``lorakern:cublas``): ``quantized_lora_linear``.

Each checks its forward (dropout 0) against the fp32 LoRA over the weight
bitsandbytes dequantises, so the quantisation error is not counted.
"""
import torch
from torch import nn

from lorakern import reference
from lorakern.functional.quantized_weight import bnb_base_weight, quantized_lora_linear

from .cases import ALPHA_OVER_R
from .composition import dequant_addmm_lora
from .providers import PROVIDERS as LORA_PROVIDERS, Layer, Provider, _bias, _Holder

BASES = ("nf4", "fp4", "int8")


def quantized_base(t, base):
    """The bitsandbytes layer holding ``t.weight`` quantised as ``base`` and the
    trained bias ``t.bias``: made once per input set and base."""
    made = t.__dict__.setdefault("_quantized_bases", {})
    if base not in made:
        import bitsandbytes as bnb

        out_features, in_features = t.weight.shape
        if base == "int8":
            module = bnb.nn.Linear8bitLt(in_features, out_features, bias=False,
                                         has_fp16_weights=False, threshold=0.0)
            weight = t.weight.detach().to("cpu", torch.float16)
        else:
            module = bnb.nn.Linear4bit(in_features, out_features, bias=False,
                                       compute_dtype=t.weight.dtype, quant_type=base,
                                       compress_statistics=True)
            weight = t.weight.detach().to("cpu")
        module.load_state_dict({"weight": weight}, strict=False)
        module = module.to(t.weight.device)  # bitsandbytes quantises on the move
        if t.bias is not None:
            module.bias = t.bias
        made[base] = module
    return made[base]


def dequantized(module):
    """W as bitsandbytes dequantises it, in the compute dtype."""
    import bitsandbytes.functional as F

    weight = module.weight
    if weight.dtype == torch.int8:
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return F.int8_vectorwise_dequant(weight.data, scb)
    return F.dequantize_4bit(weight.data, weight.quant_state).to(module.compute_dtype)


def _frozen_state(module):
    """The quantised base's tensors: alive anyway, not saved-tensor bytes."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    tensors = [weight.data]
    if state is not None:
        tensors += [state.absmax, state.code]
        if state.state2 is not None:
            tensors += [state.state2.absmax, state.state2.code]
    elif getattr(weight, "SCB", None) is not None:
        tensors.append(weight.SCB)
    return tensors


def _reference(t, case, module):
    """The fp32 LoRA over the dequantised W: what the forwards are checked against."""
    def want():
        f32 = [v.detach().float() for v in (t.x, dequantized(module), t.lora_A, t.lora_B)]
        bias = None if t.bias is None else t.bias.detach().float()
        return reference.lora_linear(*f32, scale=case.scale, bias=bias)
    return want


def _builders(base):
    def build_peft_qlora(t, case):
        import peft

        module = quantized_base(t, base)
        holder = _Holder(module)
        # what from_pretrained(quantization_config=...) marks a model with: PEFT then
        # builds its bitsandbytes LoRA layers
        holder.is_loaded_in_8bit = base == "int8"
        holder.is_loaded_in_4bit = base != "int8"
        config = peft.LoraConfig(r=case.rank, lora_alpha=ALPHA_OVER_R * case.rank,
                                 lora_dropout=case.dropout, target_modules=["proj"],
                                 bias="none" if t.bias is None else "all")
        model = peft.get_peft_model(holder, config,
                                    autocast_adapter_dtype=case.adapter_dtype == "fp32")
        layer = model.base_model.model.proj
        layer.lora_A["default"].weight = nn.Parameter(t.lora_A)
        layer.lora_B["default"].weight = nn.Parameter(t.lora_B)
        return Layer(layer.train(), [layer.lora_A["default"].weight,
                                     layer.lora_B["default"].weight] + _bias(t),
                     _reference(t, case, module), _frozen_state(module))

    def build_dequant_addmm(t, case):
        module = quantized_base(t, base)
        return Layer(lambda x: dequant_addmm_lora(x, lambda: dequantized(module).to(x.dtype),
                                                  t.lora_A, t.lora_B, case.scale, t.bias,
                                                  case.dropout),
                     [t.lora_A, t.lora_B] + _bias(t), _reference(t, case, module),
                     _frozen_state(module))

    def build_lorakern(t, case):
        module = quantized_base(t, base)
        weight = bnb_base_weight(module, "proj", t.x.dtype)
        return Layer(lambda x: quantized_lora_linear(x, weight, t.lora_A, t.lora_B, case.scale,
                                                     t.bias, case.dropout),
                     [t.lora_A, t.lora_B] + _bias(t), _reference(t, case, module),
                     _frozen_state(module))

    return build_peft_qlora, build_dequant_addmm, build_lorakern


def providers(base):
    """{name: Provider} for LoRA over a ``base`` (nf4, fp4 or int8) bitsandbytes base."""
    if base not in BASES:
        raise ValueError(f"base {base!r}: expected one of {', '.join(BASES)}")
    peft_qlora, dequant_addmm, lorakern_qlora = _builders(base)
    kind = "8-bit" if base == "int8" else f"4-bit {base}, double-quant"
    return {p.name: p for p in [
        LORA_PROVIDERS["linear"],
        Provider("peft-qlora", f"PEFT's bitsandbytes LoRA layer over a {kind} base, eager",
                 peft_qlora, requires=("peft", "bitsandbytes")),
        Provider("dequant-addmm", f"bitsandbytes' dequantisation of the {kind} base per "
                 "direction, then the cuBLAS composition", dequant_addmm,
                 requires=("bitsandbytes",)),
        Provider("lorakern", f"lorakern's quantized_lora_linear over the {kind} base, "
                 "strategy chosen by its tuner", lorakern_qlora, strategy="auto",
                 requires=("bitsandbytes",)),
        Provider("lorakern:fused", "lorakern QLoRA, LORAKERN_STRATEGY=fused: W's tiles "
                 "dequantised in the GEMM", lorakern_qlora, strategy="fused",
                 requires=("bitsandbytes",)),
        Provider("lorakern:cublas", "lorakern QLoRA, LORAKERN_STRATEGY=cublas: W dequantised "
                 "into a buffer per direction", lorakern_qlora, strategy="cublas",
                 requires=("bitsandbytes",)),
    ]}


PROVIDER_NAMES = tuple(providers("nf4"))
