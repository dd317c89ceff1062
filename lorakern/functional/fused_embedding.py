"""The LoRA embedding's launch sequence and its autograd Function, ``FusedLoRAEmbedding``.

    y = E[ids] + s * (A[:, ids])^T B^T,    E (V, D), A (R, V), B (D, R)

The math of the kernels and their gradients is in ``lorakern.kernels.lora_embedding``.
The Function saves only the ids and references to E, A and B: no T x D or V x D
tensor.
"""
import torch

from .dispatch import load_kernels


def fused_embedding_forward(ids, weight, lora_A, lora_B, scale):
    """y [*ids.shape, D] from the kernels; the autograd Function and the custom op
    (``ops.py``) both launch through here."""
    kernels = load_kernels(weight.device)
    y = kernels.lora_embedding_forward(ids.reshape(-1), weight, lora_A, lora_B, scale)
    return y.reshape(*ids.shape, weight.shape[1])


def fused_embedding_backward(grad_y, ids, weight, lora_A, lora_B, scale, padding_idx, needs):
    """(dE, dA, dB), None where ``needs`` (three flags, in that order) is False."""
    need_e, need_a, need_b = needs
    kernels = load_kernels(grad_y.device)
    flat = ids.reshape(-1)
    dy = grad_y.reshape(flat.shape[0], weight.shape[1])
    return kernels.lora_embedding_backward(dy, flat, weight, lora_A, lora_B, scale,
                                           padding_idx, need_a, need_b, need_e)


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
