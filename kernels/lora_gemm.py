"""The GEMM with a LoRA epilogue: the layer's forward y and backward dX.

Shapes: L (M, K), Rt (K, N), P (M, R), Q (R, N), bias (N), any strides:

    out = L @ Rt + bias + c * ((P @ Q) * m)          (M, N)

with m the dropout keep-mask of (row, output column), or none. The two big
products of the layer have this shape (h and G come from the rank pass):

    forward  y  = x @ W^T + b + s * h @ B^T
             L = x, Rt = W^T, P = h, Q = B^T, c = s, no mask
    dX       dX = dY @ W + (s / (1 - p_eff)) * (G @ A) * m
             L = dY, Rt = W, P = G, Q = A, c = s / (1 - p_eff), mask over (row, in-feature)

(h = (1 / (1 - p_eff)) * (x * m) @ A^T already holds the dropout scale, so the
forward's epilogue needs none; G = dY @ B does not, so dX's does.)

The main loop is a plain tiled GEMM -- no dropout and no rank work in it --
over BLOCK_M x BLOCK_N output tiles in grouped order (neighbouring programs
share Rt tiles in L2). The epilogue adds one small product over the rank,
in chunks of BLOCK_R (>= 16, masked), in the promoted dtype of P and Q: with
fp32 adapters P and Q stay fp32 (IEEE or TF32 as torch allows), so neither h
nor B is rounded to the base dtype. The mask is generated in the epilogue only,
once per output element (dX), one Philox call per 8 elements. Accumulation is
fp32; the term plus bias is rounded to out's dtype before it meets L @ Rt (as
the ``cublas`` strategy's C operand is, so both give the same bits, overflow
included) and out is rounded once, on store. The epilogue's term is
``lora_term_tile`` (lora_term.py), which the ``cublas`` strategy writes alone.

On sm_90 and later, with 16-bit L and Rt that TMA descriptors can describe
(``tma_operands``), the table takes the TMA build (``_lora_gemm_tma_kernel``):
the same tile, main loop and epilogue, its L and Rt tiles fetched by the
Tensor Memory Accelerator (Rt read as stored: W for dX, W^T's storage W,
transposed in shared memory, for the forward). The pointer build stays a
tuner candidate, and runs everywhere else.

Decode (M <= 16): the forward's rank pass would be a launch of its own for a
few rows, as long as the GEMM streaming W. There the GEMM makes h itself
(RANK_IN_KERNEL): after the main loop each program computes
h = (1 / (1 - p_eff)) (x * m) A^T for its rows with the rank pass's code
(``rank_tile``; the mask on x, in that loop, not the main loop), rounds it as
the rank pass stores it, and program column 0 writes it for the backward.
Every column block recomputes it: 2 M K R flops and M K mask elements per
block, against a launch saved.
"""
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, TensorDescriptor, dot_precision, empty, fit_stages,
                      grouped_tile, launching, mma, promote_pair, rank_block, tma_ready,
                      to_storage)
from .dropout import dropout_threshold
from .lora_term import (RANK_BLOCKS, epilogue_rank_block, lora_term_tile,
                        scaled_and_masked, store_base_plus_term, widest_rank_block)
from .rank_product import rank_tile


