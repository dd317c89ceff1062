"""``lora_embedding``: validation, then the backend chosen by the dispatch point.

    y = E[ids] + s * (A[:, ids])^T B^T,    E (V, D), A (R, V), B (D, R)

A and B in PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` layouts. PEFT applies
no dropout to embedding adapters, and neither does lorakern.
"""
import torch

from . import reference
from .dispatch import select_backend
from .fused_embedding import FusedLoRAEmbedding
from .ops import lora_embedding_op
from .validation import (check_embedding_tensors, check_ids_in_range, check_padding_idx,
                         check_scalars, check_scale_fits, lora_compute_dtype)


def lora_embedding(ids, weight, lora_A, lora_B, scale=1.0, padding_idx=None):
    """y = weight[ids] + scale * (lora_A[:, ids])^T lora_B^T, fused.

    Args:
        ids: token ids of any shape, torch.int32 or torch.int64, each in
            ``[0, num_embeddings)`` (checked before any kernel runs).
        weight: ``[num_embeddings, embedding_dim]``, float16/bfloat16/float32.
        lora_A: ``[r, num_embeddings]``; lora_B: ``[embedding_dim, r]`` (PEFT's
            ``lora_embedding_A`` / ``lora_embedding_B``), any float dtype.
        scale: s, e.g. alpha / r; finite in float32 (float64 when A or B is float64,
            ``validation.scaling_dtype``).
        padding_idx: as nn.Embedding's: that row of weight and that column of
            lora_A get no gradient.
    Returns:
        ``[*ids.shape, embedding_dim]`` in weight's dtype.

    Under torch.compile the kernels run as one custom op, which checks the ids'
    range when it runs (the reference path there relies on F.embedding's check).
    """
    check_embedding_tensors(ids, weight, lora_A, lora_B)
    scale, _ = check_scalars(scale, 0.0)
    check_scale_fits(scale, lora_compute_dtype(lora_A, lora_B), "lora_A and lora_B")
    padding_idx = check_padding_idx(padding_idx, weight.shape[0])
    fused = select_backend(weight, lora_A, lora_B) == "triton"
    if torch.compiler.is_compiling():
        if fused:  # an opaque custom op that checks the ids' range itself
            return lora_embedding_op(ids, weight, lora_A, lora_B, scale, padding_idx)
        return reference.lora_embedding(ids, weight, lora_A, lora_B, scale, padding_idx)
    check_ids_in_range(ids, weight.shape[0])
    if not fused:
        return reference.lora_embedding(ids, weight, lora_A, lora_B, scale, padding_idx)
    return FusedLoRAEmbedding.apply(ids, weight, lora_A, lora_B, scale, padding_idx)
