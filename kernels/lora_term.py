"""The LoRA term alone: the C operand of the ``cublas`` strategy.

Shapes: P (M, R), Q (R, N), bias (N), any strides:

    out = c * ((P @ Q) * m) + bias          (M, N), in the base dtype

with m the dropout keep-mask of (row, output column), or none. The ``cublas``
strategy lets torch's matmul do the big products and adds the LoRA term as the
GEMM's C operand (beta = 1), so cuBLAS reads it once in its epilogue:

    forward  y0  = b + s * h @ B^T                 P = h, Q = B^T, c = s, no mask
             y   = addmm(y0, x, W^T)
    dX       dX0 = (s / (1 - p_eff)) * (G @ A) * m   P = G, Q = A, mask over (row, in-feature)
             dX  = addmm(dX0, dY, W)

h and G come from the same rank passes as the ``fused`` strategy's, and the
mask is the same function of (seed, row, column) (dropout.py), so both
strategies drop the same elements. ``lora_term_tile`` is the math of the term
for one output tile; the fused GEMM (lora_gemm.py) adds the same tile in its
epilogue. The product over the rank runs in the promoted dtype of P and Q
(fp32 with fp32 adapters), accumulates in fp32, and out is rounded once on
store. The fused GEMM rounds its term and bias the same way before adding
them to x W^T (``store_base_plus_term``), so the strategies agree.

The kernel is bound by writing out (M x N in the base dtype); P and Q are
small and stay in L2.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, empty, grouped_tile, launching, mma, promote_pair,
                      rank_block, term_precision, to_storage)
from .dropout import dropout_keep_tile, dropout_threshold


@triton.jit
def lora_term_tile(
    p_ptr, q_ptr, R, stride_pm, stride_pr, stride_qr, stride_qn,
    offs_m, offs_n, in_m, in_n, col_start, lora_scale, threshold, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, RANK_DOT_PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile of c * (P @ Q) * m for rows offs_m and
    columns offs_n (starting at col_start, a multiple of 8)."""
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    term = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        rs = r0 + offs_r
        in_r = rs < R
        p = tl.load(p_ptr + rows[:, None] * stride_pm + rs[None, :] * stride_pr,
                    mask=in_m[:, None] & in_r[None, :], other=0.0)
        q = tl.load(q_ptr + rs[:, None] * stride_qr + cols[None, :] * stride_qn,
                    mask=in_r[:, None] & in_n[None, :], other=0.0)
        p, q = promote_pair(p, q)
        term = mma(p, q, term, UPCAST_DOT, RANK_DOT_PRECISION)
    return scaled_and_masked(term, offs_m, col_start, lora_scale, threshold, seed, BLOCK_N,
                             HAS_DROPOUT)


