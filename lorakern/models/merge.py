"""``merge_lora`` / ``unmerge_lora``: every LoRA layer of a model at once, all or none.

Each layer merges as ``LoRALayer.merge`` does (``s * B @ A`` added into the
weight in float32, chunked); here every layer is checked (state, tied weights,
finiteness of the result) before any weight is written. ``lora_layers`` and
``check_deltas`` serve ``unload.py`` too. A model holding PEFT's own LoRA layers
(a PeftModel, patched by ``patch_peft`` or not) is pointed to PEFT's methods.
"""
import sys

from ..layers.adapter import LoRALayer
from ..layers.quantized_linear import QuantizedLoRALinear


def _peft_lora_layer_class():
    """PEFT's LoraLayer, or None when peft was never imported: a model cannot hold
    PEFT layers then, and peft stays unimported."""
    return getattr(sys.modules.get("peft.tuners.lora.layer"), "LoraLayer", None)


def lora_layers(model, peft_equivalent):
    """[(name, layer)] of every lorakern LoRA layer; ValueError when there is none,
    naming ``peft_equivalent`` (PEFT's method) when the model holds PEFT LoRA layers."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]
    if layers:
        return layers
    peft_layer = _peft_lora_layer_class()
    if peft_layer is not None and any(isinstance(m, peft_layer) for m in model.modules()):
        raise ValueError(f"the model ({type(model).__name__}) holds PEFT LoRA layers, not "
                         f"lorakern's (LoRALinear, LoRAEmbedding): PEFT owns their weights "
                         f"(patch_peft changes only their forward); use PEFT's "
                         f"{peft_equivalent} instead")
    raise ValueError(f"the model ({type(model).__name__}) has no LoRA layers "
                     f"(LoRALinear, LoRAEmbedding); call inject_lora first")


def check_deltas(model, layers, sign):
    """ValueError, before any weight is written, if merging (sign +1) or unmerging (-1)
    these layers would change another module (tied weights) or put non-finite values
    into a weight."""
    _check_untied(model, layers)
    for _, layer in layers:
        layer._check_delta(sign, layer._delta_scale(sign))


def _refuse_quantised(model):
    """ValueError naming every LoRA layer over a quantised base (``QuantizedLoRALinear``
    says why it is not merged), before anything is written."""
    quantised = [name for name, m in model.named_modules() if isinstance(m, QuantizedLoRALinear)]
    if quantised:
        layer = model.get_submodule(quantised[0])
        try:
            layer.merge()
        except ValueError as err:
            raise ValueError(f"merge_lora/unmerge_lora: {len(quantised)} LoRA layers have a "
                             f"quantised base ({', '.join(quantised[:8])}): {err}") from None


def _merge_all(model, sign):
    _refuse_quantised(model)
    layers = lora_layers(model, "merge_and_unload() (or merge_adapter())" if sign > 0
                         else "unmerge_adapter()")
    wrong = [name or "<root>" for name, layer in layers if layer.merged == (sign > 0)]
    if wrong:
        state = "already merged" if sign > 0 else "not merged"
        raise RuntimeError(f"{len(wrong)} LoRA layers are {state}: {wrong}; "
                           f"nothing was changed")
    check_deltas(model, layers, sign)
    for _, layer in layers:
        layer._apply_delta(sign, check=False)
    return model


def _check_untied(model, layers):
    """ValueError if a LoRA layer's base weight is also a parameter of another module
    (tied input and output embeddings): merging would change that module too."""
    owners = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, layer in layers:
        others = [o for o in owners.get(id(layer.weight), [])
                  if o.rsplit(".", 1)[0] != name]
        if others:
            raise ValueError(f"the base weight of LoRA layer '{name}' is tied to {others}: "
                             f"merging its adapter would change those modules too; nothing "
                             f"was changed (untie the weights first, e.g. "
                             f"tie_word_embeddings=False)")


def merge_lora(model):
    """Merge every LoRA layer (``LoRALinear``, ``LoRAEmbedding``) of the model (all or
    none). Returns the model."""
    return _merge_all(model, +1.0)


def unmerge_lora(model):
    """Unmerge every LoRA layer of the model (all or none). Returns the model."""
    return _merge_all(model, -1.0)
