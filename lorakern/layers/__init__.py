"""The layer level: nn.Modules over the functional calls.

- ``adapter.py``: ``LoRALayer``, what every adapter layer shares (the adapters,
  the scale, merging, the merged flag in the state dict, the argument checks).
- ``linear.py``: ``LoRALinear`` and the linear modules it can wrap
  (``base_layout``: nn.Linear, transformers Conv1D).
- ``dora.py``: ``DoRALinear``, PEFT's DoRA (``LoRALinear(..., use_dora=True)``).
- ``embedding.py``: ``LoRAEmbedding`` and the embeddings it can wrap
  (``embedding_layout``).
"""
from .adapter import LoRALayer
from .dora import DoRALinear
from .embedding import LoRAEmbedding
from .linear import LoRALinear

__all__ = ["DoRALinear", "LoRAEmbedding", "LoRALayer", "LoRALinear"]
