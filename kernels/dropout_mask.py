"""The dropout keep-mask as a tensor.

The fused kernels never materialise the mask: they regenerate it from the seed
(see ``dropout.dropout_keep_tile``). This kernel writes the same mask out, for
the reference path to reproduce a kernel's dropout and for tests to check it.

    mask[m, k] = bits(seed, m, k) >= round(p * 2^16)        (M, K), bool
"""
import torch
import triton
import triton.language as tl

from ._common import launching
from .dropout import ELEMENTS_PER_CALL, dropout_keep_tile, dropout_threshold


@triton.jit
def _dropout_mask_kernel(
    # pointers
    mask_ptr,
    # sizes
    M, K,
    # strides
    stride_mm, stride_mk,
    # scalars
    row_start, col_start, threshold, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # (offs_m, offs_k) index the output; the mask element is (row_start + m, col_start + k)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tile_k = tl.program_id(1) * BLOCK_K
    offs_k = tile_k + tl.arange(0, BLOCK_K)
    keep = dropout_keep_tile(seed, row_start + offs_m, col_start + tile_k, threshold, BLOCK_K)
    tl.store(mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm
             + offs_k[None, :].to(tl.int64) * stride_mk,
             keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


MASK_BLOCK_M, MASK_BLOCK_K = 32, 64


def dropout_keep_mask(m, k, dropout_p, seed, device, *, row_start=0, col_start=0):
    """Bool (m, k) mask of the elements the fused kernels keep for this seed.

    With row_start / col_start, the window of the mask that starts there (the
    mask of a layer is the window at 0, 0); col_start must be a multiple of 8,
    the column group of one Philox call.
    """
    if col_start % ELEMENTS_PER_CALL or row_start < 0 or col_start < 0:
        raise ValueError(f"dropout_keep_mask: row_start ({row_start}) must be >= 0 and "
                         f"col_start ({col_start}) a multiple of {ELEMENTS_PER_CALL} >= 0")
    mask = torch.empty((m, k), dtype=torch.int8, device=device)
    if mask.numel():
        grid = (triton.cdiv(m, MASK_BLOCK_M), triton.cdiv(k, MASK_BLOCK_K))
        with launching("dropout_mask"):
            _dropout_mask_kernel[grid](mask, m, k, mask.stride(0), mask.stride(1),
                                       row_start, col_start, dropout_threshold(dropout_p), seed,
                                       BLOCK_M=MASK_BLOCK_M, BLOCK_K=MASK_BLOCK_K)
    return mask.bool()
