"""The LoRA embedding's launch sequence and its autograd Function, ``FusedLoRAEmbedding``.

    y = E[ids] + s * (A[:, ids])^T B^T,    E (V, D), A (R, V), B (D, R)

The math of the kernels and their gradients is in ``lorakern.kernels.lora_embedding``.
The Function saves only the ids and references to E, A and B: no T x D or V x D
tensor.

The kernels compute the rank product in the dtype of the A and B they are handed, so
A and B of different dtypes (bf16 A with fp32 B) are handed over in their promoted
dtype, as the reference and the linear layer compute it; that copies the one in the
narrower dtype for the call. The gradients come back in each parameter's own dtype.

Threads: calls from several threads at once each get what they would get alone;
nothing is kept between calls (kernels/_common.py says how launches from
threads are run).
"""
import torch

from .dispatch import load_kernels
from .validation import lora_compute_dtype


def _adapters_in_compute_dtype(lora_A, lora_B):
    dtype = lora_compute_dtype(lora_A, lora_B)
    return lora_A.to(dtype), lora_B.to(dtype)


def fused_embedding_forward(ids, weight, lora_A, lora_B, scale):
    """y [*ids.shape, D] from the kernels; the autograd Function and the custom op
    (``ops.py``) both launch through here."""
    kernels = load_kernels(weight.device)
    lora_A, lora_B = _adapters_in_compute_dtype(lora_A, lora_B)
    y = kernels.lora_embedding_forward(ids.reshape(-1), weight, lora_A, lora_B, scale)
    return y.reshape(*ids.shape, weight.shape[1])


def fused_embedding_backward(grad_y, ids, weight, lora_A, lora_B, scale, padding_idx, needs):
    """(dE, dA, dB), None where ``needs`` (three flags, in that order) is False; dA and
    dB in lora_A's and lora_B's dtypes."""
    need_e, need_a, need_b = needs
    kernels = load_kernels(grad_y.device)
    flat = ids.reshape(-1)
    dy = grad_y.reshape(flat.shape[0], weight.shape[1])
    compute_a, compute_b = _adapters_in_compute_dtype(lora_A, lora_B)
    grad_e, grad_a, grad_b = kernels.lora_embedding_backward(
        dy, flat, weight, compute_a, compute_b, scale, padding_idx, need_a, need_b, need_e)
    # computed in fp32 and stored in the compute dtype: one rounding to each parameter's
    return (grad_e, None if grad_a is None else grad_a.to(lora_A.dtype),
            None if grad_b is None else grad_b.to(lora_B.dtype))


class FusedLoRAEmbedding(torch.autograd.Function):
    """``FusedLoRAEmbedding.apply(ids, weight, lora_A, lora_B, scale, padding_idx)``.

    Saves only the ids and references to E, A and B: no T x D or V x D tensor.
    """

    @staticmethod
    def forward(ctx, ids, weight, lora_A, lora_B, scale, padding_idx):
        ctx.save_for_backward(ids, weight, lora_A, lora_B)
        ctx.scale, ctx.padding_idx = scale, padding_idx
        return fused_embedding_forward(ids, weight, lora_A, lora_B, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        ids, weight, lora_A, lora_B = ctx.saved_tensors
        grads = fused_embedding_backward(grad_y, ids, weight, lora_A, lora_B, ctx.scale,
                                         ctx.padding_idx, ctx.needs_input_grad[1:4])
        return (None,) + tuple(grads) + (None, None)
