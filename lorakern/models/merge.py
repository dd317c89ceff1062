"""``merge_lora`` / ``unmerge_lora``: every LoRA layer of a model at once, all or none.

Each layer merges as ``LoRALayer.merge`` does (``s * B @ A`` added into the
weight in float32, chunked); here every layer is checked (state, tied weights,
finiteness of the result) before any weight is written.
"""
from ..layers.adapter import LoRALayer


def _lora_layers(model):
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no LoRA layers "
                         f"(LoRALinear, LoRAEmbedding); call inject_lora first")
    return layers


def _merge_all(model, sign):
    layers = _lora_layers(model)
    wrong = [name or "<root>" for name, layer in layers if layer.merged == (sign > 0)]
    if wrong:
        state = "already merged" if sign > 0 else "not merged"
        raise RuntimeError(f"{len(wrong)} LoRA layers are {state}: {wrong}; "
                           f"nothing was changed")
    _check_untied(model, layers)
    # every layer is checked before any weight is written
    for _, layer in layers:
        layer._check_delta(sign, layer._delta_scale(sign))
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
