"""The model level: whole models changed or read through the layers.

- ``inject.py``: ``inject_lora``; ``config.py``: a PEFT ``LoraConfig`` read as
  its settings; ``targets.py``: PEFT's module-name matching.
- ``merge.py``: ``merge_lora`` / ``unmerge_lora``; ``unload.py``: ``unload``, every
  LoRA layer back to the plain module it replaced (merged first by default).
- ``report.py``: ``count_parameters``, ``format_lora_report``, ``lora_report``.
"""
from .inject import inject_lora
from .merge import merge_lora, unmerge_lora
from .report import count_parameters, format_lora_report, lora_report
from .unload import unload

__all__ = ["count_parameters", "format_lora_report", "inject_lora", "lora_report", "merge_lora",
           "unload", "unmerge_lora"]
