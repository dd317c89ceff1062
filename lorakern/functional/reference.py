"""The pure-PyTorch LoRA linear and embedding: the CPU backend and the oracle of the tests.

    y = x W^T + b + s * (drop(x) A^T) B^T,    drop(x) = x * m / (1 - p)

The rank product runs in the promoted dtype of x, A and B (fp32 adapters on a
bf16 base compute their branch in fp32, as PEFT does); y has x's dtype, rounded as
the kernels round it: round(x W^T + round(s * LoRA + b)). A scale
that is not finite in the dtype the term is scaled in (float32, float64 for a float64
rank product) is refused, as by ``lorakern.lora_linear``.
Gradients come from autograd. ``lora_embedding`` is PEFT's embedding adapter,
``E[ids] + s * (A[:, ids])^T B^T``, in the same way.
"""
import math

import torch
import torch.nn.functional as F

from .validation import (check_base_dtypes, check_scalars, check_scale_fits, check_tensors,
                         lora_compute_dtype)


def lora_linear(x, weight, lora_A, lora_B, scale=1.0, bias=None, dropout_p=0.0):
    """LoRA linear in plain PyTorch; same signature and checks as ``lorakern.lora_linear``.

    Args:
        x: ``[..., in_features]`` input.
        weight: ``[out_features, in_features]`` base weight (nn.Linear layout).
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]`` (PEFT layout).
        scale: s, e.g. alpha / r (or alpha / sqrt(r) for rsLoRA).
        bias: optional ``[out_features]``.
        dropout_p: dropout probability on the LoRA input; applied whenever > 0.
    Returns:
        ``[..., out_features]`` in x's dtype.
    """
    check_tensors(x, weight, lora_A, lora_B, bias)
    check_base_dtypes(x, weight, bias)
    scale, dropout_p = check_scalars(scale, dropout_p)
    check_scale_fits(scale, lora_compute_dtype(x, lora_A, lora_B), "x, lora_A and lora_B")
    return lora_linear_unchecked(x, weight, lora_A, lora_B, scale, bias, dropout_p)


def lora_linear_unchecked(x, weight, lora_A, lora_B, scale, bias, dropout_p):
    keep_mask = None
    if dropout_p > 0.0:
        keep_mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        keep_mask.bernoulli_(1.0 - dropout_p)
    return lora_linear_masked(x, weight, lora_A, lora_B, scale, bias, keep_mask, dropout_p)


def lora_linear_masked(x, weight, lora_A, lora_B, scale, bias, keep_mask, dropout_p):
    """The layer with an explicit boolean keep-mask (broadcastable to x), or none.

    y = round(x W^T + round(s * LoRA + b)): the LoRA term with the bias is
    rounded to x's dtype, then added to x W^T as addmm's C operand (the
    product accumulated in fp32, y rounded once), as both kernel strategies do.
    """
    lora_dtype = lora_compute_dtype(x, lora_A, lora_B)
    lora_in = x.to(lora_dtype)
    if keep_mask is not None:
        # where, not a product: a dropped inf must not turn into NaN
        lora_in = torch.where(keep_mask, lora_in, 0.0) / (1.0 - dropout_p)
    lora = F.linear(F.linear(lora_in, lora_A.to(lora_dtype)), lora_B.to(lora_dtype))
    term = scale * lora if bias is None else scale * lora + bias
    rows = math.prod(x.shape[:-1])  # not -1: a layer may have no features
    y = torch.addmm(term.to(x.dtype).reshape(rows, weight.shape[0]),
                    x.reshape(rows, x.shape[-1]), weight.t())
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def lora_embedding(ids, weight, lora_A, lora_B, scale, padding_idx=None):
    """The LoRA embedding in plain PyTorch, inputs already checked: PEFT's math, the rank product in the promoted dtype of A and B, y in weight's dtype."""
    base = F.embedding(ids, weight, padding_idx)
    lora_dtype = lora_compute_dtype(lora_A, lora_B)
    after_a = F.embedding(ids, lora_A.to(lora_dtype).t(), padding_idx)
    lora = F.linear(after_a, lora_B.to(lora_dtype)) * scale
    total = torch.promote_types(weight.dtype, lora_dtype)
    return (base.to(total) + lora.to(total)).to(weight.dtype)
