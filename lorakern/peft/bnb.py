"""PEFT's QLoRA layers (``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``) on the
fused path: ``patch_peft`` asks here whether such a layer can run fused and runs it.

PEFT's forward is ``base(x) + s * B(A(drop(x.to(A.dtype)))).to(result dtype)``
with ``base`` bitsandbytes' layer; the fused call is
``quantized_lora_linear(x, W, A, B, s, bias, p)`` over the base's quantised
weight (``lorakern/functional/quantized_weight.py``, which states the compute
dtype and the 8-bit product). bitsandbytes is never imported here: the layers
are recognised by their class names.
"""
from torch import nn

from ..functional.quantized_weight import bnb_base_weight, quantized_lora_linear

PEFT_BNB_CLASSES = ("Linear4bit", "Linear8bitLt")


def is_peft_bnb_layer(module):
    """Whether ``module`` is one of PEFT's LoRA layers over a bitsandbytes base."""
    cls = type(module)
    return cls.__name__ in PEFT_BNB_CLASSES and cls.__module__ == "peft.tuners.lora.bnb"


def bnb_base_reason(module, name):
    """Why the bitsandbytes base of a PEFT QLoRA layer cannot run fused, or None."""
    base = module.get_base_layer()
    if "forward" in vars(base) or base._forward_hooks or base._forward_pre_hooks:
        return ("its base layer has forward hooks or a replaced forward (e.g. accelerate "
                "offloading), which the fused call would bypass")
    try:
        bnb_base_weight(base, name, None)
    except ValueError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def fused_bnb_forward(module, name, x, adapter):
    """The layer's output for one plain LoRA ``adapter``, by one fused call."""
    base = module.get_base_layer()
    weight = bnb_base_weight(base, name, x.dtype)
    dropout = module.lora_dropout[adapter]
    dropout_p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return quantized_lora_linear(x, weight, module.lora_A[adapter].weight,
                                 module.lora_B[adapter].weight, module.scaling[adapter],
                                 base.bias, dropout_p)
