"""``LoRALinear``: a drop-in for ``nn.Linear`` whose forward is the fused kernel.

    y = x W^T + b + s * (drop(x) A^T) B^T,    s = alpha / r  (alpha / sqrt(r) for rsLoRA)

``weight`` and ``bias`` are the frozen base parameters, ``lora_A`` (r, in) and
``lora_B`` (out, r) the trainable adapters, in PEFT's layouts. A layer built
from a transformers ``Conv1D`` (GPT-2) keeps that module's (in, out) weight
as it is and sets ``fan_in_fan_out``; the forward passes a transposed view.
Merging, unmerging and the state dict are ``LoRALayer``'s (``adapter.py``).
"""
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.linear import lora_linear
from .adapter import LoRALayer, check_lora_args

def is_conv1d(module):
    """transformers' GPT-2 ``Conv1D`` (weight (in, out)), by duck typing."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def conv1d_class():
    """transformers' Conv1D (GPT-2's (in, out) linear), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def base_layout(linear):
    """(in_features, out_features, fan_in_fan_out) of an nn.Linear or a transformers
    Conv1D; TypeError for anything else, or for a weight that is not floating point."""
    if isinstance(linear, LoRALinear):
        raise TypeError("from_linear got a LoRALinear: the layer already has an adapter")
    if isinstance(linear, nn.Linear):
        out_features, in_features = linear.weight.shape
        fan_in_fan_out = False
    elif is_conv1d(linear):  # Conv1D stores (in, out): y = x @ W + b
        in_features, out_features = linear.weight.shape
        fan_in_fan_out = True
    else:
        raise TypeError(f"from_linear takes an nn.Linear or a transformers Conv1D, got "
                        f"{type(linear).__name__}")
    if not linear.weight.dtype.is_floating_point:
        raise TypeError(f"{type(linear).__name__} has a {linear.weight.dtype} weight; "
                        f"LoRALinear needs a floating-point base weight (quantized layers "
                        f"are not supported)")
    return in_features, out_features, fan_in_fan_out