@triton.jit
def scaled_and_masked(term, offs_m, col_start, lora_scale, threshold, seed,
                      BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """c * term * m for an fp32 product tile of the rank term."""
    term = term * lora_scale
    if HAS_DROPOUT:
        keep = dropout_keep_tile(seed, offs_m, col_start, threshold, BLOCK_N)
        term = tl.where(keep, term, 0.0)
    return term


@triton.jit
def _lora_term_kernel(
    # pointers
    p_ptr, q_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, R,
    # strides
    stride_pm, stride_pr, stride_qr, stride_qn, stride_bias, stride_om, stride_on,
    # scalars
    lora_scale, threshold, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, RANK_DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N

    out = lora_term_tile(p_ptr, q_ptr, R, stride_pm, stride_pr, stride_qr, stride_qn,
                         offs_m, offs_n, in_m, in_n, pid_n * BLOCK_N, lora_scale, threshold,
                         seed, BLOCK_M, BLOCK_N, BLOCK_R, HAS_DROPOUT, UPCAST_DOT,
                         RANK_DOT_PRECISION)
    store_with_bias(out, bias_ptr, out_ptr, stride_bias, stride_om, stride_on, offs_m, offs_n,
                    in_m, in_n, HAS_BIAS, UPCAST_DOT)


@triton.jit
def with_bias(tile, bias_ptr, stride_bias, offs_n, in_n, HAS_BIAS: tl.constexpr):
    """An fp32 tile plus the bias of its columns."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=in_n, other=0.0)
        tile = tile + bias.to(tl.float32)[None, :]
    return tile


@triton.jit
def store_tile(tile, out_ptr, stride_om, stride_on, offs_m, offs_n, in_m, in_n,
               UPCAST_DOT: tl.constexpr):
    """An fp32 tile rounded once to out's dtype, stored."""
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om
             + offs_n.to(tl.int64)[None, :] * stride_on,
             to_storage(tile, out_ptr.dtype.element_ty, UPCAST_DOT),
             mask=in_m[:, None] & in_n[None, :])


@triton.jit
def store_with_bias(acc, bias_ptr, out_ptr, stride_bias, stride_om, stride_on, offs_m, offs_n,
                    in_m, in_n, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """out = acc + bias for an fp32 output tile, rounded once to out's dtype."""
    store_tile(with_bias(acc, bias_ptr, stride_bias, offs_n, in_n, HAS_BIAS), out_ptr,
               stride_om, stride_on, offs_m, offs_n, in_m, in_n, UPCAST_DOT)


@triton.jit
def store_base_plus_term(acc, term, bias_ptr, out_ptr, stride_bias, stride_om, stride_on,
                         offs_m, offs_n, in_m, in_n, HAS_BIAS: tl.constexpr,
                         UPCAST_DOT: tl.constexpr):
    """out = acc + round(term + bias), rounded once to out's dtype.

    The LoRA term and the bias are rounded to out's dtype before the base
    product's fp32 accumulator takes them, as the ``cublas`` strategy's C
    operand is (cuBLAS adds C to its fp32 accumulator and rounds once): both
    strategies then give the same value at every batch size, overflow
    included. For an fp32 out the extra rounding is the identity.
    """
    term = with_bias(term, bias_ptr, stride_bias, offs_n, in_n, HAS_BIAS)
    term = to_storage(term, out_ptr.dtype.element_ty, UPCAST_DOT).to(tl.float32)
    store_tile(acc + term, out_ptr, stride_om, stride_on, offs_m, offs_n, in_m, in_n,
               UPCAST_DOT)


@dataclass(frozen=True)
class TermConfig:
    block_m: int
    block_n: int
    num_warps: int
    group_m: int = 8
    num_stages: int = 1  # nothing to pipeline: one pass over the rank


TERM_INTERPRET = TermConfig(16, 32, num_warps=1, group_m=2)
# The whole rank in one chunk: wide rows, each program writing 32 x 256 outputs
# (16 KiB in a 16-bit dtype), the mask's cost spread over the widest rows
# (bench/NOTES.md: dX's term 27.3 us against 30.0 at 64 x 128, r = 16).
TERM_ONE_CHUNK = TermConfig(32, 256, num_warps=4)
# Several rank chunks (r > 64, or > 32 in fp32): the Q tiles are re-read per
# chunk, and 64 x 128 tiles read half as much of Q per output (r = 128: 29.9
# against 40.1 us)
TERM_CHUNKED = TermConfig(64, 128, num_warps=4)
# the rank chunks of the LoRA term, here and in the fused GEMM's epilogue
RANK_BLOCKS = (16, 32, 64)


def widest_rank_block(pq_bytes):
    """The widest rank chunk: 64, or 32 for fp32 P and Q, so that the P and Q
    tiles stay small next to the output tile's accumulators."""
    return 64 if pq_bytes <= 2 else 32


def epilogue_rank_block(rank, pq_bytes):
    """The rank chunk for a rank: the padded rank, at most the widest."""
    return min(rank_block(rank), widest_rank_block(pq_bytes))


def lora_term_config(rank, pq_bytes):
    if INTERPRET:
        return TERM_INTERPRET
    return lora_term_config_gpu(rank, pq_bytes)


def lora_term_config_gpu(rank, pq_bytes):
    one_chunk = rank_block(rank) <= widest_rank_block(pq_bytes)
    return TERM_ONE_CHUNK if one_chunk else TERM_CHUNKED


def lora_term_candidates(pq_bytes):
    """Every (config, rank block) pair the launcher can pick on a GPU."""
    widest = widest_rank_block(pq_bytes)
    return ([(TERM_ONE_CHUNK, block_r) for block_r in RANK_BLOCKS if block_r <= widest]
            + [(TERM_CHUNKED, widest)])


def lora_term(p, q, bias, lora_scale, out_dtype, *, dropout_p=0.0, seed=0):
    """out[M, N] = lora_scale * ((p @ q) * keep) + bias, in ``out_dtype``.

    p (M, R), q (R, N), bias (N) or None, any strides. With dropout_p > 0 the
    term is masked by the keep-mask of element (m, n) (dropout.py).
    """
    m, n, r = p.shape[0], q.shape[1], p.shape[1]
    out = empty((m, n), out_dtype, p.device)
    if m == 0 or n == 0:
        return out
    pq_dtype = torch.promote_types(p.dtype, q.dtype)
    block_r = epilogue_rank_block(r, pq_dtype.itemsize)
    cfg = lora_term_config(r, pq_dtype.itemsize)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    has_bias = bias is not None
    threshold = dropout_threshold(dropout_p)
    with launching("lora_term"):
        _lora_term_kernel[grid](
            p, q, bias if has_bias else out, out,
            m, n, r,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1),
            bias.stride(0) if has_bias else 0, out.stride(0), out.stride(1),
            float(lora_scale), threshold, seed,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, GROUP_M=cfg.group_m,
            HAS_BIAS=has_bias, HAS_DROPOUT=threshold > 0, UPCAST_DOT=INTERPRET,
            RANK_DOT_PRECISION=term_precision(pq_dtype, out.dtype, block_r),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out
