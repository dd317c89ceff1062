"""LoRA backward, weight side: products that reduce over the M tokens.

Every weight gradient of the layer has the form  out = c * L^T @ Q  with L and
Q tall (M rows) and out small:

    dA^T = (s / (1 - p)) * (x * m)^T @ G      L = x (masked),  Q = G = dY @ B
    dB   = s * dY^T @ h                        L = dY,          Q = h = drop(x) @ A^T
    dW   = dY^T @ x       (only if W trains)   L = dY,          Q = x
    db   = sum over rows of dY                 the column sums of L = dY

so one kernel serves them all: a program owns a BLOCK_P x BLOCK_Q tile of out
and a slice of the M rows. When the output has too few tiles to fill the
device, the rows are split: each slice writes an fp32 partial of its tile,
then adds 1 to an int32 counter per tile (acq_rel, after a barrier, so every
thread's partial is visible first; the counters are zero at the start and
the slice that brings one to the number of slices sets it back to zero, so a
kept buffer serves every launch, ``arrival_counters``); that slice sums the
tile's partials in slice order and writes it in out's dtype. Deterministic (the
order of the sum is fixed, no float atomics) and inside the one launch: no
torch ops sum the partials afterwards. dA is written through transposed
strides, so A's (R, K) layout is filled directly.

In the layer's backward (lorakern/functional/fused_linear.py) it makes dA, and dW when W
trains; dB and db come from the one pass over dY (grad_output.py), which falls
back to this kernel when its partials would not fit.

dA with the grad-input's LoRA term (``term_rhs``, ``term_out``): the ``cublas``
strategy's dX0 = c * (G @ A) * m (lora_term.py) has dA's shape of rows and
columns (M x K), dA's scale and dA's mask, and dA's program already holds each G
tile and each mask tile. So the same program also writes

    dX0[rows, cols] = c * (G[rows] @ A[:, cols]) * m[rows, cols]      (M, K)

with A's column block loaded once before the loop and the whole rank in one
BLOCK_Q (one Q block), rounded once on store, as lora_term rounds it: one
launch reads x and writes dX0, and the mask is made once per element for both
(bench/NOTES.md: 37 + 28 us as two launches, fp32 adapters, 4096^2, M = 8192).

With fp32 adapters, G and h are fp32 (rank_product.py): the x or dY tile is
upcast and the product runs in fp32, as PEFT's does, so a 16-bit base never
rounds G or h (nor overflows fp16 in dB). The mask of dA is the forward's,
regenerated per (BLOCK_M x BLOCK_P) tile of x from the seed (dropout.py).
"""
import torch
import triton
import triton.language as tl

from dataclasses import dataclass

from ._common import (INTERPRET, arrival_counters, empty, launching, mixed_mma, mma,
                      mixed_precision, promote_pair, sum_partials, target_programs,
                      term_precision, to_storage)
from .dropout import dropout_keep_tile, dropout_threshold


