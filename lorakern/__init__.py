"""lorakern: fused Triton kernels for LoRA linear layers.

    y = x W^T + b + s * (drop(x) A^T) B^T

``lora_linear`` is the entry point; ``FusedLoRALinear`` the autograd Function
over the kernels; ``reference.lora_linear`` the same math in plain PyTorch;
``LoRALinear`` and ``inject_lora`` put it into models; ``save_adapter``,
``load_adapter`` and ``patch_peft`` speak PEFT. The kernels
(``lorakern.kernels``) are imported on first use, never at import.
"""
from . import reference
from .api import lora_linear
from .embedding import FusedLoRAEmbedding, LoRAEmbedding, lora_embedding
from .function import FusedLoRALinear
from .inject import (count_parameters, format_lora_report, inject_lora, lora_report, merge_lora,
                     unmerge_lora)
from .modules import LoRALinear
from .peft_interop import (load_adapter, patch_peft, patch_summary, patched_modules, save_adapter,
                           unpatch_peft)

__version__ = "0.1.0"

__all__ = ["FusedLoRAEmbedding", "FusedLoRALinear", "LoRAEmbedding", "LoRALinear", "count_parameters",
           "format_lora_report", "inject_lora", "load_adapter", "lora_embedding", "lora_linear",
           "lora_report", "merge_lora", "patch_peft", "patch_summary", "patched_modules",
           "reference", "save_adapter", "unmerge_lora", "unpatch_peft", "__version__"]
