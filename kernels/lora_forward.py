"""Fused LoRA forward: one pass over x for the base and the low-rank product.

Shapes: x (M, K), W (N, K) as in nn.Linear, bias (N), A (R, K), B (N, R).
With drop(x) = x * m / (1 - p) for the Philox keep-mask m (identity at p = 0):

    h = drop(x) @ A^T                      (M, R), kept for the backward
    y = x @ W^T + bias + s * h @ B^T        (M, N)

Each program owns a BLOCK_M x BLOCK_N tile of y. While it walks K it loads an x
tile once and feeds it to both accumulators: x @ W^T and (x * m) @ A^T, the
rank side padded to BLOCK_R >= 16 and masked. The epilogue adds s * h @ B^T
and the bias, and y is written once. The programs of the first column block
also write h; the others recompute it, which costs R / BLOCK_N of the base
GEMM's tensor work and saves a second read of x. No N x K product is formed.
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, dot_precision, dropout_keep, empty, grouped_tile,
                      launch_counts, mma, rank_block, row_gemm_config)


@triton.jit
def _lora_forward_kernel(
    # pointers
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, h_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_bias, stride_ym, stride_yn, stride_hm, stride_hr,
    # scalars
    scale, dropout_p, keep_scale, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    in_m = offs_m < M
    in_n = offs_n < N
    in_r = offs_r < R
    compute_dtype = x_ptr.dtype.element_ty

    # ---- main loop: one x tile feeds x @ W^T and drop(x) @ A^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        ks_wide = ks.to(tl.int64)  # a transposed x or W has a large stride along K
        in_k = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks_wide[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_wn + ks_wide[:, None] * stride_wk,
                      mask=in_k[:, None] & in_n[None, :], other=0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak,
                      mask=in_k[:, None] & in_r[None, :], other=0.0).to(compute_dtype)
        acc = mma(x, w_t, acc, UPCAST_DOT, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m[:, None], ks[None, :], dropout_p)
            x = tl.where(keep, x, 0.0)
        h = mma(x, a_t, h, UPCAST_DOT, DOT_PRECISION)

    # ---- epilogue: keep h for the backward, add s * h @ B^T and the bias
    h = h * keep_scale
    h_rows = tl.where(pid_n == 0, M, 0)  # only the first column block writes h
    tl.store(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
             h.to(h_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < h_rows) & in_r[None, :])
    b_t = tl.load(b_ptr + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                  mask=in_r[:, None] & in_n[None, :], other=0.0).to(compute_dtype)
    acc = mma((h * scale).to(compute_dtype), b_t, acc, UPCAST_DOT, DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=in_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def lora_forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    """Launch the fused forward on a 2-D x; returns (y, h).

    y has x's dtype; h = drop(x) @ A^T (M, R) is in x's dtype, the dtype the
    rank products run in. Inputs are assumed validated by the caller.
    """
    m, k = x.shape
    n, r = weight.shape[0], lora_a.shape[0]
    y = empty((m, n), x.dtype, x.device)
    h = empty((m, r), x.dtype, x.device)
    if m == 0:
        return y, h
    if n == 0:
        # No output column means no program to write h; only dB reads h, and
        # dB is empty when N is 0.
        return y, h.zero_()
    block_r = rank_block(r)
    cfg = row_gemm_config(m, block_r, x.element_size(),
                          max(lora_a.element_size(), lora_b.element_size()))
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    has_bias = bias is not None
    _lora_forward_kernel[grid](
        x, weight, lora_a, lora_b, bias if has_bias else y, y, h,
        m, n, k, r,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        bias.stride(0) if has_bias else 0,
        y.stride(0), y.stride(1), h.stride(0), h.stride(1),
        float(scale), float(dropout_p), 1.0 / (1.0 - dropout_p), seed,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=block_r, GROUP_M=cfg.group_m,
        HAS_BIAS=has_bias, HAS_DROPOUT=dropout_p > 0.0,
        UPCAST_DOT=INTERPRET, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    launch_counts["lora_forward"] += 1
    return y, h
