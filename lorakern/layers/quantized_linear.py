"""``QuantizedLoRALinear``: a LoRA adapter on a bitsandbytes 4-bit or 8-bit linear (QLoRA).

    y = x W^T + b + s * (drop(x) A^T) B^T,    W = the base's dequantised weight

The bitsandbytes module stays as ``base_layer`` (its own parameters, quant state
and state-dict entries, frozen); ``lora_A`` (r, in) and ``lora_B`` (out, r) are
the trainable adapters, fp32 by default as PEFT builds QLoRA. The forward is
``quantized_lora_linear`` (``lorakern/functional/quantized_weight.py``: the
compute dtype, what is saved, the 8-bit product).

Merging is refused by name: folding the adapter into a 4-bit or 8-bit weight
means dequantising, adding s B A and quantising again, which moves every
weight of the layer by up to half a quantisation step (for NF4, up to about a
tenth of its block's absmax), a change that is not the adapter's and that
unmerging cannot undo. Merge into a 16-bit copy of the base instead (load the
base unquantised, ``load_adapter``, ``merge_lora``).
"""
import math

import torch
from torch import nn

from ..functional.quantized_weight import bnb_base_weight, quantized_lora_linear
from .adapter import check_lora_args, default_adapter_dtype, plain_number
from .linear import LoRALinear

BNB_LINEAR_CLASSES = ("Linear4bit", "Linear8bitLt")


def is_bnb_linear(module):
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (or a subclass), by class name."""
    return any(cls.__name__ in BNB_LINEAR_CLASSES and cls.__module__.startswith("bitsandbytes")
               for cls in type(module).__mro__)


def check_bnb_linear(module, name):
    """ValueError naming ``name`` if the fused path cannot read this module's weight."""
    bnb_base_weight(module, name, torch.float32)


class QuantizedLoRALinear(nn.Module):
    """A LoRA adapter around a bitsandbytes linear; build it with ``from_bnb``.

    Attributes: ``base_layer``, ``lora_A``, ``lora_B``, ``in_features``,
    ``out_features``, ``r``, ``alpha``, ``use_rslora``, ``scale``, ``dropout``
    (the probability), ``name`` (for error messages), ``merged`` (always False).
    """

    @classmethod
    def from_bnb(cls, module, name, r=8, alpha=16, dropout=0.0, use_rslora=False,
                 init="kaiming", adapter_dtype=None):
        check_lora_args(r, alpha, dropout, init, adapter_dtype)
        check_bnb_linear(module, name)
        layer = cls()
        layer.base_layer = module
        layer.name = name
        layer.in_features, layer.out_features = module.in_features, module.out_features
        layer.r, layer.alpha = plain_number(r), plain_number(alpha)
        layer.use_rslora, layer.dropout, layer.init = use_rslora, float(dropout), init
        layer.scale = layer.alpha / (math.sqrt(layer.r) if use_rslora else layer.r)
        compute = bnb_base_weight(module, name, torch.float32).dtype
        dtype = adapter_dtype or default_adapter_dtype(compute)
        device = module.weight.device
        for param in module.parameters():
            param.requires_grad_(False)
        layer.lora_A = nn.Parameter(torch.empty(layer.r, layer.in_features, dtype=dtype,
                                                device=device))
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, layer.r, dtype=dtype,
                                                device=device))
        layer.reset_lora_parameters()
        layer.train(module.training)
        return layer

    fan_in_fan_out = False  # bitsandbytes' layers are (out, in), as nn.Linear
    use_dora = False  # DoRA needs a dense base weight (inject_lora refuses it here)

    @property
    def merged(self):
        return False

    @property
    def weight(self):
        """The base's (quantised, frozen) weight Parameter."""
        return self.base_layer.weight

    def reset_lora_parameters(self):
        """A as PEFT's "kaiming" default (or "gaussian"), B zeros: LoRALinear's."""
        LoRALinear.reset_lora_parameters(self)

    def merge(self):
        raise ValueError(f"{self.name}: its base is a bitsandbytes "
                         f"{type(self.base_layer).__name__}; merging would re-quantise the "
                         f"whole weight (every weight moves by up to half a quantisation "
                         f"step, not only by the adapter); merge into an unquantised copy of "
                         f"the base instead; nothing was changed")

    def forward(self, x):
        base = bnb_base_weight(self.base_layer, self.name, x.dtype)
        return quantized_lora_linear(x, base, self.lora_A, self.lora_B, self.scale,
                                     self.base_layer.bias,
                                     self.dropout if self.training else 0.0)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}")
