"""The rank pass: a tall product onto the LoRA rank, with the dropout mask.

Shapes: L (M, K) with any strides, Rt (K, R), out (M, R), R any rank >= 1
(padded to BLOCK_R >= 16 and masked, as tl.dot needs every dim >= 16):

    out = scale * (L * m) @ Rt          m the dropout keep-mask of (row, col) of L

It serves both rank products of the layer y = x W^T + b + s * drop(x) A^T B^T:

    forward   h = (1 / (1 - p)) * (x * m) @ A^T     L = x,  Rt = A^T, mask on
    backward  G = dY @ B                            L = dY, Rt = B,   no mask

Each program owns BLOCK_M full rows of out and walks K once, so every element
of x is read once and its mask bits are generated once (one Philox call per 8
elements, see dropout.py) -- the GEMMs never touch the mask except dX's
epilogue. Rt (R x K, a few MiB at most) is re-read by every program from L2.

Dtypes: the products run in the promoted dtype of L and Rt, as torch computes
them: with fp32 adapters (PEFT's default on a bf16/fp16 base) the x or dY tile
meets the fp32 operand on the tensor cores at fp32 accuracy (the fp32 operand cut
into three exact parts, ``_common.mixed_mma``; TF32 when torch allows it, IEEE FMA
products with ``torch.backends.cuda.matmul.fp32_precision = "ieee"``), and out is
fp32; with 16-bit adapters of x's dtype it runs on the tensor cores in that dtype.
Accumulation is always fp32.
"""
from dataclasses import dataclass

import triton
import triton.language as tl

from ._common import (INTERPRET, empty, fit_stages, launching, mixed_mma, mixed_precision,
                      rank_block, to_storage)
from .dropout import dropout_keep_tile, dropout_threshold


@triton.jit
def rank_tile(
    l_ptr, rt_ptr, K, R, stride_lm, stride_lk, stride_rk, stride_rr,
    offs_m, in_m, threshold, seed,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_R) tile of (L * m) @ Rt for rows offs_m, over all of K:
    each L element of these rows is loaded, masked and multiplied once."""
    rows = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    in_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)  # a transposed x has a large stride along K
        in_k = ks < K
        lhs = tl.load(l_ptr + rows[:, None] * stride_lm + ks[None, :] * stride_lk,
                      mask=in_m[:, None] & in_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, offs_m, k0, threshold, BLOCK_K)
            lhs = tl.where(keep, lhs, 0.0)  # where, not a product: a dropped inf is 0
        rhs = tl.load(rt_ptr + ks[:, None] * stride_rk + offs_r[None, :] * stride_rr,
                      mask=in_k[:, None] & in_r[None, :], other=0.0)
        acc = mixed_mma(lhs, rhs, acc, UPCAST_DOT, DOT_PRECISION)
    return acc


@triton.jit
def _rank_product_kernel(
    # pointers
    l_ptr, rt_ptr, out_ptr,
    # sizes
    M, K, R,
    # strides
    stride_lm, stride_lk, stride_rk, stride_rr, stride_om, stride_or,
    # scalars
    scale, threshold, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    in_m = offs_m < M
    acc = rank_tile(l_ptr, rt_ptr, K, R, stride_lm, stride_lk, stride_rk, stride_rr,
                    offs_m, in_m, threshold, seed, BLOCK_M, BLOCK_K, BLOCK_R, HAS_DROPOUT,
                    UPCAST_DOT, DOT_PRECISION)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or,
             to_storage(acc * scale, out_ptr.dtype.element_ty, UPCAST_DOT),
             mask=in_m[:, None] & (offs_r < R)[None, :])


@dataclass(frozen=True)
class RankConfig:
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


RANK_INTERPRET = RankConfig(16, 32, num_warps=1, num_stages=1)
RANK_BLOCKS = (16, 32, 64, 128, 256)


def rank_product_config(m, block_r, l_bytes, rt_bytes):
    if INTERPRET:
        return RANK_INTERPRET
    return rank_product_config_gpu(m, block_r, l_bytes, rt_bytes)


def rank_product_config_gpu(m, block_r, l_bytes, rt_bytes):
    """Row blocks of 64 for a 16-bit L with fp32 Rt up to rank block 32 (one
    warpgroup's rows, so that sm_90 runs the product as wgmma; M = 8192 gives 128
    programs for 132 SMs; with 32 rows the masked pass with fp32 adapters was
    issue-bound on mma.sync). Row blocks of 32 otherwise: 64 rows of an fp32 L,
    of rank block 64 and more, or of a 16-bit Rt (128 deep, unaligned) keep
    16-1480 bytes a thread in the stack frame (masked builds). BLOCK_K is the largest
    (of 128, 64, 32) whose Rt tile stays within 32 KiB, so that 3 or 4 stages
    fit; the accumulator is 32 x BLOCK_R fp32: from rank block 128, 8 warps
    (32 registers a thread at 256), as 4 put the masked builds in the stack
    frame (8-168 bytes a thread on sm_90). fp32 x at rank block 256 steps 16
    deep (the FMA product holds its operands in registers: 32 deep keeps 8
    bytes a thread on the stack, on sm_80 and sm_90)."""
    block_m = 64 if l_bytes == 2 and rt_bytes > l_bytes and block_r <= 32 else 32
    block_k = 128
    while block_k > 32 and block_k * block_r * rt_bytes > 32 * 1024:
        block_k //= 2
    if l_bytes >= 4 and block_r >= 256:
        block_k = 16
    if rt_bytes > l_bytes:
        # a 16-bit L with fp32 Rt: Rt's three exact parts (``mixed_mma``) live in
        # registers beside the tile; 128 deep spills 8 bytes a thread on sm_90
        block_k = min(block_k, 64)
    cfg = RankConfig(block_m, block_k, num_warps=8 if block_r >= 128 else 4, num_stages=4)
    return fit_stages(cfg, block_k * (block_m * l_bytes + block_r * rt_bytes))


def rank_product_candidates(l_bytes, rt_bytes):
    """Every (config, rank block) pair the launcher can pick on a GPU."""
    pairs = {(rank_product_config_gpu(m, block_r, l_bytes, rt_bytes), block_r)
             for block_r in RANK_BLOCKS for m in (1, 8192)}  # m: one table for all M
    return sorted(pairs, key=repr)


def rank_product(lhs, rhs_t, out_dtype, scale=1.0, *, dropout_p=0.0, seed=0):
    """out[M, R] = scale * (lhs * keep) @ rhs_t, in ``out_dtype``.

    lhs (M, K) and rhs_t (K, R) may have any strides; the keep-mask of element
    (m, k) of lhs (dropout.py) is applied when dropout_p > 0.
    """
    m, k = lhs.shape
    r = rhs_t.shape[1]
    out = empty((m, r), out_dtype, lhs.device)
    if m == 0 or r == 0:
        return out
    block_r = rank_block(r)
    cfg = rank_product_config(m, block_r, lhs.element_size(), rhs_t.element_size())
    grid = (triton.cdiv(m, cfg.block_m),)
    threshold = dropout_threshold(dropout_p)
    with launching("rank_product"):
        _rank_product_kernel[grid](
            lhs, rhs_t, out,
            m, k, r,
            lhs.stride(0), lhs.stride(1), rhs_t.stride(0), rhs_t.stride(1),
            out.stride(0), out.stride(1),
            float(scale), threshold, seed,
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            HAS_DROPOUT=threshold > 0, UPCAST_DOT=INTERPRET,
            DOT_PRECISION=mixed_precision(lhs.dtype, rhs_t.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out