@triton.jit
def _tn_matmul_kernel(
    # pointers (term_rhs: A, (Q, P); term: dX0, (M, P))
    l_ptr, q_ptr, out_ptr, colsum_ptr, part_ptr, colpart_ptr, counter_ptr,
    term_rhs_ptr, term_ptr,
    # sizes
    M, P, Q, rows_per_split,
    # strides
    stride_lm, stride_lp, stride_qm, stride_qq, stride_op, stride_oq, stride_cp,
    stride_aq, stride_ap, stride_tm, stride_tp,
    # scalars
    scale, threshold, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, SPLIT_M: tl.constexpr,
    HAS_TERM: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TERM_PRECISION: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_m = tl.arange(0, BLOCK_M)
    in_p = offs_p < P
    in_q = offs_q < Q
    # 64-bit offsets: M x P and M x Q operands are large, and may be transposed
    cols_p = offs_p.to(tl.int64)
    cols_q = offs_q.to(tl.int64)
    m_start = pid_s * rows_per_split
    m_end = min(M, m_start + rows_per_split)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    if HAS_TERM:  # A[:, cols]: the same for every row of the slice
        term_rhs = tl.load(term_rhs_ptr + offs_q.to(tl.int64)[:, None] * stride_aq
                           + cols_p[None, :] * stride_ap,
                           mask=in_q[:, None] & in_p[None, :], other=0.0)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + offs_m
        in_m = ms < m_end
        rows = ms.to(tl.int64)
        # L is read transposed, (BLOCK_P, BLOCK_M), so the dot needs no tl.trans
        l_t = tl.load(l_ptr + rows[None, :] * stride_lm + cols_p[:, None] * stride_lp,
                      mask=in_p[:, None] & in_m[None, :], other=0.0)
        if HAS_COLSUM:
            colsum += tl.sum(l_t.to(tl.float32), axis=1)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, ms, pid_p * BLOCK_P, threshold, BLOCK_P)
            l_t = tl.where(tl.trans(keep), l_t, 0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_qm + cols_q[None, :] * stride_qq,
                    mask=in_m[:, None] & in_q[None, :], other=0.0)
        acc = mixed_mma(l_t, q, acc, UPCAST_DOT, DOT_PRECISION)
        if HAS_TERM:
            g, a = promote_pair(q, term_rhs)
            term = mma(g, a, tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), UPCAST_DOT,
                       TERM_PRECISION) * scale
            if HAS_DROPOUT:
                term = tl.where(keep, term, 0.0)
            tl.store(term_ptr + rows[:, None] * stride_tm + cols_p[None, :] * stride_tp,
                     to_storage(term, term_ptr.dtype.element_ty, UPCAST_DOT),
                     mask=in_m[:, None] & in_p[None, :])

    if SPLIT_M:
        # fp32 partials (splits, P, Q) and (splits, P), contiguous; the last
        # slice to finish this tile sums them in slice order (deterministic)
        splits = tl.num_programs(2)
        tile = cols_p[:, None] * Q + cols_q[None, :]
        in_tile = in_p[:, None] & in_q[None, :]
        tl.store(part_ptr + pid_s * (P.to(tl.int64) * Q) + tile, acc, mask=in_tile)
        if HAS_COLSUM:
            tl.store(colpart_ptr + pid_s * P.to(tl.int64) + cols_p, colsum, mask=in_p)
        tl.debug_barrier()  # every thread's partial before the (release) count
        arrived = tl.atomic_add(counter_ptr + pid_p * tl.num_programs(1) + pid_q, 1,
                                sem="acq_rel")
        if arrived == splits - 1:
            tl.store(counter_ptr + pid_p * tl.num_programs(1) + pid_q, 0)  # for the next launch
            acc = sum_partials(part_ptr, tile, in_tile, splits, P.to(tl.int64) * Q)
            if HAS_COLSUM:
                colsum = sum_partials(colpart_ptr, cols_p, in_p, splits, P.to(tl.int64))
            _store_tile(out_ptr, colsum_ptr, acc * scale, colsum, cols_p, cols_q, in_p, in_q,
                        pid_q, stride_op, stride_oq, stride_cp, HAS_COLSUM, UPCAST_DOT)
    else:
        _store_tile(out_ptr, colsum_ptr, acc * scale, colsum, cols_p, cols_q, in_p, in_q,
                    pid_q, stride_op, stride_oq, stride_cp, HAS_COLSUM, UPCAST_DOT)


@triton.jit
def _store_tile(out_ptr, colsum_ptr, out, colsum, cols_p, cols_q, in_p, in_q, pid_q,
                stride_op, stride_oq, stride_cp, HAS_COLSUM: tl.constexpr,
                UPCAST_DOT: tl.constexpr):
    """out's tile in its dtype; the column sums from the first Q block only."""
    tl.store(out_ptr + cols_p[:, None] * stride_op + cols_q[None, :] * stride_oq,
             to_storage(out, out_ptr.dtype.element_ty, UPCAST_DOT),
             mask=in_p[:, None] & in_q[None, :])
    if HAS_COLSUM:
        if pid_q == 0:
            tl.store(colsum_ptr + cols_p * stride_cp,
                     to_storage(colsum, colsum_ptr.dtype.element_ty, UPCAST_DOT), mask=in_p)


