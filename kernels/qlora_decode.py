"""The decode forward over a 4-bit base: y and h in one launch, W read once.

Shapes: x (M, K) with M <= 16, a bitsandbytes 4-bit W (N, K) whose rows hold
whole absmax blocks (K a multiple of the blocksize), A^T (K, R), B^T (R, N):

    h = rank_scale * (x * m) @ A^T                    (M, R), rounded to h's dtype
    y = x @ deq(W)^T + round(bias + lora_scale * h @ B^T)     (M, N)

deq is ``qlora_gemm``'s, bit for bit: the same fp32 codes, absmax and products.

Why a kernel of its own: at decode the GEMM reads 4 bits a weight and little
else, so its cost is the instructions a weight takes. ``qlora_gemm`` holds x as
the dot's left operand, so W's tile (bytes of consecutive k) must be unpacked,
shuffled through shared memory and paired with x's even and odd columns, and
every program remakes h over all of K. Here W is the left operand, computing
y^T = deq(W) x^T: a row of W's tile is the row of bytes in memory, and each
nibble's code is looked up in the 16 codes held in registers (``tl.gather``,
compiled to warp shuffles), not loaded: no memory traffic but W's bytes.

K is split across programs (column blocks x slices): each slice makes its part
of y^T and of h over its K range, writes them as fp32 partials, and the last
slice of a column block to finish (an int32 counter per column block, acq_rel,
reset by that slice, ``arrival_counters``) sums both in slice order, rounds h,
adds the LoRA term and the bias, and writes y; column block 0 writes h. Every
column block remakes h's parts over its own slices: r x K products per block,
small against its N x K weights. Deterministic (a fixed order, no float atomics).
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, arrival_counters, dot_precision, empty, launching, mixed_mma,
                      mixed_precision, mma, rank_block, sum_partials, target_programs,
                      term_precision)
from .dequant_bnb import absmax_of, as_bytes
from .dropout import dropout_keep_tile, dropout_threshold
from .lora_gemm import stored_rank_times_q
from .lora_term import store_base_plus_term
from .qlora_gemm import _STATE_DTYPES, _as_compute, _paired


@triton.jit
def _qlora_decode_kernel(
    # pointers: x; W's packed codes, absmax, the 16-value code and the nested absmax's
    # (absmax2, code2, offset); A^T, h, B^T, bias, y; fp32 partials of y^T and h, counters
    l_ptr, w_ptr, scale_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    rt_ptr, h_ptr, q_ptr, bias_ptr, out_ptr, part_ptr, hpart_ptr, counter_ptr,
    # sizes
    M, N, K, R, k_per_split,
    # strides
    stride_lm, stride_lk, stride_rk, stride_rr, stride_hm, stride_hr, stride_qr, stride_qn,
    stride_bias, stride_om, stride_on,
    # scalars
    lora_scale, rank_scale, threshold, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr, STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    RANK_DROPOUT: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RANK_DOT_PRECISION: tl.constexpr,
    TERM_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    PAIRS: tl.constexpr = BLOCK_K // 2
    offs_j = tl.arange(0, PAIRS)
    cols = offs_n.to(tl.int64)
    rows = offs_m.to(tl.int64)
    in_n = offs_n < N
    in_m = offs_m < M
    in_r = offs_r < R
    row_bytes = K // 2
    k_start = pid_s * k_per_split
    k_end = min(K, k_start + k_per_split)
    compute = l_ptr.dtype.element_ty

    # the 16 codes beside every row of W's tile: looked up by warp shuffles (tl.gather
    # along a warp's registers), not by loads
    codes = tl.load(code_ptr + tl.arange(0, 16)[None, :] + (offs_n * 0)[:, None])
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
    hacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        # W's tile as stored: BLOCK_N rows of BLOCK_K / 2 bytes, inside one absmax block
        byte = tl.load(w_ptr + cols[:, None] * row_bytes + (k0 // 2 + offs_j)[None, :],
                       mask=in_n[:, None], other=0).to(tl.int32)
        scale = absmax_of((cols * K + k0) // BLOCKSIZE, scale_ptr, absmax2_ptr, code2_ptr,
                          offset_ptr, in_n, BLOCKSIZE2, NESTED)
        high = tl.gather(codes, byte >> 4, 1) * scale[:, None]  # W[n, k0 + 2j]
        low = tl.gather(codes, byte & 0xF, 1) * scale[:, None]  # W[n, k0 + 2j + 1]
        w = _as_compute(tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K)), STATE, compute,
                        UPCAST_DOT)
        ks = (k0 + offs_k).to(tl.int64)
        x_t = tl.load(l_ptr + rows[None, :] * stride_lm + ks[:, None] * stride_lk,
                      mask=in_m[None, :], other=0.0)
        acc = mma(w, x_t, acc, UPCAST_DOT, DOT_PRECISION)
    # this slice's part of h, in a loop of its own: its operands are not live beside
    # the main loop's (fewer registers; the slice of x is read again, from L2)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)
        x = tl.load(l_ptr + rows[:, None] * stride_lm + ks[None, :] * stride_lk,
                    mask=in_m[:, None], other=0.0)
        if RANK_DROPOUT:
            keep = dropout_keep_tile(seed, offs_m, k0, threshold, BLOCK_K)
            x = tl.where(keep, x, 0.0)  # where, not a product: a dropped inf is 0
        rt = tl.load(rt_ptr + ks[:, None] * stride_rk + offs_r[None, :] * stride_rr,
                     mask=in_r[None, :], other=0.0)
        hacc = mixed_mma(x, rt, hacc, UPCAST_DOT, RANK_DOT_PRECISION)

    if SPLIT_K:
        splits = tl.num_programs(1)
        tile = cols[:, None] * BLOCK_M + offs_m[None, :]
        htile = offs_m[:, None] * BLOCK_R + offs_r[None, :]
        hbase = pid_n.to(tl.int64) * splits * (BLOCK_M * BLOCK_R)
        tl.store(part_ptr + pid_s * (N.to(tl.int64) * BLOCK_M) + tile, acc,
                 mask=in_n[:, None])
        tl.store(hpart_ptr + hbase + pid_s * (BLOCK_M * BLOCK_R) + htile, hacc)
        tl.debug_barrier()  # every thread's partials before the (release) count
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == splits - 1:
            tl.store(counter_ptr + pid_n, 0)  # zero again for the next launch
            acc = sum_partials(part_ptr, tile, in_n[:, None], splits,
                               N.to(tl.int64) * BLOCK_M)
            hacc = sum_partials(hpart_ptr + hbase, htile, in_r[None, :], splits,
                                BLOCK_M * BLOCK_R)
            _epilogue(acc, hacc, h_ptr, q_ptr, bias_ptr, out_ptr, R, stride_hm, stride_hr,
                      stride_qr, stride_qn, stride_bias, stride_om, stride_on, lora_scale,
                      rank_scale, offs_m, offs_n, in_m, in_n, pid_n, BLOCK_M, BLOCK_N,
                      BLOCK_R, HAS_BIAS, UPCAST_DOT, TERM_PRECISION)
    else:
        _epilogue(acc, hacc, h_ptr, q_ptr, bias_ptr, out_ptr, R, stride_hm, stride_hr,
                  stride_qr, stride_qn, stride_bias, stride_om, stride_on, lora_scale,
                  rank_scale, offs_m, offs_n, in_m, in_n, pid_n, BLOCK_M, BLOCK_N, BLOCK_R,
                  HAS_BIAS, UPCAST_DOT, TERM_PRECISION)


@triton.jit
def _epilogue(acc, hacc, h_ptr, q_ptr, bias_ptr, out_ptr, R, stride_hm, stride_hr,
              stride_qr, stride_qn, stride_bias, stride_om, stride_on, lora_scale, rank_scale,
              offs_m, offs_n, in_m, in_n, pid_n, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr,
              UPCAST_DOT: tl.constexpr, TERM_PRECISION: tl.constexpr):
    """h as the rank pass stores it (written by column block 0), the LoRA term
    h @ B^T from it, and y = x W^T + round(term + bias)."""
    term = stored_rank_times_q(hacc, h_ptr, q_ptr, R, stride_hm, stride_hr, stride_qr,
                               stride_qn, offs_m, offs_n, in_m, in_n, pid_n * BLOCK_N,
                               rank_scale, BLOCK_M, BLOCK_N, BLOCK_R, UPCAST_DOT,
                               TERM_PRECISION) * lora_scale
    store_base_plus_term(tl.trans(acc), term, bias_ptr, out_ptr, stride_bias, stride_om,
                         stride_on, offs_m, offs_n, in_m, in_n, HAS_BIAS, UPCAST_DOT)


DECODE_M = 16
BLOCK_N_GPU, BLOCK_K_GPU, WARPS_GPU, STAGES_GPU = 128, 64, 4, 3
BLOCK_N_INTERPRET, BLOCK_K_INTERPRET = 32, 32


def decodes(operand, m, rank):
    """Whether the forward of M tokens over a quantised W^T ``operand`` takes this
    kernel: a W that qlora_gemm reads by bytes (4-bit rows of whole absmax blocks)
    with blocks at least this tile deep, M <= 16, N > 0, rank blocks of 16 and 32."""
    block_k = BLOCK_K_INTERPRET if INTERPRET else BLOCK_K_GPU
    return (_paired(operand) and operand.blocksize >= block_k and m <= DECODE_M
            and operand.weight_shape[0] > 0 and rank_block(rank) <= 32)


def _splits(n_blocks, k, block_k, device):
    """(slices, K per slice): at most one program per SM in all (a second program on
    an SM would double its share of the issue), slices of whole tiles."""
    wanted = max(1, min(target_programs(device) // 2 // n_blocks, k // block_k))
    per_split = triton.cdiv(triton.cdiv(k, wanted), block_k) * block_k
    return triton.cdiv(k, per_split), per_split


def qlora_decode(x, operand, h, lora_b_t, bias, lora_scale, lora_a_t, rank_scale,
                 dropout_p, seed):
    """y (M, N) in x's dtype, and h = rank_scale * (x * keep) @ A^T written into ``h``
    (M, R), for a 4-bit W^T ``operand`` that ``decodes``."""
    m, k = x.shape
    n = operand.shape[1]
    r = h.shape[1]
    if not decodes(operand, m, r) or x.dtype != operand.dtype or lora_a_t.shape != (k, r) \
            or lora_b_t.shape != (r, n):
        raise ValueError(f"qlora_decode: x {tuple(x.shape)} {x.dtype}, base operand "
                         f"{tuple(operand.shape)} ({operand.base_kind}, blocksize "
                         f"{operand.blocksize}), A^T {tuple(lora_a_t.shape)}, B^T "
                         f"{tuple(lora_b_t.shape)}: not a decode this kernel takes")
    out = empty((m, n), x.dtype, x.device)
    if m == 0:
        return out
    block_n, block_k = ((BLOCK_N_INTERPRET, BLOCK_K_INTERPRET) if INTERPRET
                        else (BLOCK_N_GPU, BLOCK_K_GPU))
    block_r = rank_block(r)
    n_blocks = triton.cdiv(n, block_n)
    splits, per_split = _splits(n_blocks, k, block_k, x.device)
    packed, absmax, code, *nested = operand.tensors
    absmax2, code2, offset = (nested[0], nested[1], nested[2].reshape(1)) if nested \
        else (absmax, absmax, absmax)
    if splits > 1:
        part = empty((splits, n, DECODE_M), torch.float32, x.device)
        hpart = empty((n_blocks, splits, DECODE_M, block_r), torch.float32, x.device)
        counter = arrival_counters(n_blocks, x.device)
    else:
        part = hpart = torch.empty(1, dtype=torch.float32, device=x.device)
        counter = torch.empty(1, dtype=torch.int32, device=x.device)
    pq_dtype = torch.promote_types(h.dtype, lora_b_t.dtype)
    has_bias = bias is not None
    with launching("qlora_decode"):
        _qlora_decode_kernel[(n_blocks, splits)](
            x, as_bytes(packed), absmax, code, absmax2, code2, offset,
            lora_a_t, h, lora_b_t, bias if has_bias else out, out, part, hpart, counter,
            m, n, k, r, per_split,
            x.stride(0), x.stride(1), lora_a_t.stride(0), lora_a_t.stride(1),
            h.stride(0), h.stride(1), lora_b_t.stride(0), lora_b_t.stride(1),
            bias.stride(0) if has_bias else 0, out.stride(0), out.stride(1),
            float(lora_scale), float(rank_scale), dropout_threshold(dropout_p), seed,
            BLOCK_M=DECODE_M, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
            BLOCKSIZE=operand.blocksize, BLOCKSIZE2=max(operand.blocksize2, 1),
            NESTED=operand.nested, STATE=_STATE_DTYPES[operand.state_dtype],
            HAS_BIAS=has_bias, RANK_DROPOUT=dropout_p > 0, SPLIT_K=splits > 1,
            UPCAST_DOT=INTERPRET, DOT_PRECISION=dot_precision(x.dtype),
            RANK_DOT_PRECISION=mixed_precision(x.dtype, lora_a_t.dtype),
            TERM_PRECISION=term_precision(pq_dtype, x.dtype, block_r),
            num_warps=1 if INTERPRET else WARPS_GPU,
            num_stages=1 if INTERPRET else STAGES_GPU, enable_fp_fusion=False,
        )
    return out

