"""LoRA backward, input side: dX and G = dY @ B from one read of dY.

Shapes: dY (M, N), W (N, K), A (R, K), B (N, R). With the forward's keep-mask m
and drop probability p:

    G  = dY @ B                                          (M, R)
    dX = dY @ W + (s / (1 - p)) * (G @ A) * m             (M, K)

Each program owns a BLOCK_M x BLOCK_K tile of dX and walks N: every dY tile
feeds both dY @ W and dY @ B. The epilogue adds the rank-R term with the mask
regenerated from the seed. The programs of the first column block write G,
which dA = s * G^T @ drop(x) needs. Without NEED_DX only G is computed (W is
not read). No N x K product of A and B is formed.
"""
import triton
import triton.language as tl

from ._common import (INTERPRET, dot_precision, dropout_keep, empty, grouped_tile,
                      launch_counts, mma, rank_block, row_gemm_config)


@triton.jit
def _lora_grad_input_kernel(
    # pointers
    dy_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, g_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_dxm, stride_dxk, stride_gm, stride_gr,
    # scalars
    lora_scale, dropout_p, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    NEED_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    num_pid_k = tl.cdiv(K, BLOCK_K) if NEED_DX else 1
    pid_m, pid_k = grouped_tile(tl.cdiv(M, BLOCK_M), num_pid_k, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_k.to(tl.int64)
    in_m = offs_m < M
    in_k = offs_k < K
    in_r = offs_r < R
    compute_dtype = dy_ptr.dtype.element_ty

    # ---- main loop: one dY tile feeds dY @ W and dY @ B
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + offs_n
        ns_wide = ns.to(tl.int64)  # a transposed dY has a large stride along N
        in_n = ns < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns_wide[None, :] * stride_dyn,
                     mask=in_m[:, None] & in_n[None, :], other=0.0)
        if NEED_DX:
            w = tl.load(w_ptr + ns_wide[:, None] * stride_wn + cols[None, :] * stride_wk,
                        mask=in_n[:, None] & in_k[None, :], other=0.0)
            acc = mma(dy, w, acc, UPCAST_DOT, DOT_PRECISION)
        b = tl.load(b_ptr + ns[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=in_n[:, None] & in_r[None, :], other=0.0).to(compute_dtype)
        g = mma(dy, b, g, UPCAST_DOT, DOT_PRECISION)

    g_rows = tl.where(pid_k == 0, M, 0)  # only the first column block writes G
    tl.store(g_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr,
             g.to(g_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < g_rows) & in_r[None, :])

    # ---- epilogue: dX += (s / (1 - p)) * (G @ A) * m
    if NEED_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=in_r[:, None] & in_k[None, :], other=0.0).to(compute_dtype)
        g_scaled = (g * lora_scale).to(compute_dtype)
        if HAS_DROPOUT:
            lora = mma(g_scaled, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32),
                       UPCAST_DOT, DOT_PRECISION)
            keep = dropout_keep(seed, offs_m[:, None], offs_k[None, :], dropout_p)
            acc = acc + tl.where(keep, lora, 0.0)
        else:
            acc = mma(g_scaled, a, acc, UPCAST_DOT, DOT_PRECISION)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=in_m[:, None] & in_k[None, :])


def lora_grad_input(grad_y, weight, lora_a, lora_b, scale, dropout_p, seed, need_dx):
    """Launch the grad-input kernel on a 2-D dY; returns (dX or None, G).

    G = dY @ B (M, R) is in dY's dtype; dX (M, K) too.
    """
    m, n = grad_y.shape
    k, r = weight.shape[1], lora_a.shape[0]
    g = empty((m, r), grad_y.dtype, grad_y.device)
    dx = empty((m, k), grad_y.dtype, grad_y.device) if need_dx else None
    if m == 0:
        return dx, g
    if n == 0:
        # Nothing flows back through a layer with no outputs.
        return (dx.zero_() if need_dx else None), g.zero_()
    block_r = rank_block(r)
    cfg = row_gemm_config(m, block_r, grad_y.element_size(),
                          max(lora_a.element_size(), lora_b.element_size()))
    num_pid_k = triton.cdiv(k, cfg.block_k) if need_dx else 1
    grid = (triton.cdiv(m, cfg.block_m) * num_pid_k,)
    _lora_grad_input_kernel[grid](
        grad_y, weight, lora_a, lora_b, dx if need_dx else g, g,
        m, n, k, r,
        grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
        g.stride(0), g.stride(1),
        float(scale) / (1.0 - dropout_p), float(dropout_p), seed,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=block_r, GROUP_M=cfg.group_m,
        NEED_DX=need_dx, HAS_DROPOUT=dropout_p > 0.0,
        UPCAST_DOT=INTERPRET, DOT_PRECISION=dot_precision(grad_y.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    launch_counts["lora_grad_input"] += 1
    return dx, g