@dataclass(frozen=True)
class TnConfig:
    block_m: int
    block_p: int
    block_q: int
    num_warps: int
    num_stages: int


def tn_config(rank_block, x_bytes):
    """Tiles for an output of width ``rank_block`` (dA^T, dB), or for dW (None),
    with operands of at most ``x_bytes`` per element.

    Rank-wide outputs take the whole padded rank as BLOCK_Q; dW tiles both sides.
    """
    if INTERPRET:
        return TnConfig(16, 16, rank_block or 32, num_warps=1, num_stages=1)
    return tn_config_gpu(rank_block, x_bytes)


def tn_config_gpu(rank_block, x_bytes):
    if rank_block is None:
        return TnConfig(32, 128, 128, num_warps=8, num_stages=3)
    if rank_block >= 128:
        # a 128 x 256 fp32 accumulator would spill: halve the P side; fp32
        # operand stages of that width would not fit sm_80's shared memory
        if x_bytes >= 4:
            return TnConfig(32, 64, rank_block, num_warps=8, num_stages=2)
        return TnConfig(64, 64, rank_block, num_warps=8, num_stages=3)
    # 4 warps spill at rank blocks of 64 with an IEEE fp32 product (fp32 adapters),
    # and with fp32 operands 3 stages keep 8 bytes a thread on sm_90's stack; 2 none
    stages = 2 if x_bytes >= 4 and rank_block >= 64 else 3
    return TnConfig(64, 128, rank_block, num_warps=8 if rank_block >= 64 else 4,
                    num_stages=stages)


def tn_term_config(rank_block, x_bytes):
    """Tiles of dA with the grad-input's LoRA term beside it (``TERM_RANK_BLOCKS``)."""
    if INTERPRET:
        return tn_config(rank_block, x_bytes)
    return tn_term_config_gpu(rank_block, x_bytes)


def tn_term_config_gpu(rank_block, x_bytes):
    """64 x 64 tiles of dX0 (and 64 x rank of dA): with fp32 G and A, 128 columns at
    4 warps keep 16-424 bytes a thread in the stack frame (sm_80; fp16 and fp32 x
    on sm_90), 32 rows are predicted 15% slower (bench/NOTES.md)."""
    return TnConfig(64, 64, rank_block, num_warps=4, num_stages=3)


def tn_candidates(x_bytes):
    """Every config the launcher can pick on a GPU (rank blocks and dW)."""
    return sorted({tn_config_gpu(b, x_bytes) for b in (16, 32, 64, 128, 256, None)}, key=repr)


