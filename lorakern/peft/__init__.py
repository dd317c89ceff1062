"""Hugging Face PEFT's own objects and files (the top level: it uses the models' level).

- ``patch.py``: ``patch_peft`` / ``unpatch_peft`` / ``patch_summary`` /
  ``patched_modules``: PEFT models on the fused kernels, in place.
- ``adapter_format.py``: PEFT's adapter file names and state-dict keys;
  ``save.py``: ``save_adapter``; ``atomic_files.py``: both files replaced
  together; ``load.py``: ``load_adapter``.
- ``sharded.py``: models sharded by FSDP2 or DeepSpeed ZeRO-3 (what the fused
  forward and ``save_adapter`` need of them).

peft, transformers and safetensors are optional: each is imported inside the
function that needs it, never by ``import lorakern``.
"""
from .load import load_adapter
from .patch import PatchSummary, patch_peft, patch_summary, patched_modules, unpatch_peft
from .save import save_adapter

__all__ = ["PatchSummary", "load_adapter", "patch_peft", "patch_summary", "patched_modules",
           "save_adapter", "unpatch_peft"]