@torch.no_grad()
def _reset_linear(weight, bias):
    """``nn.Linear.reset_parameters`` on an (out, in) weight (a view is fine)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _layer_class(cls, use_dora):
    """``cls``, or for ``use_dora`` the DoRA layer (``dora.py`` registers it as
    ``LoRALinear.dora_class``: it builds on LoRALinear)."""
    if not use_dora or cls.use_dora:
        return cls
    return LoRALinear.dora_class


class LoRALinear(LoRALayer):
    """``nn.Linear`` plus a LoRA adapter, computed by the fused kernels.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: adapter rank (>= 1). alpha: LoRA alpha; ``scale = alpha / r``
            (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter's input, applied in training
            mode only.
        bias: whether the base layer has a bias.
        init: ``"kaiming"`` (A ~ kaiming_uniform(a=sqrt(5)), PEFT's default) or
            ``"gaussian"`` (A ~ N(0, (1/r)^2)); B starts at zero either way.
        device, dtype: of the base weight and bias.
        adapter_dtype: of ``lora_A`` and ``lora_B``; None: float32 on a
            float16/bfloat16 base, else the base dtype.
        use_dora: PEFT's DoRA: the layer is a ``DoRALinear`` (``dora.py``).

    Attributes: ``weight`` (out, in) frozen (``(in, out)`` when ``fan_in_fan_out``),
    ``bias`` (out,) frozen or None, ``lora_A`` (r, in), ``lora_B`` (out, r),
    ``in_features``, ``out_features``, ``r``, ``alpha``, ``use_rslora``,
    ``scale``, ``dropout`` (the probability), ``fan_in_fan_out``, ``merged``.
    ``r``, ``alpha``, ``scale`` and ``dropout`` are Python numbers (numpy scalars
    are read out); ``scale`` may be set to a real number or a one-element tensor
    without grad, stored as a float (anything else: TypeError/ValueError, the old
    scale kept).

    State dict: ``weight``, ``bias``, ``lora_A``, ``lora_B`` and ``_extra_state``,
    a float64 tensor ``[merged, scale merged with]`` (``[0, 0]`` unmerged).
    Loading it makes the layer merged or not as the saved layer was: the weight
    and the flag always travel together, so the outputs are the saved layer's.
    A state dict without ``_extra_state`` (written before the flag existed)
    loads as unmerged, also with ``strict=True``. Loading ``lora_A``/``lora_B``
    without ``weight`` (``strict=False``) into a merged layer is refused: the
    weight would keep the old adapter merged in. A model's load is all or none
    over its LoRA layers: if any refuses its entries (that, a malformed flag, a
    shape that differs), none is written, and the error names each refusal.
    Merging a layer on the meta device is refused (no values to merge).
    """

    use_dora = False
    dora_class = None  # DoRALinear, set by dora.py

    def __new__(cls, *args, use_dora=False, **kwargs):
        return super().__new__(_layer_class(cls, use_dora))

    def __init__(self, in_features, out_features, r=8, alpha=16, dropout=0.0, bias=True,
                 use_rslora=False, init="kaiming", device=None, dtype=None,
                 adapter_dtype=None, use_dora=False):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {name}={value!r}")
        check_lora_args(r, alpha, dropout, init, adapter_dtype)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        bias_param = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # the base first: under one seed, the same weight and bias as nn.Linear
        _reset_linear(weight, bias_param)
        self._setup(weight, bias_param, in_features, out_features, False, r, alpha, dropout,
                    use_rslora, init, adapter_dtype)

    @classmethod
    def from_linear(cls, linear, r=8, alpha=16, dropout=0.0, use_rslora=False, init="kaiming",
                    adapter_dtype=None, use_dora=False):
        """Wrap an ``nn.Linear`` or a transformers ``Conv1D``: the new layer holds
        the module's own ``weight`` and ``bias`` Parameter objects (no copy),
        frozen, and fresh adapters on the weight's device."""
        in_features, out_features, fan_in_fan_out = base_layout(linear)
        check_lora_args(r, alpha, dropout, init, adapter_dtype)
        layer = cls.__new__(cls, use_dora=use_dora)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, in_features, out_features, fan_in_fan_out, r,
                     alpha, dropout, use_rslora, init, adapter_dtype)
        layer.train(linear.training)
        return layer

    def _setup(self, weight, bias, in_features, out_features, fan_in_fan_out, r, alpha,
               dropout, use_rslora, init, adapter_dtype):
        self._setup_adapter(weight, in_features, out_features, fan_in_fan_out, r, alpha,
                            use_rslora, adapter_dtype)
        self.dropout = float(dropout)
        self.init = init
        self.bias = bias
        if bias is not None:
            self.bias.requires_grad_(False)
        self._add_adapters()

    def reset_base_parameters(self):
        """The base weight and bias drawn as ``nn.Linear.reset_parameters`` does."""
        _reset_linear(self._weight_out_in(), self.bias)

    def reset_lora_parameters(self):
        """A as ``init`` says (PEFT's "kaiming" default or "gaussian"), B zeros: the
        adapter starts as the identity."""
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1 / self.r)
            nn.init.zeros_(self.lora_B)

    def _weight_out_in(self):
        """The base weight as (out, in): a view, transposed when fan_in_fan_out."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x):
        weight = self._weight_out_in()
        if self._merged:
            return F.linear(x, weight, self.bias)
        return lora_linear(x, weight, self.lora_A, self.lora_B, self.scale, self.bias,
                           self.dropout if self.training else 0.0)

    def extra_repr(self):
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"r={self.r}", f"alpha={self.alpha}", f"scale={self.scale:g}"]
        if self.use_rslora:
            parts.append("use_rslora=True")
        parts += [f"dropout={self.dropout}", f"bias={self.bias is not None}"]
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        parts.append(f"merged={self._merged}")
        return ", ".join(parts)
