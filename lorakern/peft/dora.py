"""PEFT's DoRA adapters (``LoraConfig(use_dora=True)``) under ``patch_peft``.

A PEFT LoRA ``Linear`` whose adapter is DoRA (``DoraLinearVariant``) runs as one
``lorakern.dora_linear`` call with the base weight and bias, ``lora_A``,
``lora_B``, ``lora_magnitude_vector[adapter].weight`` (m) and the scaling; its
dropout applies while the layer trains (PEFT's test: the module's training flag
and a dropout that is not nn.Identity), with PEFT's second base product on the
dropped input. DoRA on an Embedding or a convolution keeps PEFT's forward
(refused by name).
"""
from torch import nn

from ..functional.dora import dora_linear


def is_dora(module, adapter):
    return bool(getattr(module, "use_dora", {}).get(adapter, False))


def dora_refusal(module, adapter, is_embedding):
    """Why the DoRA adapter ``adapter`` of ``module`` cannot run fused, or None."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if is_embedding:
        return (f"adapter '{adapter}' uses DoRA (use_dora=True) on an Embedding, which "
                f"lorakern does not fuse")
    if type(variant).__name__ != "DoraLinearVariant":
        return (f"adapter '{adapter}' uses DoRA with a {type(variant).__name__}, not PEFT's "
                f"DoraLinearVariant")
    if adapter not in module.lora_magnitude_vector:
        return f"adapter '{adapter}' uses DoRA but has no lora_magnitude_vector"
    return None


def fused_dora_forward(module, x, adapter, weight, bias):
    dropout = module.lora_dropout[adapter]
    dropped = (isinstance(dropout, nn.Dropout) and dropout.training and module.training)
    return dora_linear(x, weight, module.lora_A[adapter].weight,
                       module.lora_B[adapter].weight,
                       module.lora_magnitude_vector[adapter].weight,
                       scale=module.scaling[adapter], bias=bias,
                       dropout_p=dropout.p if dropped else 0.0)
