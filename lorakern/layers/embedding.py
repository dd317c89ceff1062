"""``LoRAEmbedding``: ``nn.Embedding`` plus PEFT's embedding adapter, on the fused kernels.

    y = E[ids] + s * (A[:, ids])^T B^T,    E (V, D), A (R, V), B (D, R)

Merging, unmerging and the state dict are ``LoRALayer``'s (``adapter.py``);
``embedding_layout`` says which embeddings the layer can wrap. A layer with
``max_norm`` cannot be merged (see ``LoRAEmbedding``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..functional.embedding import lora_embedding
from ..functional.validation import check_embedding_tensors, check_ids_in_range
from .adapter import LoRALayer, check_lora_args


class LoRAEmbedding(LoRALayer):
    """``nn.Embedding`` plus a LoRA adapter, computed by the fused kernels.

        y = E[ids] + s * (A[:, ids])^T B^T,    s = alpha / r  (alpha / sqrt(r) for rsLoRA)

    Args:
        num_embeddings, embedding_dim, padding_idx, max_norm, norm_type: as
            ``nn.Embedding`` (the base table is drawn as nn.Embedding draws it).
        r, alpha, use_rslora: as ``LoRALinear``.
        device, dtype: of the base table.
        adapter_dtype: of ``lora_A`` and ``lora_B``; None: float32 on a
            float16/bfloat16 table, else the table's dtype.

    Attributes: ``weight`` (num_embeddings, embedding_dim) frozen, ``lora_A``
    (r, num_embeddings) and ``lora_B`` (embedding_dim, r) in PEFT's
    ``lora_embedding_A``/``lora_embedding_B`` layouts, initialised as PEFT does
    (A zeros, B normal), ``scale``, ``merged``; merging, unmerging and the state
    dict as ``LoRALinear``. The base module's ``padding_idx`` (no gradient to that
    row of E or that column of A) and ``max_norm`` (E's looked-up rows renormalised
    in place, as nn.Embedding does) are kept. No dropout: PEFT applies none to
    embedding adapters.

    The ids are checked (dtype, range: TypeError, ValueError) before the table is
    touched. With ``max_norm`` the layer cannot be merged: on a merged table the
    renormalisation would act on ``E + s * (B A)^T`` instead of ``E``, so the merged
    layer would compute something else and ``unmerge()`` would not give E back.
    ``merge()``, ``merge_lora`` and loading a merged state dict raise ValueError
    (RuntimeError from ``load_state_dict``), nothing changed.
    """

    def __init__(self, num_embeddings, embedding_dim, r=8, alpha=16, padding_idx=None,
                 max_norm=None, norm_type=2.0, use_rslora=False, device=None, dtype=None,
                 adapter_dtype=None):
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx,
                            max_norm=max_norm, norm_type=norm_type, device=device, dtype=dtype)
        check_lora_args(r, alpha, 0.0, "kaiming", adapter_dtype)
        super().__init__()
        self._setup(base, r, alpha, use_rslora, adapter_dtype)

    @classmethod
    def from_embedding(cls, embedding, r=8, alpha=16, use_rslora=False, adapter_dtype=None):
        """Wrap an ``nn.Embedding``: the new layer holds its own ``weight`` Parameter
        (no copy), frozen, its padding_idx and max_norm, and fresh adapters."""
        embedding_layout(embedding)
        check_lora_args(r, alpha, 0.0, "kaiming", adapter_dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(embedding, r, alpha, use_rslora, adapter_dtype)
        layer.train(embedding.training)
        return layer

    def _setup(self, base, r, alpha, use_rslora, adapter_dtype):
        num_embeddings, embedding_dim = base.weight.shape
        # an embedding is the linear map of one-hot ids, its table stored (in, out)
        self._setup_adapter(base.weight, num_embeddings, embedding_dim, True, r, alpha,
                            use_rslora, adapter_dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = (base.padding_idx, base.max_norm,
                                                           base.norm_type)
        self.dropout = 0.0
        self._add_adapters()

    def reset_lora_parameters(self):
        """PEFT's init for embedding adapters: A zeros, B standard normal."""
        with torch.no_grad():
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _merge_refusal(self):
        if self.max_norm is None:
            return None
        return (f"a LoRAEmbedding with max_norm={self.max_norm} cannot be merged: "
                f"nn.Embedding's max_norm renormalises the looked-up rows of the table in "
                f"place, which on a merged table would be E + s * (B A)^T, not E; the merged "
                f"layer would compute something else, and unmerge() would not restore E")

    def _check_ids(self, ids):
        """The checks lora_embedding makes, for the paths that touch the table before it
        (max_norm's renormalisation) or without it (the merged lookup)."""
        check_embedding_tensors(ids, self.weight, self.lora_A, self.lora_B)
        if not torch.compiler.is_compiling():  # as lora_embedding: no data-dependent check
            check_ids_in_range(ids, self.num_embeddings)

    def forward(self, ids):
        if self.max_norm is not None or self._merged:
            self._check_ids(ids)
        if self.max_norm is not None:
            with torch.no_grad():  # as F.embedding: the looked-up rows of E, in place
                torch.embedding_renorm_(self.weight, ids, self.max_norm, self.norm_type)
        if self._merged:
            return F.embedding(ids, self.weight, self.padding_idx)
        return lora_embedding(ids, self.weight, self.lora_A, self.lora_B, self.scale,
                              self.padding_idx)

    def extra_repr(self):
        parts = [f"{self.num_embeddings}, {self.embedding_dim}", f"r={self.r}",
                 f"alpha={self.alpha}", f"scale={self.scale:g}"]
        if self.use_rslora:
            parts.append("use_rslora=True")
        if self.padding_idx is not None:
            parts.append(f"padding_idx={self.padding_idx}")
        if self.max_norm is not None:
            parts.append(f"max_norm={self.max_norm}, norm_type={self.norm_type}")
        parts.append(f"merged={self._merged}")
        return ", ".join(parts)


def embedding_layout(embedding):
    """TypeError unless ``embedding`` is an nn.Embedding that LoRAEmbedding can serve."""
    if isinstance(embedding, LoRAEmbedding):
        raise TypeError("from_embedding got a LoRAEmbedding: the layer already has an adapter")
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"from_embedding takes an nn.Embedding, got {type(embedding).__name__}")
    if type(embedding).forward is not nn.Embedding.forward:
        raise TypeError(f"{type(embedding).__name__} overrides nn.Embedding.forward (a scaled "
                        f"embedding?); LoRAEmbedding reproduces only nn.Embedding's lookup")
    if not embedding.weight.dtype.is_floating_point:
        raise TypeError(f"the embedding has a {embedding.weight.dtype} table; LoRAEmbedding "
                        f"needs a floating-point one")
    for flag in ("scale_grad_by_freq", "sparse"):
        if getattr(embedding, flag):
            raise TypeError(f"the embedding sets {flag}=True, which LoRAEmbedding does not "
                            f"support")
