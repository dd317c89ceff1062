"""The rank pass of a mixed-adapter batch: each row through its own adapter's A.

Shapes: x (M, K); the n adapters of the batch stacked by rows, A (R, K) with
R = r_1 + ... + r_n (adapter i at rows o_i .. o_i + r_i - 1); h (M, R):

    h[m, o_a : o_a + r_a] = x[m] A_a^T        a = the adapter of row m
    h[m, j]               = 0                 every other column (and every column
                                              of a row without adapter, ``__base__``)

The layer is then one GEMM with the LoRA term (lora_layer.lora_forward_with_h:
in the GEMM's epilogue, lora_gemm.py, or as cuBLAS's C, lora_term.py):

    y = x W^T + b + s h B^T,    B = [c_1 B_1, ..., c_n B_n] (N, R)

which gives row m exactly s c_a (x[m] A_a^T) B_a^T: the zeros of h select the
row's adapter in B. One base GEMM for the whole batch; the epilogue's rank work
is 2 M N R flops (R over the adapters present in the batch, 1.6% of the GEMM at
R = 64, N = K = 4096).

Segmented, as SGMV kernels are: the launcher sorts the rows by adapter and cuts
each adapter's rows into tiles of BLOCK_M rows; one program per tile gathers its
rows of x and multiplies them by its adapter's A only (per tile the first and
last-plus-one position in the sorted rows, the adapter's first row o_a in A and
its rank r_a; rows without adapter last, in tiles of rank 0 whose loads are
masked off). Each program writes its rows of h whole: the block rounded once on
store to h's dtype (fp32 with fp32 adapters, else x's, as the layer's rank
pass), zeros in every other column, so h needs no memset. The segments (rows
and tiles, int32) are built on the host from the batch's adapter list and reach
the GPU in one copy.
Inference only: no dropout, no backward.
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, dot_precision, empty, launching, mma, promote_pair,
                      rank_block, to_storage)
from .rank_product import RankConfig  # the same fields: rows, K step, warps, stages


@triton.jit
def _segmented_rank_kernel(
    # pointers
    x_ptr, a_ptr, h_ptr, segments_ptr,
    # sizes (segments: the M positions of rows, then the tiles' four columns)
    M, K, R, n_tiles,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    tiles_ptr = segments_ptr + M
    start = tl.load(tiles_ptr + tile)
    end = tl.load(tiles_ptr + n_tiles + tile)
    first_rank_row = tl.load(tiles_ptr + 2 * n_tiles + tile)
    rank = tl.load(tiles_ptr + 3 * n_tiles + tile)

    # ---- gather the tile's rows and its adapter's rows of A
    offs = start + tl.arange(0, BLOCK_M)
    in_m = offs < end
    rows = tl.load(segments_ptr + offs, mask=in_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < rank
    a_rows = (first_rank_row + offs_r).to(tl.int64)

    # ---- h block = x[rows] A_a^T over K (a tile without adapter loads nothing)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # a tile without adapter loads no x: its rows end where they start (a scalar
    # bound, not a scalar in the mask, which triton 3.9's interpreter refuses)
    in_product = offs < tl.where(rank > 0, end, start)
    for k0 in tl.range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        in_k = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=in_product[:, None] & in_k[None, :], other=0.0)
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_ar + ks[:, None] * stride_ak,
                      mask=in_k[:, None] & in_r[None, :], other=0.0)
        x, a_t = promote_pair(x, a_t)
        acc = mma(x, a_t, acc, UPCAST_DOT, DOT_PRECISION)

    # ---- the whole row of h: zeros outside the adapter's columns, so that h
    # needs no memset
    h_rows = h_ptr + rows[:, None] * stride_hm
    zeros = tl.zeros((BLOCK_M, BLOCK_R), dtype=h_ptr.dtype.element_ty)
    for c0 in tl.range(0, R, BLOCK_R):
        cols = c0 + offs_r
        outside = (cols < R) & ((cols < first_rank_row) | (cols >= first_rank_row + rank))
        tl.store(h_rows + cols.to(tl.int64)[None, :] * stride_hr, zeros,
                 mask=in_m[:, None] & outside[None, :])
    tl.store(h_rows + a_rows[None, :] * stride_hr,
             to_storage(acc, h_ptr.dtype.element_ty, UPCAST_DOT),
             mask=in_m[:, None] & in_r[None, :])


SEGMENT_INTERPRET = RankConfig(16, 32, num_warps=1, num_stages=1)
# 16-row tiles: M = 2048 gives 128 programs (the tiles are the grid; a wider tile
# would leave most SMs idle on a pass that streams x once), A re-read per tile
# from L2; 128-wide K steps, three stages in flight
SEGMENT_GPU = RankConfig(16, 128, num_warps=4, num_stages=3)
# wide rank blocks: narrower K steps keep the A tiles (and the fp32 operands'
# registers) small enough that nothing spills to the stack
SEGMENT_GPU_WIDE = RankConfig(16, 32, num_warps=4, num_stages=3)
MAX_SEGMENT_RANK = 128  # the widest rank block compiled (tests/compile_kernels.py)


def segment_config(max_rank=16):
    if INTERPRET:
        return SEGMENT_INTERPRET
    return SEGMENT_GPU if rank_block(max_rank) <= 32 else SEGMENT_GPU_WIDE


def segment_tiles(row_adapters, rows_per_item, first_rank_rows, ranks, block_m):
    """The int32 segments of a batch, built on the host from its adapter list: one
    tensor, so that it reaches the GPU in one copy.

    Args:
        row_adapters: per batch item, the index of its adapter, or -1 for none.
        rows_per_item: rows of x per batch item (the sequence length; 1 for 2-D x).
        first_rank_rows, ranks: per adapter, its first row in the stacked A and r.
    Returns:
        (segments, n_tiles): segments holds the M row positions sorted by adapter
        (rows without one last), then four columns of n_tiles: per tile its start
        and end in those positions, o_a and r_a (0 and 0 for rows without adapter:
        their tiles only write zeros).
    """
    by_adapter = {}
    for item, adapter in enumerate(row_adapters):
        by_adapter.setdefault(adapter, []).append(item)
    rows, columns = [], []
    for adapter in sorted(by_adapter, key=lambda a: (a < 0, a)):
        first = len(rows)
        for item in by_adapter[adapter]:
            rows.extend(range(item * rows_per_item, (item + 1) * rows_per_item))
        first_row, rank = (first_rank_rows[adapter], ranks[adapter]) if adapter >= 0 else (0, 0)
        for start in range(first, len(rows), block_m):
            columns.append((start, min(start + block_m, len(rows)), first_row, rank))
    tiles = [value for column in zip(*columns) for value in column] if columns else []
    return torch.tensor(rows + tiles, dtype=torch.int32), len(columns)


def segmented_rank_product(x, lora_a, segments, n_tiles, max_rank, out_dtype, config=None):
    """h (M, R) in ``out_dtype``: each row's x A_a^T in its adapter's columns, zeros
    elsewhere (every column of a row without adapter).

    x (M, K) and lora_a (R, K) any strides; ``segments`` and ``n_tiles`` from
    ``segment_tiles`` (segments on x's device), built with ``config.block_m``;
    ``max_rank``: the largest r_a.
    """
    cfg = config or segment_config(max_rank)
    if max_rank > MAX_SEGMENT_RANK:
        raise ValueError(f"segmented_rank_product: adapter rank {max_rank} over "
                         f"{MAX_SEGMENT_RANK}")
    m, r = x.shape[0], lora_a.shape[0]
    h = empty((m, r), out_dtype, x.device)
    if n_tiles == 0 or r == 0:
        return h.zero_()
    pair_dtype = torch.promote_types(x.dtype, lora_a.dtype)
    with launching("segmented_rank_product"):
        _segmented_rank_kernel[(n_tiles,)](
            x, lora_a, h, segments,
            m, x.shape[1], r, n_tiles,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
            h.stride(0), h.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_R=rank_block(max_rank), BLOCK_K=cfg.block_k,
            UPCAST_DOT=INTERPRET, DOT_PRECISION=dot_precision(pair_dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return h
