"""Fused LoRA embedding: gather and rank product in one pass, and a backward
that never forms a num_embeddings x embedding_dim temporary.

Shapes, in PEFT's layouts: ids (T) flattened token ids, E (V, D) the frozen
table, A (R, V) ``lora_embedding_A``, B (D, R) ``lora_embedding_B``. With a_t the
column A[:, id_t] (the token's row of A^T):

    y[t]  = E[id_t] + s * B @ a_t                     (T, D), written once

PEFT applies no dropout to embedding adapters, and neither does this kernel.
The gradients, for dY (T, D):

    dB       = s * dY^T @ A[:, ids]^T                  (D, R), a reduction over tokens
    dA[:, v] = s * B^T @ (sum of dY[t] over t with id_t = v)
    dE[v]    = sum of dY[t] over t with id_t = v      (only if E trains)

and nothing for v = padding_idx. The last two are sums per distinct id: the
tokens are sorted by id once (a stable sort), and one program per distinct id
adds its rows of dY in that fixed order, so the result is the same on every run
(no atomics). Each row of dY is read once by those programs; dB is a tall-skinny
reduction (``tn_matmul``) over dY and the gathered A[:, ids]^T (T x R).
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_precision, empty, launching, mma, rank_block
from .lora_grad_weights import tn_matmul


@triton.jit
def _lora_embedding_forward_kernel(
    # pointers
    ids_ptr, e_ptr, a_ptr, b_ptr, y_ptr,
    # sizes
    T, D, R,
    # strides
    stride_ids, stride_ev, stride_ed, stride_ar, stride_av, stride_bd, stride_br,
    stride_yt, stride_yd,
    # scalars
    scale,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    in_t = offs_t < T
    in_d = offs_d < D
    in_r = offs_r < R
    # 64-bit: V * D and T * D can exceed 2^31 elements
    ids = tl.load(ids_ptr + offs_t.to(tl.int64) * stride_ids, mask=in_t, other=0).to(tl.int64)
    cols = offs_d.to(tl.int64)

    a_rows = tl.load(a_ptr + offs_r[None, :] * stride_ar + ids[:, None] * stride_av,
                     mask=in_t[:, None] & in_r[None, :], other=0.0)
    b_t = tl.load(b_ptr + cols[None, :] * stride_bd + offs_r[:, None] * stride_br,
                  mask=in_r[:, None] & in_d[None, :], other=0.0)
    # the adapters' own dtype for the rank product (fp32 adapters stay fp32, as in PEFT)
    lora = mma(a_rows, b_t.to(a_rows.dtype), tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32),
               UPCAST_DOT, DOT_PRECISION)
    e = tl.load(e_ptr + ids[:, None] * stride_ev + cols[None, :] * stride_ed,
                mask=in_t[:, None] & in_d[None, :], other=0.0).to(tl.float32)
    y = e + scale * lora
    tl.store(y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + cols[None, :] * stride_yd,
             y.to(y_ptr.dtype.element_ty), mask=in_t[:, None] & in_d[None, :])


@triton.jit
def _lora_embedding_grad_kernel(
    # pointers
    order_ptr, starts_ptr, uids_ptr, dy_ptr, b_ptr, da_ptr, de_ptr,
    # sizes
    D, R,
    # strides
    stride_dyt, stride_dyd, stride_bd, stride_br, stride_dar, stride_dav,
    stride_dev, stride_ded,
    # scalars
    scale, padding_idx,
    # meta-parameters
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DE: tl.constexpr,
):
    pid = tl.program_id(0)
    v = tl.load(uids_ptr + pid).to(tl.int64)
    start = tl.load(starts_ptr + pid)
    end = tl.load(starts_ptr + pid + 1)
    # the padding id sums no token: its gradients stay zero
    end = tl.where(v == padding_idx, start, end)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R

    da = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        in_d = cols < D
        cols = cols.to(tl.int64)
        # this id's rows of dY, summed in sorted-token order: deterministic
        row_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(start, end):
            t = tl.load(order_ptr + i).to(tl.int64)
            row_sum += tl.load(dy_ptr + t * stride_dyt + cols * stride_dyd, mask=in_d,
                               other=0.0).to(tl.float32)
        if NEED_DE:
            tl.store(de_ptr + v * stride_dev + cols * stride_ded,
                     row_sum.to(de_ptr.dtype.element_ty), mask=in_d)
        if NEED_DA:
            b = tl.load(b_ptr + cols[:, None] * stride_bd + offs_r[None, :] * stride_br,
                        mask=in_d[:, None] & in_r[None, :], other=0.0).to(tl.float32)
            da += tl.sum(row_sum[:, None] * b, axis=0)
    if NEED_DA:
        tl.store(da_ptr + offs_r * stride_dar + v * stride_dav,
                 (scale * da).to(da_ptr.dtype.element_ty), mask=in_r)


# One forward tile: BLOCK_T tokens x BLOCK_D features, with the (BLOCK_T x BLOCK_R) rows
# of A^T and the (BLOCK_R x BLOCK_D) tile of B^T in registers. An IEEE fp32 rank product
# (fp32 adapters) runs on the FMA pipes with its operands in registers: wide ranks narrow
# BLOCK_D so that the B tile stays at 4096 values (32 per thread, 4 warps). Wider tiles
# spill (sm_90, fp32 adapters: 32 x 128 at r = 64 and 16 x 64 at r = 128 use the stack).
FORWARD_BLOCK_T = 16
FORWARD_B_TILE_ELEMENTS = 4096
FORWARD_INTERPRET = (16, 32)
# The grad kernel holds a (BLOCK_D x BLOCK_R) tile of B: at most 128 values per thread.
GRAD_B_TILE_ELEMENTS = 256 * 64
GRAD_BLOCK_D_INTERPRET = 32


def forward_config(block_r):
    """(BLOCK_T, BLOCK_D) of the forward for this rank block."""
    if INTERPRET:
        return FORWARD_INTERPRET
    return FORWARD_BLOCK_T, max(32, min(128, FORWARD_B_TILE_ELEMENTS // block_r))


def grad_block_d(block_r):
    """BLOCK_D of the grad kernel for this rank block."""
    if INTERPRET:
        return GRAD_BLOCK_D_INTERPRET
    return max(32, min(256, GRAD_B_TILE_ELEMENTS // block_r))


def lora_embedding_forward(ids, weight, lora_a, lora_b, scale):
    """y (T, D) in weight's dtype for flat int ids (T). Inputs assumed validated."""
    t = ids.shape[0]
    d, r = weight.shape[1], lora_a.shape[0]
    y = empty((t, d), weight.dtype, weight.device)
    if t == 0 or d == 0:
        return y
    block_r = rank_block(r)
    block_t, block_d = forward_config(block_r)
    grid = (triton.cdiv(t, block_t), triton.cdiv(d, block_d))
    with launching("lora_embedding_forward"):
        _lora_embedding_forward_kernel[grid](
            ids, weight, lora_a, lora_b, y,
            t, d, r,
            ids.stride(0), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
            lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
            float(scale),
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_R=block_r,
            UPCAST_DOT=INTERPRET, DOT_PRECISION=dot_precision(lora_a.dtype),
            num_warps=4, num_stages=1,
        )
    return y