@triton.jit
def _lora_gemm_kernel(
    # pointers
    l_ptr, rt_ptr, p_ptr, q_ptr, pr_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_lm, stride_lk, stride_rk, stride_rn, stride_pm, stride_pr, stride_qr, stride_qn,
    stride_prk, stride_prr, stride_bias, stride_om, stride_on,
    # scalars
    lora_scale, rank_scale, threshold, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RANK_DOT_PRECISION: tl.constexpr,
    RANK_IN_KERNEL: tl.constexpr, RANK_DROPOUT: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    in_m = offs_m < M
    in_n = offs_n < N

    # ---- main loop: L @ Rt, nothing else
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)  # a transposed x or dY has a large stride along K
        in_k = ks < K
        lhs = tl.load(l_ptr + rows[:, None] * stride_lm + ks[None, :] * stride_lk,
                      mask=in_m[:, None] & in_k[None, :], other=0.0)
        rhs = tl.load(rt_ptr + ks[:, None] * stride_rk + cols[None, :] * stride_rn,
                      mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = mma(lhs, rhs, acc, UPCAST_DOT, DOT_PRECISION)

    # ---- epilogue: c * (P @ Q) * m over the rank, in P and Q's promoted dtype
    if RANK_IN_KERNEL:
        term = _rank_term_in_kernel(
            l_ptr, pr_ptr, p_ptr, q_ptr, K, R, stride_lm, stride_lk, stride_prk, stride_prr,
            stride_pm, stride_pr, stride_qr, stride_qn, offs_m, offs_n, in_m, in_n,
            pid_n * BLOCK_N, rank_scale, lora_scale, threshold, seed, BLOCK_M, BLOCK_N, BLOCK_K,
            BLOCK_R, HAS_DROPOUT, RANK_DROPOUT, UPCAST_DOT, RANK_DOT_PRECISION)
    else:
        term = lora_term_tile(p_ptr, q_ptr, R, stride_pm, stride_pr, stride_qr, stride_qn,
                              offs_m, offs_n, in_m, in_n, pid_n * BLOCK_N, lora_scale,
                              threshold, seed, BLOCK_M, BLOCK_N, BLOCK_R, HAS_DROPOUT,
                              UPCAST_DOT, RANK_DOT_PRECISION)
    store_base_plus_term(acc, term, bias_ptr, out_ptr, stride_bias, stride_om, stride_on,
                         offs_m, offs_n, in_m, in_n, HAS_BIAS, UPCAST_DOT)


@triton.jit
def _lora_gemm_tma_kernel(
    # tensor descriptors (TMA): L (M, K); Rt as (K, N), or as its transpose (N, K)
    l_desc, rt_desc,
    # pointers
    p_ptr, q_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_pm, stride_pr, stride_qr, stride_qn, stride_bias, stride_om, stride_on,
    # scalars
    lora_scale, threshold, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, RT_TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RANK_DOT_PRECISION: tl.constexpr,
):
    """The same GEMM with its operand tiles fetched by the Tensor Memory
    Accelerator (sm_90+): no address arithmetic or bounds masks in the main
    loop (the TMA unit fills out-of-range rows and columns with zeros), the
    registers left to the accumulators."""
    pid_m, pid_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        lhs = l_desc.load([row0, k0])
        if RT_TRANSPOSED:
            rhs = rt_desc.load([col0, k0]).T
        else:
            rhs = rt_desc.load([k0, col0])
        acc = mma(lhs, rhs, acc, UPCAST_DOT, DOT_PRECISION)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    term = lora_term_tile(p_ptr, q_ptr, R, stride_pm, stride_pr, stride_qr, stride_qn,
                          offs_m, offs_n, in_m, in_n, col0, lora_scale, threshold, seed,
                          BLOCK_M, BLOCK_N, BLOCK_R, HAS_DROPOUT, UPCAST_DOT, RANK_DOT_PRECISION)
    store_base_plus_term(acc, term, bias_ptr, out_ptr, stride_bias, stride_om, stride_on,
                         offs_m, offs_n, in_m, in_n, HAS_BIAS, UPCAST_DOT)


@triton.jit
def _rank_term_in_kernel(
    l_ptr, pr_ptr, p_ptr, q_ptr, K, R, stride_lm, stride_lk, stride_prk, stride_prr,
    stride_pm, stride_pr, stride_qr, stride_qn, offs_m, offs_n, in_m, in_n, col_start,
    rank_scale, lora_scale, threshold, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr, RANK_DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, RANK_DOT_PRECISION: tl.constexpr,
):
    """Decode's rank term without a rank pass: P = rank_scale * (L * m) @ PR for
    this program's rows (all of the rank, R <= BLOCK_R), rounded to P's dtype as
    the rank pass stores it, written by the first column block (the backward
    reads it), and multiplied by Q here. Every column block recomputes it: at a
    few rows that is a few MFLOP against the launch it saves."""
    p = rank_tile(l_ptr, pr_ptr, K, R, stride_lm, stride_lk, stride_prk, stride_prr,
                  offs_m, in_m, threshold, seed, BLOCK_M, BLOCK_K, BLOCK_R, RANK_DROPOUT,
                  UPCAST_DOT, RANK_DOT_PRECISION)
    term = stored_rank_times_q(p, p_ptr, q_ptr, R, stride_pm, stride_pr, stride_qr, stride_qn,
                               offs_m, offs_n, in_m, in_n, col_start, rank_scale, BLOCK_M,
                               BLOCK_N, BLOCK_R, UPCAST_DOT, RANK_DOT_PRECISION)
    return scaled_and_masked(term, offs_m, col_start, lora_scale, threshold, seed, BLOCK_N,
                             HAS_DROPOUT)


@triton.jit
def stored_rank_times_q(p, p_ptr, q_ptr, R, stride_pm, stride_pr, stride_qr, stride_qn,
                        offs_m, offs_n, in_m, in_n, col_start, rank_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """A decode forward's rank product, fp32 ``p`` (BLOCK_M, BLOCK_R), made h:
    rounded to P's dtype after ``rank_scale`` as the rank pass stores it, written by
    the first column block (the backward reads it); returns the fp32 h @ Q tile."""
    p = to_storage(p * rank_scale, p_ptr.dtype.element_ty, UPCAST_DOT)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    if col_start == 0:
        # a branch, not a scalar in the mask: interpreters from triton 3.9 refuse a
        # mask that mixes a block with a scalar condition
        rows = offs_m.to(tl.int64)
        tl.store(p_ptr + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr, p,
                 mask=in_m[:, None] & in_r[None, :])
    q = tl.load(q_ptr + offs_r[:, None] * stride_qr + offs_n.to(tl.int64)[None, :] * stride_qn,
                mask=in_r[:, None] & in_n[None, :], other=0.0)
    p, q = promote_pair(p, q)
    return mma(p, q, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST_DOT, PRECISION)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    tma: bool = False  # operand tiles by TMA descriptors (_lora_gemm_tma_kernel)


GEMM_INTERPRET = GemmConfig(16, 32, 32, num_warps=1, num_stages=1, group_m=2)
GEMM_INTERPRET_TMA = replace(GEMM_INTERPRET, tma=True)
DECODE_M = 16  # the token counts of GEMM_DECODE
GEMM_DECODE = GemmConfig(16, 32, 128, num_warps=4, num_stages=4)
GEMM_SMALL_M = GemmConfig(64, 64, 64, num_warps=4, num_stages=4)
GEMM_LARGE_M = GemmConfig(128, 128, 64, num_warps=8, num_stages=4)
# fp32 operands: half the K depth, so that a stage costs what a 16-bit one does
GEMM_LARGE_M_FP32 = GemmConfig(128, 128, 32, num_warps=8, num_stages=4)
# What the tuner times beside the table's choice at large M: narrower tiles
# leave more programs for the SMs when N is small and keep fewer accumulators
# per thread; same K depth (half for fp32 operands) and stages as the table's
GEMM_LARGE_M_ALTERNATIVES = (GemmConfig(128, 64, 64, num_warps=4, num_stages=4),
                             GemmConfig(64, 128, 64, num_warps=4, num_stages=4))
# fp32 operands with IEEE products (torch's default for fp32 matmuls) run on the
# FMA pipes with their operand fragments in registers: 128 x 128 x 32 keeps 72-80
# bytes a thread on the stack at 8 warps, the 4-warp alternatives 8-16, and 128 x
# 64 at 8 warps 8 on sm_80 (rank block 32); 64 x 128 at 8 warps keeps none on sm_80
# and sm_90 (bench/NOTES.md). No alternative: the tuner times it against cublas
GEMM_LARGE_M_FP32_IEEE = GemmConfig(64, 128, 32, num_warps=8, num_stages=4)
# sm_90 and later, 16-bit operands aligned for TMA (``tma_operands``): the
# table's tile with its operand tiles fetched by the TMA unit. 128 x 256 tiles
# would halve the L2 traffic per flop but keep 296-1248 bytes of registers on
# the stack at 8 or 16 warps with triton 3.7.1, and so does the fp32 build with
# IEEE products (bench/NOTES.md): neither is offered
GEMM_LARGE_M_TMA = replace(GEMM_LARGE_M, tma=True)


def lora_gemm_config(m, l_bytes, block_r, pq_bytes, tma=False, ieee=False):
    """The table's config. Under the interpreter one small tile, in its TMA
    build where a GPU would take one for 16-bit operands, at any M past
    decode (so the small shapes of the tests reach it)."""
    if INTERPRET:
        return GEMM_INTERPRET_TMA if _tma_build(m > DECODE_M, l_bytes, tma) else GEMM_INTERPRET
    return lora_gemm_config_gpu(m, l_bytes, block_r, pq_bytes, tma, ieee)


def _tma_build(large_m, l_bytes, tma):
    return tma and large_m and l_bytes <= 2


def _fitted(cfg, l_bytes, block_r, pq_bytes):
    stage = (cfg.block_m + cfg.block_n) * cfg.block_k * l_bytes
    cfg = fit_stages(cfg, stage)
    epilogue = (cfg.block_m + cfg.block_n) * block_r * pq_bytes
    assert epilogue <= cfg.num_stages * stage, (cfg, block_r, pq_bytes)
    return cfg


def lora_gemm_config_gpu(m, l_bytes, block_r, pq_bytes, tma=False, ieee=False):
    """Tiles by token count M; as many stages of the L and Rt tiles as fit.
    The epilogue's P (BLOCK_M x BLOCK_R) and Q (BLOCK_R x BLOCK_N) tiles reuse
    the pipeline's shared memory once the main loop is done (the compiled
    kernels need stages x stage bytes, nothing more), so they count only when
    larger than the pipeline. With ``tma`` (sm_90+, operands that allow it)
    large M in a 16-bit dtype takes the TMA build of the same tile; with
    ``ieee`` (fp32 operands, IEEE products) large M takes a narrower tile."""
    if m <= DECODE_M:
        cfg = GEMM_DECODE
    elif m <= 128:
        cfg = GEMM_SMALL_M
    elif l_bytes >= 4:
        cfg = GEMM_LARGE_M_FP32_IEEE if ieee else GEMM_LARGE_M_FP32
    else:
        cfg = GEMM_LARGE_M_TMA if _tma_build(True, l_bytes, tma) else GEMM_LARGE_M
    return _fitted(cfg, l_bytes, block_r, pq_bytes)


def lora_gemm_tuning_configs(m, l_bytes, block_r, pq_bytes, tma=False, ieee=False):
    """The configs the tuner may time for M tokens: the table's choice first;
    at large M on a GPU, the alternatives too (fitted to shared memory), the
    pointer build of the table's tile among them when the TMA one leads."""
    if INTERPRET:
        configs = [lora_gemm_config(m, l_bytes, block_r, pq_bytes, tma)]
        return configs + ([GEMM_INTERPRET] if configs[0].tma else [])
    return _gpu_tuning_configs(m, l_bytes, block_r, pq_bytes, tma, ieee)


def lora_gemm_candidates(l_bytes, pq_bytes, tma=False, ieee=False):
    """Every (config, rank block) pair the launcher can pick on a GPU, the
    tuner's alternatives included: the pointer builds, or with ``tma`` the
    TMA builds (sm_90+); ``ieee``: for IEEE products of fp32 operands."""
    pairs = {(cfg, block_r)
             for block_r in RANK_BLOCKS if block_r <= widest_rank_block(pq_bytes)
             for m in (1, 128, 8192)
             for cfg in _gpu_tuning_configs(m, l_bytes, block_r, pq_bytes, tma, ieee)
             if cfg.tma == tma}
    return sorted(pairs, key=repr)


def _gpu_tuning_configs(m, l_bytes, block_r, pq_bytes, tma=False, ieee=False):
    chosen = lora_gemm_config_gpu(m, l_bytes, block_r, pq_bytes, tma, ieee)
    if m <= 128:
        return [chosen]
    if l_bytes >= 4 and ieee:
        alternatives = []
    else:
        alternatives = [replace(cfg, block_k=cfg.block_k // 2) if l_bytes >= 4 else cfg
                        for cfg in GEMM_LARGE_M_ALTERNATIVES]
    if chosen.tma:
        alternatives.insert(0, replace(chosen, tma=False))
    return [chosen] + [_fitted(cfg, l_bytes, block_r, pq_bytes) for cfg in alternatives]


def config_name(cfg):
    """A config as the tuner names it, e.g. ``128x128x64:w8:s4`` (``:tma`` added
    for the TMA build)."""
    name = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}:w{cfg.num_warps}:s{cfg.num_stages}"
    return name + (":tma" if cfg.tma else "")


def tma_operands(lhs, rhs_t):
    """(rt, transposed) when lhs (M, K) and rhs_t (K, N) can be read through TMA
    descriptors: rt is rhs_t itself (N contiguous, dX's W) or its transpose
    (K contiguous: the forward's W^T read as W); None when either cannot."""
    if not tma_ready(lhs):
        return None
    if tma_ready(rhs_t):
        return rhs_t, False
    if tma_ready(rhs_t.t()):
        return rhs_t.t(), True
    return None


def rank_in_kernel(m, n, rank, pq_bytes):
    """Whether a forward of M tokens onto N outputs makes h inside the GEMM (no
    rank pass): decode, where the rank pass's own launch would cost as much as
    the GEMM's rank work many times over, and the whole rank fits one epilogue
    chunk (and N > 0: some program must write h)."""
    return (m <= DECODE_M and n > 0
            and rank_block(rank) == epilogue_rank_block(rank, pq_bytes))


def lora_gemm(lhs, rhs_t, p, q, bias, lora_scale, *, dropout_p=0.0, seed=0, config=None,
              rank_rt=None, rank_scale=1.0, rank_dropout_p=0.0):
    """out[M, N] = lhs @ rhs_t + bias + lora_scale * ((p @ q) * keep), in lhs's dtype.

    lhs (M, K), rhs_t (K, N), p (M, R), q (R, N), bias (N) or None, any strides.
    With dropout_p > 0 the rank term is masked by the keep-mask of element
    (m, n) (dropout.py): dX's mask over x's (row, in-feature). ``config`` (one
    of ``lora_gemm_tuning_configs``) overrides the table's choice.

    With ``rank_rt`` (K, R) given, p is an output: the kernel fills it with
    rank_scale * (lhs * keep) @ rank_rt (keep: the mask of lhs's elements at
    rank_dropout_p) and uses it, as the forward's rank pass would have
    (``rank_in_kernel`` says when that pays).
    """
    if dropout_p > 0 and rank_dropout_p > 0:
        raise ValueError("lora_gemm masks either the rank term's output (dropout_p) or "
                         "its input (rank_dropout_p), not both")
    m, k = lhs.shape
    n, r = rhs_t.shape[1], p.shape[1]
    out = empty((m, n), lhs.dtype, lhs.device)
    in_kernel = rank_rt is not None
    if in_kernel and n == 0:
        raise ValueError("the rank product in the GEMM needs N > 0: some program writes h")
    if m == 0 or n == 0:
        return out
    pq_dtype = torch.promote_types(p.dtype, q.dtype)
    pq_bytes = pq_dtype.itemsize
    block_r = epilogue_rank_block(r, pq_bytes)
    if in_kernel and block_r < r:
        raise ValueError(f"rank {r} does not fit one epilogue chunk of {block_r}")
    ieee = dot_precision(lhs.dtype) == "ieee"
    cfg = config or lora_gemm_config(m, lhs.element_size(), block_r, pq_bytes, ieee=ieee)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    has_bias = bias is not None
    threshold = dropout_threshold(max(dropout_p, rank_dropout_p))
    if cfg.tma:
        _launch_tma(cfg, grid, lhs, rhs_t, p, q, bias, out, lora_scale, threshold, seed,
                    block_r, pq_dtype, in_kernel)
        return out
    with launching("lora_gemm"):
        _lora_gemm_kernel[grid](
            lhs, rhs_t, p, q, rank_rt if in_kernel else p, bias if has_bias else out, out,
            m, n, k, r,
            lhs.stride(0), lhs.stride(1), rhs_t.stride(0), rhs_t.stride(1),
            p.stride(0), p.stride(1), q.stride(0), q.stride(1),
            rank_rt.stride(0) if in_kernel else 0, rank_rt.stride(1) if in_kernel else 0,
            bias.stride(0) if has_bias else 0, out.stride(0), out.stride(1),
            float(lora_scale), float(rank_scale), threshold, seed,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            GROUP_M=cfg.group_m, HAS_BIAS=has_bias, HAS_DROPOUT=dropout_p > 0,
            UPCAST_DOT=INTERPRET, DOT_PRECISION=dot_precision(lhs.dtype),
            RANK_DOT_PRECISION=dot_precision(pq_dtype),
            RANK_IN_KERNEL=in_kernel, RANK_DROPOUT=in_kernel and rank_dropout_p > 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def _launch_tma(cfg, grid, lhs, rhs_t, p, q, bias, out, lora_scale, threshold, seed, block_r,
                pq_dtype, in_kernel):
    operands = tma_operands(lhs, rhs_t)
    if TensorDescriptor is None or in_kernel or operands is None:
        why = ("this Triton has no tensor descriptors" if TensorDescriptor is None else
               "the decode GEMM that makes h is built without TMA" if in_kernel else
               f"TMA needs unit-stride rows, 16-byte aligned row strides and bases and no "
               f"empty dim: lhs {tuple(lhs.shape)} strides {lhs.stride()}, rhs_t "
               f"{tuple(rhs_t.shape)} strides {rhs_t.stride()}")
        raise ValueError(f"lora_gemm: config {config_name(cfg)} cannot run: {why}")
    rt, transposed = operands
    l_desc = TensorDescriptor.from_tensor(lhs, [cfg.block_m, cfg.block_k])
    rt_block = [cfg.block_n, cfg.block_k] if transposed else [cfg.block_k, cfg.block_n]
    rt_desc = TensorDescriptor.from_tensor(rt, rt_block)
    has_bias = bias is not None
    with launching("lora_gemm", "lora_gemm_tma"):
        _lora_gemm_tma_kernel[grid](
            l_desc, rt_desc, p, q, bias if has_bias else out, out,
            lhs.shape[0], out.shape[1], lhs.shape[1], p.shape[1],
            p.stride(0), p.stride(1), q.stride(0), q.stride(1),
            bias.stride(0) if has_bias else 0, out.stride(0), out.stride(1),
            float(lora_scale), threshold, seed,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            GROUP_M=cfg.group_m, RT_TRANSPOSED=transposed, HAS_BIAS=has_bias,
            HAS_DROPOUT=threshold > 0, UPCAST_DOT=INTERPRET,
            DOT_PRECISION=dot_precision(lhs.dtype), RANK_DOT_PRECISION=dot_precision(pq_dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
