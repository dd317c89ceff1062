"""The backward's pass over dY: G, dB and db from one read of each element of dY.

Shapes: dY (M, N) with any strides, B (N, R), h (M, R) = drop(x) A^T (kept
from the forward), R any rank >= 1 (padded to BLOCK_R >= 16 and masked):

    G  = dY @ B              (M, R)   in the rank dtype (fp32 with fp32 adapters)
    dB = s * dY^T @ h        (N, R)   in B's dtype
    db = sum over rows of dY (N)      in the bias's dtype, when the bias trains

Each program owns BLOCK_M rows of dY and a group of columns, and walks the
group in BLOCK_N steps, loading each dY tile once:

    G rows   += tile @ B[cols]         accumulated in registers over the walk
    dB[cols]  = tile^T @ h[rows]       an fp32 partial per (row block, column block)
    db[cols]  = column sums of tile    an fp32 partial likewise

Cross-program sums, in a fixed order (deterministic; no float atomics):
- dB and db: with one row block the partials are the result and are stored
  directly. Otherwise each program writes its fp32 partials, then, once all of
  them are written, adds 1 to an int32 counter per column block (acq_rel; the
  counters are zero at the start, ``arrival_counters``); the program that
  brings a counter to the number of row blocks sets it back to zero for the
  next launch, sums that column block's partials in row-block order and writes
  dB and db in their dtypes. The counters are taken after the walk,
  so the walk is a loop with nothing nested and is pipelined like a GEMM's.
- G: with one column group G is stored from the registers. With several, each
  program writes its fp32 partial of G and the last program of a row block
  (a second set of counters) sums them in column-group order.

Partials, and when the pass is taken. At M = 8192, N = 4096, bf16 dY (64
MiB), 256-row blocks and 5 column groups (160 programs: at least one per SM
of an H100, as few as that takes): dB's and db's partials are 32 x N x
(BLOCK_R + 1) x 4 bytes = 8.5 MiB at R = 16 (17 MiB at R = 32), G's 5 x M x
BLOCK_R x 4 = 2.5 MiB (5 MiB). They
are written once and read back once, from L2 while they are still there, from
HBM at worst: the one pass moves at most dY + 2 x partials where two passes
move 2 x dY. So the launcher takes it while the partials stay within half of
dY's bytes (``PARTIAL_SHARE``, reckoned at a GPU's tiles) and for rank blocks
of 16 and 32 (``one_pass_fits``); the column groups are as many as give
each SM a program, within that budget. At R = 64 the partials would be 49 MiB (0.76 of
dY) and 256 x 64 tiles spill on sm_80, so G comes from the rank pass
(rank_product.py) and dB and db from tn_matmul (lora_grad_weights.py), as
before. fp32 products (fp32 dY or fp32 adapters) take 128-row blocks (the FMA
product holds its operands in registers), so their partials are twice the
share: with a 16-bit dY only rank block 16 fits once M > 128.

Predicted (bench.static, sm_90, 4096 x 4096, M = 8192, r = 16, bf16): 29.5
us for the pass (HBM bound; 30.0 at two programs per SM, with 8 column
groups' G partials), where the rank pass (25.5 us), tn_matmul (26.3 us) and
the torch sums and copies of its partials (13.3 us) took 65 us. The
counters are reset by the kernel itself, so no memset launch goes with it.

fp32 adapters on a 16-bit dY take the two passes: both products there are a 16-bit
operand against an fp32 one, three tensor-core products each (``_common.mixed_mma``),
and the one pass, holding both accumulators at 128-row blocks, is predicted at 75 us
(issue and mma.sync bound; 124 us with the products on the FMA pipes) where the rank
pass over dY and tn_matmul take about 26 + 28 us (HBM bound), same case.

Dtypes follow the rank pass: the products run in the promoted dtype of dY and
B (for G) and of dY and h (for dB), at fp32 accuracy with fp32 adapters (see
rank_product.py), on the tensor cores in dY's dtype otherwise; accumulation
is always fp32 and every output is rounded once, on store.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, arrival_counters, empty, fit_stages, launching, mixed_mma,
                      mixed_precision, rank_block, sum_partials, target_programs, to_storage)
from .lora_grad_weights import tn_matmul
from .rank_product import rank_product


@triton.jit
def _grad_output_kernel(
    # pointers
    dy_ptr, b_ptr, h_ptr, g_ptr, db_ptr, dbias_ptr, part_ptr, colpart_ptr, gpart_ptr,
    counter_ptr,
    # sizes
    M, N, R, cols_per_group,
    # strides
    stride_ym, stride_yn, stride_bn, stride_br, stride_hm, stride_hr, stride_gm, stride_gr,
    stride_dbn, stride_dbr, stride_dbias,
    # scalars
    scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NEED_G: tl.constexpr, HAS_COLSUM: tl.constexpr, SPLIT_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row_blocks = tl.cdiv(M, BLOCK_M)
    groups = tl.cdiv(N, cols_per_group)
    pid_m = tl.program_id(0) // groups
    pid_g = tl.program_id(0) % groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    in_m = offs_m < M
    in_r = offs_r < R
    all_r = offs_r < BLOCK_R
    rows = offs_m.to(tl.int64)
    n_start = pid_g * cols_per_group
    n_end = tl.minimum(N, n_start + cols_per_group)
    # the fp32 partials are (row blocks, N, BLOCK_R) and (row blocks, N), contiguous
    part_stride = N.to(tl.int64) * BLOCK_R
    part = part_ptr + pid_m * part_stride
    colpart = colpart_ptr + pid_m.to(tl.int64) * N

    h = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                mask=in_m[:, None] & in_r[None, :], other=0.0)
    g_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    # ---- the walk: each dY tile is loaded once and feeds G, dB and db
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < n_end
        cols = offs_n.to(tl.int64)  # a transposed dY has a large stride along N
        dy = tl.load(dy_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                     mask=in_m[:, None] & in_n[None, :], other=0.0)
        if NEED_G:
            b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=in_n[:, None] & in_r[None, :], other=0.0)
            g_acc = mixed_mma(dy, b, g_acc, UPCAST_DOT, DOT_PRECISION)
        d_b = mixed_mma(tl.trans(dy), h, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                        UPCAST_DOT, DOT_PRECISION)
        if SPLIT_M:
            tl.store(part + cols[:, None] * BLOCK_R + offs_r[None, :], d_b,
                     mask=in_n[:, None] & all_r[None, :])
        else:
            tl.store(db_ptr + cols[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                     to_storage(d_b * scale, db_ptr.dtype.element_ty, UPCAST_DOT),
                     mask=in_n[:, None] & in_r[None, :])
        if HAS_COLSUM:
            colsum = tl.sum(dy.to(tl.float32), axis=0)
            if SPLIT_M:
                tl.store(colpart + cols, colsum, mask=in_n)
            else:
                tl.store(dbias_ptr + cols * stride_dbias,
                         to_storage(colsum, dbias_ptr.dtype.element_ty, UPCAST_DOT), mask=in_n)

    # ---- G of these rows: stored, or an fp32 partial per column group
    if NEED_G:
        if groups == 1:
            tl.store(g_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                     to_storage(g_acc, g_ptr.dtype.element_ty, UPCAST_DOT),
                     mask=in_m[:, None] & in_r[None, :])
        else:
            gpart = gpart_ptr + pid_g * (M.to(tl.int64) * BLOCK_R)
            tl.store(gpart + rows[:, None] * BLOCK_R + offs_r[None, :], g_acc,
                     mask=in_m[:, None] & all_r[None, :])

    # ---- the last program to finish a block sums its partials, in a fixed order.
    # The barrier orders every thread's partial stores before the (release) count.
    tl.debug_barrier()
    col_blocks = tl.cdiv(N, BLOCK_N)
    if SPLIT_M:
        for n0 in range(n_start, n_end, BLOCK_N):
            arrived = tl.atomic_add(counter_ptr + n0 // BLOCK_N, 1, sem="acq_rel")
            if arrived == row_blocks - 1:
                tl.store(counter_ptr + n0 // BLOCK_N, 0)  # zero again for the next launch
                offs_n = n0 + tl.arange(0, BLOCK_N)
                in_n = offs_n < N
                cols = offs_n.to(tl.int64)
                d_b = sum_partials(part_ptr, cols[:, None] * BLOCK_R + offs_r[None, :],
                                   in_n[:, None] & all_r[None, :], row_blocks, part_stride)
                tl.store(db_ptr + cols[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                         to_storage(d_b * scale, db_ptr.dtype.element_ty, UPCAST_DOT),
                         mask=in_n[:, None] & in_r[None, :])
                if HAS_COLSUM:
                    colsum = sum_partials(colpart_ptr, cols, in_n, row_blocks, N.to(tl.int64))
                    tl.store(dbias_ptr + cols * stride_dbias,
                             to_storage(colsum, dbias_ptr.dtype.element_ty, UPCAST_DOT),
                             mask=in_n)
    if NEED_G:
        if groups > 1:
            row_counter = counter_ptr + pid_m  # after the column blocks' counters, if any
            if SPLIT_M:
                row_counter += col_blocks
            arrived = tl.atomic_add(row_counter, 1, sem="acq_rel")
            if arrived == groups - 1:
                tl.store(row_counter, 0)
                g = sum_partials(gpart_ptr, rows[:, None] * BLOCK_R + offs_r[None, :],
                                 in_m[:, None] & all_r[None, :], groups,
                                 M.to(tl.int64) * BLOCK_R)
                tl.store(g_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                         to_storage(g, g_ptr.dtype.element_ty, UPCAST_DOT),
                         mask=in_m[:, None] & in_r[None, :])


@dataclass(frozen=True)
class GradOutputConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# small tiles under the interpreter, so that tests reach several row blocks and groups
GRAD_OUTPUT_INTERPRET = GradOutputConfig(16, 16, num_warps=1, num_stages=1)
# the one pass is taken while its fp32 partials are at most this share of dY's
# bytes (written once, read back once: dY + 2 x partials <= 2 x dY)
PARTIAL_SHARE = 0.5
# rank blocks the one pass takes: G's accumulator and h's tile (BLOCK_M x BLOCK_R)
# stay resident through the walk; at 64, 256-row blocks spill on sm_80 and their
# partials would pass PARTIAL_SHARE anyway
RANK_BLOCKS = (16, 32)


def grad_output_config(block_r, dy_bytes, rank_bytes, aligned=True):
    if INTERPRET:
        return GRAD_OUTPUT_INTERPRET
    return grad_output_config_gpu(block_r, dy_bytes, rank_bytes, aligned)


def dy_aligned(dy):
    """Whether dY's launch gets Triton's 16-byte specialization (16-byte aligned
    base, unit column stride, a row stride that is a multiple of 16): loads of
    16 bytes. Odd column counts (a vocabulary of 50257) or offset views do not."""
    return dy.stride(1) == 1 and dy.stride(0) % 16 == 0 and dy.data_ptr() % 16 == 0


def grad_output_config_gpu(block_r, dy_bytes, rank_bytes, aligned=True):
    """Tiles by the dtype the products run in (``rank_bytes``: h's and G's).

    16-bit products (tensor cores): 256-row blocks keep dB's partials at
    (R + 1) / 128 of a 16-bit dY (1/8 at R = 16); 64 columns a step, a 32 KiB
    dY tile; as many stages as fit beside h's resident tile. fp32 products
    (fp32 dY or fp32 adapters, on the FMA pipes unless TF32 is allowed):
    128-row blocks and 16 columns a step, 8 warps at rank block 16 and 4 at 32
    (the FMA product holds both operands in registers; the other shapes spill
    on sm_80 or sm_90 with triton 3.7.1). A dY that is not ``aligned`` is read
    element by element, its tiles held in registers: 128 x 32 tiles for
    16-bit products (256 x 64 keeps 240 bytes a thread on sm_90's stack, 848
    on sm_80's)."""
    if rank_bytes <= 2 and not aligned:
        cfg = GradOutputConfig(128, 32, num_warps=8, num_stages=3)
    elif rank_bytes <= 2:
        cfg = GradOutputConfig(256, 64, num_warps=8, num_stages=3)
    else:
        cfg = GradOutputConfig(128, 16, num_warps=8 if block_r <= 16 else 4, num_stages=3)
    stage = cfg.block_n * (cfg.block_m * dy_bytes + block_r * rank_bytes)
    return fit_stages(cfg, stage, fixed_bytes=cfg.block_m * block_r * rank_bytes)


def grad_output_candidates(dy_bytes, rank_bytes, aligned=True):
    """Every (config, rank block) pair the launcher can pick on a GPU for an
    ``aligned`` dY (or not)."""
    return sorted({(grad_output_config_gpu(b, dy_bytes, rank_bytes, aligned), b)
                   for b in RANK_BLOCKS}, key=repr)


def partial_bytes(m, n, block_r, cfg, groups, need_g=True):
    """fp32 partial bytes of one pass: dB's and db's with several row blocks,
    G's with several column groups."""
    row_blocks = triton.cdiv(m, cfg.block_m)
    by_rows = row_blocks * n * (block_r + 1) * 4 if row_blocks > 1 else 0
    by_groups = groups * m * block_r * 4 if groups > 1 and need_g else 0
    return by_rows + by_groups


def one_pass_fits(m, n, rank, dy_bytes, rank_bytes, aligned=True):
    """Whether G, dB and db come from one pass (with a GPU's tiles, also under
    the interpreter, so that a CPU run takes the path a GPU would). Not with fp32
    adapters on a 16-bit dY: there two passes are predicted cheaper (see the
    module docstring)."""
    block_r = rank_block(rank)
    if block_r not in RANK_BLOCKS or rank_bytes > dy_bytes:
        return False
    cfg = grad_output_config_gpu(block_r, dy_bytes, rank_bytes, aligned)
    return partial_bytes(m, n, block_r, cfg, 1) <= PARTIAL_SHARE * m * n * dy_bytes


def column_groups(m, n, block_r, cfg, dy_bytes, rank_bytes, device, need_g=True,
                  aligned=True):
    """(groups, columns per group) for each row block: enough programs for one per
    SM, as few as that takes (each group adds M x BLOCK_R x 4 bytes of G
    partials), within the partial budget, which is reckoned at a GPU's tiles as
    in ``one_pass_fits``; a group is a whole number of BLOCK_N columns."""
    col_blocks = triton.cdiv(n, cfg.block_n)
    row_blocks = triton.cdiv(m, cfg.block_m)
    # one program per SM is enough for a pass bound by reading dY: each keeps two
    # 32 KiB tiles in flight, several MiB over the device, past what HBM's
    # latency asks for; the second program per SM would only add G's partials
    per_sm = max(1, target_programs(device) // 2)
    groups = max(1, min(col_blocks, triton.cdiv(per_sm, row_blocks)))
    gpu = grad_output_config_gpu(block_r, dy_bytes, rank_bytes, aligned)
    budget = PARTIAL_SHARE * m * n * dy_bytes
    while groups > 1 and partial_bytes(m, n, block_r, gpu, groups, need_g) > budget:
        groups -= 1
    cols_per_group = triton.cdiv(col_blocks, groups) * cfg.block_n
    return triton.cdiv(n, cols_per_group), cols_per_group


def grad_output(dy, lora_b, h, scale, grad_b, grad_bias=None, g_dtype=None):
    """G = dY @ B (returned, in ``g_dtype``; None: not wanted), dB = scale * dY^T @ h
    written into ``grad_b`` and, when ``grad_bias`` is given, the column sums of dY
    written into it.

    dy (M, N), lora_b (N, R) and h (M, R) may have any strides; grad_b (N, R) and
    grad_bias (N) are written through theirs. One pass over dY when its partials
    fit (``one_pass_fits``), else the rank pass and tn_matmul.
    """
    m, n = dy.shape
    r = lora_b.shape[1]
    need_g = g_dtype is not None
    rank_bytes = h.element_size()
    aligned = dy_aligned(dy)
    if not one_pass_fits(m, n, r, dy.element_size(), rank_bytes, aligned):
        g = rank_product(dy, lora_b, g_dtype) if need_g else None
        tn_matmul(dy, h, grad_b, scale, rank_block=rank_block(r), colsum=grad_bias)
        return g
    g = empty((m, r), g_dtype, dy.device) if need_g else None
    if m == 0 or n == 0:
        grad_b.zero_()
        if grad_bias is not None:
            grad_bias.zero_()
        return g.zero_() if need_g else None
    block_r = rank_block(r)
    cfg = grad_output_config(block_r, dy.element_size(), rank_bytes, aligned)
    groups, cols_per_group = column_groups(m, n, block_r, cfg, dy.element_size(), rank_bytes,
                                           dy.device, need_g, aligned)
    row_blocks = triton.cdiv(m, cfg.block_m)
    split_m = row_blocks > 1
    split_n = need_g and groups > 1
    # fp32 partials (and int32 counters, zero) only where a block is split;
    # unused pointers get a one-element stand-in of the same dtype
    f32 = torch.float32
    unused = torch.empty(1, dtype=f32, device=dy.device)
    part = empty((row_blocks, n, block_r), f32, dy.device) if split_m else unused
    colpart = (empty((row_blocks, n), f32, dy.device) if split_m and grad_bias is not None
               else unused)
    gpart = empty((groups, m, block_r), f32, dy.device) if split_n else unused
    counters = (triton.cdiv(n, cfg.block_n) if split_m else 0) + (row_blocks if split_n else 0)
    counter = arrival_counters(counters, dy.device)
    with launching("grad_output"):
        _grad_output_kernel[(row_blocks * groups,)](
            dy, lora_b, h, g if need_g else grad_b, grad_b,
            grad_bias if grad_bias is not None else grad_b, part, colpart, gpart, counter,
            m, n, r, cols_per_group,
            dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1),
            h.stride(0), h.stride(1),
            g.stride(0) if need_g else 0, g.stride(1) if need_g else 0,
            grad_b.stride(0), grad_b.stride(1),
            grad_bias.stride(0) if grad_bias is not None else 0,
            float(scale),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r,
            NEED_G=need_g, HAS_COLSUM=grad_bias is not None, SPLIT_M=split_m, UPCAST_DOT=INTERPRET,
            DOT_PRECISION=mixed_precision(dy.dtype, lora_b.dtype, h.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return g
