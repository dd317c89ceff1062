"""DoRA's weight norm without the out x in matrix W + s B A.

Shapes: W (N, K) in its storage dtype, any strides; A (R, K), B (N, R) any float
dtype. For each row i of W (one output feature):

    P   = W A^T                                  (N, R), fp32, the only pass over W
    t_i = s^2 B_i (A A^T) B_i^T                  (N,), fp32, made by the launcher
                                                 (an r x r and an N x r product)
    q_i = ||W_i||^2                              fp32; cached by the caller per weight
    n_i = sqrt(q_i + 2 s B_i . P_i + t_i)

which is ||W_i + s (B A)_i|| expanded. One program takes BLOCK_N rows of W,
reads them once in (BLOCK_N, BLOCK_K) tiles upcast to fp32 (the dense norm is
taken in fp32 on a 16-bit base, as PEFT takes it on the fp32 upcast of W), and
writes n (and q, unless q was given). Nothing of size N x K is written. The
rank is padded to a power of two (at least 16) and masked, so any r works. The
products run in IEEE fp32: the three terms can cancel (W_i near -s (BA)_i), and
TF32's 10-bit mantissa would show in n. The norm takes no gradient (DoRA
detaches it), so there is no backward.
"""
import torch
import triton
import triton.language as tl

from ._common import empty, launching, rank_block


@triton.jit
def _dora_norm_kernel(
    # pointers
    w_ptr, a_ptr, b_ptr, quad_ptr, norm_ptr, sq_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    # scalars
    scale,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SQ_GIVEN: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_n < N
    ranks = offs_r < R
    rows64 = offs_n[:, None].to(tl.int64)
    ranks64 = offs_r[:, None].to(tl.int64)

    # ---- one pass over W: P = W A^T and, unless cached, the squares of W's rows
    p = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        cols = offs_k < K
        w = tl.load(w_ptr + rows64 * stride_wn + offs_k[None, :].to(tl.int64) * stride_wk,
                    mask=rows[:, None] & cols[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ranks64 * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
                    mask=ranks[:, None] & cols[None, :], other=0.0).to(tl.float32)
        p = tl.dot(w, tl.trans(a), p, input_precision="ieee")
        if not SQ_GIVEN:
            sq += tl.sum(w * w, axis=1)
    if SQ_GIVEN:
        sq = tl.load(sq_ptr + offs_n, mask=rows, other=0.0)

    # ---- the rank terms: 2 s B_i . P_i, and s^2 B_i C B_i^T as the launcher made it
    b = tl.load(b_ptr + rows64 * stride_bn + offs_r[None, :].to(tl.int64) * stride_br,
                mask=rows[:, None] & ranks[None, :], other=0.0).to(tl.float32)
    quad = tl.load(quad_ptr + offs_n, mask=rows, other=0.0)
    total = sq + 2.0 * scale * tl.sum(b * p, axis=1) + quad
    tl.store(norm_ptr + offs_n, tl.sqrt(tl.maximum(total, 0.0)), mask=rows)
    if not SQ_GIVEN:
        tl.store(sq_ptr + offs_n, sq, mask=rows)


def norm_config(block_r):
    """(BLOCK_N, BLOCK_K, num_warps): the fp32 P tile (BLOCK_N x BLOCK_R) and A tile
    (BLOCK_R x BLOCK_K) small enough to stay in registers (no spills on sm_80/sm_90)."""
    if block_r <= 32:
        return 64, 64, 4
    if block_r <= 64:
        return 32, 32, 4
    if block_r <= 128:
        return 16, 32, 4
    return 16, 16, 8


def dora_weight_norm(weight, lora_a, lora_b, scale, row_sq_norms=None):
    """(n, q): fp32 (N,) tensors, n_i = ||W_i + s (B A)_i||, q_i = ||W_i||^2.

    ``row_sq_norms`` (fp32 (N,), q of this very weight) skips the squares and is
    returned as q.
    """
    n, k = weight.shape
    r = lora_a.shape[0]
    block_r = rank_block(r)
    a32, b32 = lora_a.float(), lora_b.float()
    quad = ((b32 @ (a32 @ a32.t())) * b32).sum(1).mul_(float(scale) ** 2)
    norm = empty((n,), torch.float32, weight.device)
    sq_given = row_sq_norms is not None
    sq = row_sq_norms if sq_given else empty((n,), torch.float32, weight.device)
    if n == 0:
        return norm, sq
    block_n, block_k, warps = norm_config(block_r)
    with launching("dora_norm"):
        _dora_norm_kernel[(triton.cdiv(n, block_n),)](
            weight, lora_a, lora_b, quad, norm, sq,
            n, k, r,
            weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
            lora_b.stride(0), lora_b.stride(1),
            float(scale),
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, SQ_GIVEN=sq_given,
            num_warps=warps)
    return norm, sq
