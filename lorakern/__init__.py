"""lorakern: fused Triton kernels for LoRA linear layers.

    y = x W^T + b + s * (drop(x) A^T) B^T

``lora_linear`` is the entry point; ``FusedLoRALinear`` the autograd Function
over the kernels; ``reference.lora_linear`` the same math in plain PyTorch.
The kernels (``lorakern.kernels``) are imported on first use, never at import.
"""
from . import reference
from .api import lora_linear
from .function import FusedLoRALinear

__version__ = "0.1.0"

__all__ = ["FusedLoRALinear", "lora_linear", "reference", "__version__"]
