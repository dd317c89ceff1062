"""The functional level: the calls, their autograd Functions and custom ops, the
reference, the dispatch point and the tuner. Imports only ``lorakern.kernels``
(on first use) and torch.

- ``linear.py``: ``lora_linear`` (validation, autocast, dispatch);
  ``fused_linear.py``: its launch sequence and ``FusedLoRALinear``.
- ``dora.py``: ``dora_linear`` (PEFT's DoRA), its reference and ``FusedDoRALinear``.
- ``embedding.py``: ``lora_embedding``; ``fused_embedding.py``: its launch
  sequence and ``FusedLoRAEmbedding``.
- ``base_weight.py``: what the linear path reads from its base weight
  (``BaseWeight``; ``DenseWeight`` for a float tensor); ``layouts.py``: the
  unit-stride rows every kernel build is compiled for.
- ``ops.py``: both layers as torch.library custom ops (torch.compile).
- ``reference.py``: both layers in plain PyTorch (CPU backend, test oracle).
- ``dispatch.py``: triton or reference, and the strategy; ``autotune.py``: the
  tuner and its cache; ``validation.py``: the argument checks.
"""
from . import reference
from .embedding import lora_embedding
from .fused_embedding import FusedLoRAEmbedding
from .fused_linear import FusedLoRALinear
from .linear import lora_linear

__all__ = ["FusedLoRAEmbedding", "FusedLoRALinear", "lora_embedding", "lora_linear", "reference"]