def _split_rows(m, block_m, tiles, device):
    """Row slices so that tiles * slices roughly fills the device; slice length
    is a multiple of block_m."""
    wanted = max(1, min(triton.cdiv(target_programs(device), tiles), triton.cdiv(m, block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(max(m, 1), wanted), block_m) * block_m
    return triton.cdiv(max(m, 1), rows_per_split), rows_per_split


def tn_precision(lhs_dtype, rhs_dtype, block_q):
    """``mixed_precision``, but IEEE for a split past 16 columns: the fp32 operand's
    three parts of a 64- to 256-wide Q tile keep registers in the stack frame
    (80-320 bytes a thread, sm_80 and sm_90), and of a 32-wide one 8 bytes on sm_80
    (with dropout and the column sum); dA and dB at ranks up to 16 split."""
    precision = mixed_precision(lhs_dtype, rhs_dtype)
    return "ieee" if precision == "split" and block_q > 16 else precision


TERM_RANK_BLOCKS = (16, 32)  # tn_matmul writes the grad-input's term at these rank blocks


def term_fits(rank_block, rank_bytes):
    """Whether tn_matmul writes the grad-input's LoRA term beside dA at this rank
    block for G of ``rank_bytes`` per element: rank block 16, or 32 in 16 bits (fp32
    G and A at 32 keep 300-460 bytes a thread in the stack frame, sm_80 and sm_90)."""
    return rank_block == 16 or (rank_block in TERM_RANK_BLOCKS and rank_bytes <= 2)


def tn_matmul(lhs, rhs, out, scale, *, rank_block=None, colsum=None,
              dropout_p=0.0, seed=0, term_rhs=None, term_out=None):
    """out[P, Q] = scale * lhs[M, P]^T @ rhs[M, Q]; colsum[P] = lhs.sum(0) if given.

    ``out`` may be any strided (P, Q) view (dA is passed as A's grad transposed).
    With dropout_p > 0, lhs is masked by the keep-mask of element (m, p).
    With ``term_rhs`` (Q, P) and ``term_out`` (M, P) given (a rank block that
    ``term_fits``), the same launch also writes term_out = scale *
    (rhs @ term_rhs) * mask, rounded once to term_out's dtype.
    """
    m, p = lhs.shape
    q = rhs.shape[1]
    has_term = term_out is not None
    if has_term and (not term_fits(rank_block, rhs.element_size()) or q > rank_block
                     or term_rhs.shape != (q, p) or term_out.shape != (m, p)):
        raise ValueError(f"tn_matmul: a term needs term_rhs ({q}, {p}) and term_out ({m}, "
                         f"{p}) at a rank block >= {q} that term_fits (16; 32 for a "
                         f"16-bit G), got {tuple(term_rhs.shape)}, {tuple(term_out.shape)}, "
                         f"rank block {rank_block}, G {rhs.dtype}")
    if p == 0 or q == 0:
        out.zero_()
        if colsum is not None:
            colsum.copy_(lhs.sum(0, dtype=torch.float32))
        if has_term:
            term_out.zero_()
        return out
    operand_bytes = max(lhs.element_size(), rhs.element_size())
    cfg = (tn_term_config if has_term else tn_config)(rank_block, operand_bytes)
    grid_p, grid_q = triton.cdiv(p, cfg.block_p), triton.cdiv(q, cfg.block_q)
    splits, rows_per_split = _split_rows(m, cfg.block_m, grid_p * grid_q, lhs.device)
    has_colsum = colsum is not None
    f32, i32 = torch.float32, torch.int32
    if splits > 1:
        # fp32 partials per row slice and an int32 counter per output tile (zero)
        part = empty((splits, p, q), f32, lhs.device)
        colpart = empty((splits, p), f32, lhs.device) if has_colsum else part
        counter = arrival_counters(grid_p * grid_q, lhs.device)
    else:  # unused: one-element stand-ins of the same dtypes
        part = colpart = torch.empty(1, dtype=f32, device=lhs.device)
        counter = torch.empty(1, dtype=i32, device=lhs.device)
    threshold = dropout_threshold(dropout_p)
    term_rhs = term_rhs if has_term else out
    term_out = term_out if has_term else out
    term_dtype = torch.promote_types(rhs.dtype, term_rhs.dtype)
    with launching("tn_matmul"):
        _tn_matmul_kernel[(grid_p, grid_q, splits)](
            lhs, rhs, out, colsum if has_colsum else out, part, colpart, counter,
            term_rhs, term_out,
            m, p, q, rows_per_split,
            lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
            out.stride(0), out.stride(1), colsum.stride(0) if has_colsum else 0,
            term_rhs.stride(0), term_rhs.stride(1), term_out.stride(0), term_out.stride(1),
            float(scale), threshold, seed,
            BLOCK_M=cfg.block_m, BLOCK_P=cfg.block_p, BLOCK_Q=cfg.block_q,
            HAS_DROPOUT=threshold > 0, HAS_COLSUM=has_colsum, SPLIT_M=splits > 1,
            HAS_TERM=has_term, UPCAST_DOT=INTERPRET,
            DOT_PRECISION=tn_precision(lhs.dtype, rhs.dtype, cfg.block_q),
            TERM_PRECISION=term_precision(term_dtype, term_out.dtype, cfg.block_q),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out
