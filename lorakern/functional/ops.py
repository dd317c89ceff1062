"""The fused layer as torch.library custom ops, so torch.compile sees one
opaque op (with a fake implementation for shapes) instead of tracing into the
Triton launches: ``torch.compile(model, fullgraph=True)`` runs without graph
breaks, forward and backward. ``lorakern::lora_embedding`` (and its backward op)
does the same for the LoRA embedding.

``lorakern::lora_linear`` returns (y, h); its backward is the op
``lorakern::lora_linear_backward``. The dropout seed travels as a one-element
CPU tensor drawn in the graph from torch's generator, so it follows
torch.manual_seed and the RNG state torch.utils.checkpoint restores.
"""
import math
from typing import List, Optional

import torch
from torch import Tensor

from .fused_embedding import fused_embedding_backward, fused_embedding_forward
from .fused_linear import fused_backward, fused_forward
from .validation import check_ids_in_range


@torch.library.custom_op("lorakern::lora_linear", mutates_args=())
def lora_linear_op(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                   bias: Optional[Tensor], scale: float, dropout_p: float,
                   seed: Tensor) -> List[Tensor]:
    y, h = fused_forward(x, weight, lora_A, lora_B, bias, scale, dropout_p, int(seed.item()))
    return [y, h]


@lora_linear_op.register_fake
def _lora_linear_fake(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed):
    # math.prod keeps M symbolic; torch.Size.numel() would specialize it to an int, and
    # torch.compile would then recompile for every new token count
    rows = math.prod(x.shape[:-1])
    # h is in the rank products' dtype: fp32 with fp32 adapters, as the kernels make it
    h_dtype = torch.promote_types(torch.promote_types(x.dtype, lora_A.dtype), lora_B.dtype)
    return [x.new_empty(*x.shape[:-1], weight.shape[0]),
            x.new_empty(rows, lora_A.shape[0], dtype=h_dtype)]


@torch.library.custom_op("lorakern::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor,
                            lora_B: Tensor, h: Tensor, scale: float, dropout_p: float,
                            seed: Tensor, needs: List[bool]) -> List[Tensor]:
    grads = fused_backward(grad_y, x, weight, lora_A, lora_B, h, scale, dropout_p,
                           int(seed.item()), needs)
    # an op returns tensors only: an empty one stands for "not computed"
    return [grad_y.new_empty(0) if g is None else g for g in grads]


@lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(grad_y, x, weight, lora_A, lora_B, h, scale, dropout_p, seed,
                               needs):
    shapes = [(x, x.shape), (weight, weight.shape), (lora_A, lora_A.shape),
              (lora_B, lora_B.shape), (grad_y, (weight.shape[0],))]
    return [like.new_empty(shape) if need else grad_y.new_empty(0)
            for need, (like, shape) in zip(needs, shapes)]


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scale, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grads):
    x, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    results = lora_linear_backward_op(grads[0], x, weight, lora_A, lora_B, h, ctx.scale,
                                      ctx.dropout_p, seed, needs)
    return tuple(g if need else None for g, need in zip(results, needs)) + (None, None, None)


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_compiled(x, weight, lora_A, lora_B, bias, scale, dropout_p):
    """The op behind ``lorakern.lora_linear`` inside torch.compile."""
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,))
    else:
        seed = torch.zeros(1, dtype=torch.int64)
    return lora_linear_op(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed)[0]


# ------------------------------------------------------------------ the LoRA embedding
@torch.library.custom_op("lorakern::lora_embedding", mutates_args=())
def lora_embedding_op(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                      scale: float, padding_idx: Optional[int]) -> Tensor:
    # the ids' range depends on their values: checked here, where they are known
    check_ids_in_range(ids, weight.shape[0])
    return fused_embedding_forward(ids, weight, lora_A, lora_B, scale)


@lora_embedding_op.register_fake
def _lora_embedding_fake(ids, weight, lora_A, lora_B, scale, padding_idx):
    return weight.new_empty(*ids.shape, weight.shape[1])


@torch.library.custom_op("lorakern::lora_embedding_backward", mutates_args=())
def lora_embedding_backward_op(grad_y: Tensor, ids: Tensor, weight: Tensor, lora_A: Tensor,
                               lora_B: Tensor, scale: float, padding_idx: Optional[int],
                               needs: List[bool]) -> List[Tensor]:
    grads = fused_embedding_backward(grad_y, ids, weight, lora_A, lora_B, scale, padding_idx,
                                     needs)
    # an op returns tensors only: an empty one stands for "not computed"
    return [grad_y.new_empty(0) if g is None else g for g in grads]


@lora_embedding_backward_op.register_fake
def _lora_embedding_backward_fake(grad_y, ids, weight, lora_A, lora_B, scale, padding_idx,
                                  needs):
    return [like.new_empty(like.shape) if need else grad_y.new_empty(0)
            for need, like in zip(needs, (weight, lora_A, lora_B))]


def _embedding_setup_context(ctx, inputs, output):
    ids, weight, lora_A, lora_B, scale, padding_idx = inputs
    ctx.save_for_backward(ids, weight, lora_A, lora_B)
    ctx.scale, ctx.padding_idx = scale, padding_idx


def _embedding_backward(ctx, grad_y):
    ids, weight, lora_A, lora_B = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[1:4])
    grads = lora_embedding_backward_op(grad_y, ids, weight, lora_A, lora_B, ctx.scale,
                                       ctx.padding_idx, needs)
    return (None,) + tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


lora_embedding_op.register_autograd(_embedding_backward,
                                    setup_context=_embedding_setup_context)
