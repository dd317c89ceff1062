"""``lora_linear``: validation, autocast (as nn.Linear's: float64 is left alone), then
the backend chosen by the dispatch point (``dispatch.py``): the reference, the autograd
Function over the kernels (``fused_linear.py``), or its custom op under torch.compile
(``ops.py``)."""
import torch

from . import reference
from .dispatch import select_backend
from .fused_linear import FusedLoRALinear
from .ops import lora_linear_compiled
from .validation import (check_base_dtypes, check_scalars, check_scale_fits, check_tensors,
                         lora_compute_dtype)


def _autocast_dtype(device_type):
    """The autocast dtype if autocast is on for this device type, else None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = (torch.is_autocast_enabled() if device_type == "cuda"
                   else torch.is_autocast_cpu_enabled())
    except RuntimeError:  # a device type autocast does not know, such as meta
        return None
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return (torch.get_autocast_gpu_dtype() if device_type == "cuda"
            else torch.get_autocast_cpu_dtype())


def _autocast_operand(tensor, autocast_dtype):
    """``tensor`` as autocast hands it to F.linear, on CPU and CUDA alike: a floating
    tensor in the autocast dtype, except float64, which autocast leaves alone."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(autocast_dtype)


def lora_linear(x, weight, lora_A, lora_B, scale=1.0, bias=None, dropout_p=0.0):
    """y = x W^T + bias + scale * (drop(x) A^T) B^T, fused.

    Args:
        x: ``[..., in_features]``, any strides, float16/bfloat16/float32.
        weight: ``[out_features, in_features]`` (nn.Linear layout), x's dtype.
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]`` (PEFT layout),
            any float dtype (their grads come back in their own dtypes).
        scale: s, e.g. alpha / r (or alpha / sqrt(r) for rsLoRA).
        bias: optional ``[out_features]``, x's dtype.
        dropout_p: dropout probability on the LoRA input (PEFT's semantics,
            scaled by 1 / (1 - p)); applied whenever > 0.
    Returns:
        ``[..., out_features]`` in x's dtype (under autocast, the autocast dtype unless
        x is float64, which autocast leaves alone, as for nn.Linear).

    ``scale`` must be finite in the dtype the LoRA term is scaled in (float32, or
    float64 when x, A or B is float64; ``validation.scaling_dtype``).

    CUDA tensors run the Triton kernels; CPU tensors the PyTorch reference
    (see ``lorakern.functional.dispatch`` for the overrides).
    """
    check_tensors(x, weight, lora_A, lora_B, bias)
    scale, dropout_p = check_scalars(scale, dropout_p)
    autocast_dtype = _autocast_dtype(x.device.type)
    if autocast_dtype is not None:
        # as nn.Linear under autocast: every matmul operand in the autocast dtype but
        # float64 ones (a float64 layer stays float64; float64 mixed with others is refused)
        x, weight, lora_A, lora_B, bias = (_autocast_operand(t, autocast_dtype)
                                           for t in (x, weight, lora_A, lora_B, bias))
    check_base_dtypes(x, weight, bias)
    check_scale_fits(scale, lora_compute_dtype(x, lora_A, lora_B), "x, lora_A and lora_B")
    if select_backend(x, weight, lora_A, lora_B, bias) == "reference":
        return reference.lora_linear_unchecked(x, weight, lora_A, lora_B, scale, bias,
                                               dropout_p)
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            # an opaque custom op: torch.compile must not trace the launches
            return lora_linear_compiled(x, weight, lora_A, lora_B, bias, scale, dropout_p)
        return FusedLoRALinear.apply(x, weight, lora_A, lora_B, bias, scale, dropout_p)