def _segments(ids):
    """(order, starts, unique ids) of the tokens grouped by id: the tokens of unique
    id u are order[starts[u]:starts[u + 1]], in their original order."""
    sorted_ids, order = torch.sort(ids, stable=True)
    unique, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.zeros(unique.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return order, starts, unique


def lora_embedding_backward(grad_y, ids, weight, lora_a, lora_b, scale, padding_idx,
                            need_a, need_b, need_e):
    """(dE, dA, dB), None where not needed. grad_y (T, D), ids (T)."""
    t, d = grad_y.shape
    r = lora_a.shape[0]
    device = grad_y.device
    # ids that no token names get zero gradients: these buffers start at zero
    grad_e = torch.zeros(weight.shape, dtype=weight.dtype, device=device) if need_e else None
    grad_a = torch.zeros(lora_a.shape, dtype=lora_a.dtype, device=device) if need_a else None
    grad_b = None
    if need_b:
        grad_b = empty(lora_b.shape, lora_b.dtype, device)
        gathered_a = lora_a.t().index_select(0, ids)  # (T, R): the tokens' rows of A^T
        tn_matmul(grad_y, gathered_a, grad_b, scale, rank_block=rank_block(r))
    if (need_a or need_e) and t and d:
        order, starts, unique = _segments(ids)
        if unique.numel():
            block_r = rank_block(r)
            with launching("lora_embedding_grad"):
                _lora_embedding_grad_kernel[(unique.numel(),)](
                    order, starts, unique, grad_y, lora_b,
                    grad_a if need_a else grad_y, grad_e if need_e else grad_y,
                    d, r,
                    grad_y.stride(0), grad_y.stride(1), lora_b.stride(0), lora_b.stride(1),
                    grad_a.stride(0) if need_a else 0, grad_a.stride(1) if need_a else 0,
                    grad_e.stride(0) if need_e else 0, grad_e.stride(1) if need_e else 0,
                    float(scale), -1 if padding_idx is None else int(padding_idx),
                    BLOCK_D=grad_block_d(block_r), BLOCK_R=block_r,
                    NEED_DA=need_a, NEED_DE=need_e,
                    num_warps=4, num_stages=1,
                )
    return grad_e, grad_a, grad_b
