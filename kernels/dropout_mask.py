"""The dropout keep-mask as a tensor.

The fused kernels never materialise the mask: they regenerate it from the seed
(see ``_common.dropout_keep``). This kernel writes the same mask out, for the
reference path to reproduce a kernel's dropout and for tests to check it.

    mask[m, k] = uniform(seed, m, k) >= p        (M, K), bool
"""
import torch
import triton
import triton.language as tl

from ._common import dropout_keep, launch_counts


@triton.jit
def _dropout_mask_kernel(
    # pointers
    mask_ptr,
    # sizes
    M, K,
    # strides
    stride_mm, stride_mk,
    # scalars
    dropout_p, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, offs_m[:, None], offs_k[None, :], dropout_p)
    tl.store(mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_k[None, :] * stride_mk,
             keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_keep_mask(m, k, dropout_p, seed, device):
    """Bool (m, k) mask of the elements the fused kernels keep for this seed."""
    mask = torch.empty((m, k), dtype=torch.int8, device=device)
    if mask.numel():
        block_m, block_k = 32, 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
        _dropout_mask_kernel[grid](mask, m, k, mask.stride(0), mask.stride(1),
                                   float(dropout_p), seed, BLOCK_M=block_m, BLOCK_K=block_k)
        launch_counts["dropout_mask"] += 1
    return mask.bool()
