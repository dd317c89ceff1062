"""lorakern: fused Triton kernels for LoRA linear layers.

    y = x W^T + b + s * (drop(x) A^T) B^T

``lora_linear`` is the entry point (``dora_linear`` for PEFT's DoRA); ``FusedLoRALinear`` the autograd Function
over the kernels; ``reference.lora_linear`` the same math in plain PyTorch;
``LoRALinear`` and ``inject_lora`` put it into models; ``save_adapter``,
``load_adapter`` and ``patch_peft`` speak PEFT. The kernels
(``lorakern.kernels``) are imported on first use, never at import.

The package is layered, each level importing only from the levels before it:
``lorakern.kernels`` <- ``functional`` (the calls, their autograd Functions and
custom ops, the reference, dispatch, the tuner) <- ``layers`` (the nn.Modules)
<- ``models`` (inject, merge, report) <- ``peft`` (PEFT models and adapter files).
"""
import sys as _sys

from . import _module_aliases
from .functional import reference
from .functional.dora import FusedDoRALinear, dora_linear
from .functional.embedding import lora_embedding
from .functional.fused_embedding import FusedLoRAEmbedding
from .functional.fused_linear import FusedLoRALinear
from .functional.linear import lora_linear
from .layers.dora import DoRALinear
from .layers.embedding import LoRAEmbedding
from .layers.linear import LoRALinear
from .models.inject import inject_lora
from .models.merge import merge_lora, unmerge_lora
from .models.report import count_parameters, format_lora_report, lora_report
from .models.unload import unload
from .peft.load import load_adapter
from .peft.patch import patch_peft, patch_summary, patched_modules, unpatch_peft
from .peft.save import save_adapter

__version__ = "0.1.0"

__all__ = ["DoRALinear", "FusedDoRALinear", "dora_linear", "FusedLoRAEmbedding", "FusedLoRALinear", "LoRAEmbedding", "LoRALinear", "count_parameters",
           "format_lora_report", "inject_lora", "load_adapter", "lora_embedding", "lora_linear",
           "lora_report", "merge_lora", "patch_peft", "patch_summary", "patched_modules",
           "reference", "save_adapter", "unload", "unmerge_lora", "unpatch_peft", "__version__"]

_module_aliases.install(_sys.modules[__name__])
