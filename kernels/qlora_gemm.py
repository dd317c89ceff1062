"""The LoRA GEMM over a quantised base: bitsandbytes' 4-bit or 8-bit W
dequantised inside the main loop, tile by tile, never written out.

Shapes as ``lora_gemm.py``: L (M, K), the base operand Rt (K, N), P (M, R),
Q (R, N), bias (N):

    out = L @ Rt + bias + c * ((P @ Q) * m)          (M, N)

where Rt is W^T (the forward, ``transposed``) or W (dX) of a quantised
W (out_features, in_features), read through a ``QuantizedOperand``:

    forward  y  = x @ deq(W)^T + b + s * h @ B^T
    dX       dX = dY @ deq(W) + (s / (1 - p_eff)) * (G @ A) * m

deq is kernels/dequant_bnb.py's, element for element: the same fp32 products
in the same order (``dequant_4bit_at``, ``dequant_int8_at``), cast to the quant
state's dtype and then to the compute dtype as ``Bnb4bitWeight.dequantize``
casts its buffer, so each tile holds the very values the ``cublas`` strategy's
buffer would, and the launch disables floating-point contraction as the
dequantisation kernels do (a fused multiply-add of the nested absmax would
round once where bitsandbytes rounds twice; tl.dot is unaffected). Elements
are addressed by their flat index in W, so absmax blocks that cross rows (K
not a multiple of the blocksize) and any tile edge need nothing special.

Cost: each program dequantises its K x BLOCK_N slice of W once per M block,
so the dequantisation work grows with M / BLOCK_M. At decode (one M block)
the kernel reads 4 bits (or 8) a weight and nothing else of W, which is what
makes it faster than dequantising into a buffer first; at large M the table
(``kernels/lora_layer.py``) takes the ``cublas`` strategy instead. The
epilogue is lora_gemm's: the LoRA term rounded with the bias before it meets
the fp32 accumulator, the mask in the epilogue only (dX), and at decode the
rank product h made in the kernel (``_rank_term_in_kernel``).
"""
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_precision, empty, grouped_tile, launching, mma, to_storage
from .dequant_bnb import (INT8_INVERSE_SCALE, absmax_of, as_bytes, dequant_4bit_at,
                          dequant_int8_at, dequantize_4bit, dequantize_int8)
from .dropout import dropout_threshold
from .lora_gemm import GemmConfig, _rank_term_in_kernel
from .lora_term import epilogue_rank_block, lora_term_tile, store_base_plus_term

FORMATS = ("nf4", "fp4", "int8")
INVERSE_SCALE = tl.constexpr(INT8_INVERSE_SCALE)  # a constexpr global: read inside the kernel
_STATE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class QuantizedOperand:
    """A quantised W (out_features, in_features) as the GEMMs read it, or its
    transpose (``transposed``: the forward's W^T). ``tensors``: for 4-bit the
    packed codes (any ``quant_storage``), absmax, code and, nested, absmax2,
    code2 and the offset; for int8 CB and SCB. ``state_dtype``: the dtype
    bitsandbytes dequantises into; ``dtype``: the compute dtype."""

    base_kind: str
    tensors: tuple
    weight_shape: tuple
    state_dtype: torch.dtype
    dtype: torch.dtype
    blocksize: int = 0
    blocksize2: int = 0
    transposed: bool = False

    @property
    def shape(self):
        out_features, in_features = self.weight_shape
        return torch.Size((in_features, out_features) if self.transposed
                          else (out_features, in_features))

    @property
    def device(self):
        return self.tensors[0].device

    @property
    def nested(self):
        return self.base_kind != "int8" and len(self.tensors) == 6

    def t(self):
        return replace(self, transposed=not self.transposed)

    def dense(self):
        """This operand as a tensor of the compute dtype: W dequantised into a
        new buffer (kernels/dequant_bnb.py), transposed as a view where asked."""
        # a buffer in the state's dtype only where its rounding differs from the cast's
        into = self.dtype if self.state_dtype == torch.float32 else self.state_dtype
        if self.base_kind == "int8":
            w = dequantize_int8(*self.tensors, into)
        else:
            packed, absmax, code, *nested = self.tensors
            extra = {}
            if nested:
                extra = dict(absmax2=nested[0], code2=nested[1], blocksize2=self.blocksize2,
                             offset=nested[2])
            w = dequantize_4bit(packed, absmax, code, self.blocksize, self.weight_shape,
                                into, **extra)
        if w.dtype != self.dtype:
            w = w.to(self.dtype)
        return w.t() if self.transposed else w


@triton.jit
def _as_compute(value, STATE: tl.constexpr, COMPUTE: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 dequantised values rounded to the state's dtype, then to the compute
    dtype, as bitsandbytes' buffer and its cast round them (once where they agree)."""
    if STATE == "bf16" and COMPUTE != tl.bfloat16:
        value = to_storage(value, tl.bfloat16, INTERPRETED).to(tl.float32)
    elif STATE == "fp16" and COMPUTE != tl.float16:
        value = value.to(tl.float16).to(tl.float32)
    return to_storage(value, COMPUTE, INTERPRETED)


@triton.jit
def _dequant_tile(w_rows, w_cols, mask, w_ptr, scale_ptr, code_ptr, absmax2_ptr, code2_ptr,
                  offset_ptr, in_features, stride_cn,
                  FORMAT: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                  NESTED: tl.constexpr):
    """fp32 W[w_rows, w_cols] (broadcast shapes) dequantised; 0 where not ``mask``."""
    if FORMAT == "int8":
        return dequant_int8_at(w_rows, w_cols, w_ptr, scale_ptr, stride_cn, mask,
                               INVERSE_SCALE)
    else:
        flat = w_rows.to(tl.int64) * in_features + w_cols
        return dequant_4bit_at(flat, w_ptr, scale_ptr, code_ptr, absmax2_ptr, code2_ptr,
                               offset_ptr, mask, BLOCKSIZE, BLOCKSIZE2, NESTED)


@triton.jit
def _paired_forward_loop(acc, l_ptr, w_ptr, scale_ptr, code_ptr, absmax2_ptr, code2_ptr,
                         offset_ptr, K, rows, cols, in_m, in_n, stride_lm, stride_lk,
                         BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                         BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, STATE: tl.constexpr,
                         UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The forward's main loop over a 4-bit W whose rows hold whole absmax blocks
    (K a multiple of the blocksize, BLOCK_K dividing it): each byte holds W[n, 2j]
    (high nibble) and W[n, 2j + 1] (low), so the tile is read as bytes, unpacked
    into the even and the odd k, and multiplied by x's even and odd columns: two
    products, no interleaving. A tile lies in one absmax block per row of W, so
    its scales are BLOCK_N values, not one per element."""
    PAIRS: tl.constexpr = BLOCK_K // 2
    offs_j = tl.arange(0, PAIRS)
    row_bytes = K // 2
    for k0 in range(0, K, BLOCK_K):
        js = (k0 // 2 + offs_j).to(tl.int64)
        in_j = js < row_bytes
        x_mask = in_m[:, None] & in_j[None, :]
        x_even = tl.load(l_ptr + rows[:, None] * stride_lm + (2 * js)[None, :] * stride_lk,
                         mask=x_mask, other=0.0)
        x_odd = tl.load(l_ptr + rows[:, None] * stride_lm + (2 * js + 1)[None, :] * stride_lk,
                        mask=x_mask, other=0.0)
        byte = tl.load(w_ptr + cols[None, :] * row_bytes + js[:, None],
                       mask=in_j[:, None] & in_n[None, :], other=0).to(tl.int32)
        scale = absmax_of((cols * K + k0) // BLOCKSIZE, scale_ptr, absmax2_ptr, code2_ptr,
                          offset_ptr, in_n, BLOCKSIZE2, NESTED)
        w_even = tl.load(code_ptr + (byte >> 4)) * scale[None, :]
        w_odd = tl.load(code_ptr + (byte & 0xF)) * scale[None, :]
        compute = l_ptr.dtype.element_ty
        acc = mma(x_even, _as_compute(w_even, STATE, compute, UPCAST_DOT), acc, UPCAST_DOT,
                  DOT_PRECISION)
        acc = mma(x_odd, _as_compute(w_odd, STATE, compute, UPCAST_DOT), acc, UPCAST_DOT,
                  DOT_PRECISION)
    return acc


@triton.jit
def _qlora_gemm_kernel(
    # pointers: L; W's storage (codes or CB), its scales (absmax or SCB), the
    # 4-bit code and the nested absmax's (absmax2, code2, offset); the epilogue's
    l_ptr, w_ptr, scale_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    p_ptr, q_ptr, pr_ptr, bias_ptr, out_ptr,
    # sizes (in_features: W's row length, for flat indices)
    M, N, K, R, in_features,
    # strides
    stride_lm, stride_lk, stride_cn, stride_pm, stride_pr, stride_qr, stride_qn,
    stride_prk, stride_prr, stride_bias, stride_om, stride_on,
    # scalars
    lora_scale, rank_scale, threshold, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    FORMAT: tl.constexpr, TRANSPOSED: tl.constexpr, PAIRED: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, STATE: tl.constexpr,
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

    # ---- main loop: L @ deq(W)^T (forward) or L @ deq(W) (dX)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PAIRED:
        acc = _paired_forward_loop(acc, l_ptr, w_ptr, scale_ptr, code_ptr, absmax2_ptr,
                                   code2_ptr, offset_ptr, K, rows, cols, in_m, in_n,
                                   stride_lm, stride_lk, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, NESTED,
                                   STATE, UPCAST_DOT, DOT_PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = (k0 + offs_k).to(tl.int64)
            in_k = ks < K
            lhs = tl.load(l_ptr + rows[:, None] * stride_lm + ks[None, :] * stride_lk,
                          mask=in_m[:, None] & in_k[None, :], other=0.0)
            if TRANSPOSED:  # rhs[k, n] = W[n, k]
                w_rows = cols[None, :]
                w_cols = ks[:, None]
            else:  # rhs[k, n] = W[k, n]
                w_rows = ks[:, None]
                w_cols = cols[None, :]
            value = _dequant_tile(w_rows, w_cols, in_k[:, None] & in_n[None, :], w_ptr,
                                  scale_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                  in_features, stride_cn, FORMAT, BLOCKSIZE, BLOCKSIZE2, NESTED)
            rhs = _as_compute(value, STATE, l_ptr.dtype.element_ty, UPCAST_DOT)
            acc = mma(lhs, rhs, acc, UPCAST_DOT, DOT_PRECISION)

    # ---- epilogue: lora_gemm's
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


QLORA_INTERPRET = GemmConfig(16, 32, 32, num_warps=1, num_stages=1, group_m=2)
# Decode reads W once: 32 output columns a program gives N / 32 programs (128
# for N = 4096, about one per SM), each streaming its slice of W over all of K.
# The element-wise (generic) loop at 8 warps: at 4 it keeps 16 bytes a thread in
# the stack frame (fp16, sm_80); the byte-pair loop needs a quarter of its registers
QLORA_DECODE = GemmConfig(16, 32, 128, num_warps=4, num_stages=3)
QLORA_DECODE_GENERIC = replace(QLORA_DECODE, num_warps=8)
# Past decode one tile: W's tile is built from gathered loads in registers beside
# the accumulators, and wider tiles keep 40-280 bytes a thread in the stack frame
# on sm_90 (128 x 128 x 32 at 8 warps, 128 x 64 and 64 x 128 at 4; bench/NOTES.md)
QLORA_SMALL_M = GemmConfig(64, 64, 64, num_warps=4, num_stages=3)


def qlora_gemm_config(m):
    """The table's tile by token count: lora_gemm's decode and small-M tiles,
    with a stage fewer (the pipeline stages the dequantisation's loads too)."""
    if INTERPRET:
        return QLORA_INTERPRET
    return QLORA_DECODE if m <= 16 else QLORA_SMALL_M


def qlora_gemm_candidates():
    """Every config the launcher can pick on a GPU."""
    return [QLORA_DECODE, QLORA_DECODE_GENERIC, QLORA_SMALL_M]


def _check(lhs, operand, p, q):
    if not isinstance(operand, QuantizedOperand):
        raise TypeError(f"qlora_gemm: the base operand must be a QuantizedOperand, got "
                        f"{type(operand).__name__}")
    if operand.base_kind not in FORMATS:
        raise ValueError(f"qlora_gemm: base kind {operand.base_kind!r}; expected one of "
                         f"{FORMATS}")
    if lhs.dtype != operand.dtype:
        raise ValueError(f"qlora_gemm: lhs is {lhs.dtype}, the base computes in "
                         f"{operand.dtype}")
    m, k = lhs.shape
    if operand.shape[0] != k or p.shape != (m, q.shape[0]) or q.shape[1] != operand.shape[1]:
        raise ValueError(f"qlora_gemm: shapes do not chain: lhs {tuple(lhs.shape)}, base "
                         f"operand {tuple(operand.shape)}, p {tuple(p.shape)}, "
                         f"q {tuple(q.shape)}")


def _storage_args(operand):
    """(w, scales, code, absmax2, code2, offset, stride_cn) for the kernel; the
    pointers a format does not read are any tensor (never loaded)."""
    if operand.base_kind == "int8":
        cb, scb = operand.tensors
        if cb.stride(1) != 1:
            cb = cb.contiguous()
        return cb, scb, scb, scb, scb, scb, cb.stride(0)
    packed, absmax, code, *nested = operand.tensors
    if nested:
        absmax2, code2, offset = nested
        return as_bytes(packed), absmax, code, absmax2, code2, offset.reshape(1), 0
    return as_bytes(packed), absmax, code, absmax, absmax, absmax, 0


def _paired(operand):
    """Whether the forward reads W by bytes (``_paired_forward_loop``): 4-bit, rows of
    whole absmax blocks (the tile depth is then cut to fit inside one block)."""
    # blocksizes and tile depths are powers of two: the smaller divides the larger
    return (operand.transposed and operand.base_kind != "int8" and operand.blocksize >= 32
            and operand.weight_shape[1] % operand.blocksize == 0)


def qlora_gemm(lhs, operand, p, q, bias, lora_scale, *, dropout_p=0.0, seed=0, config=None,
               rank_rt=None, rank_scale=1.0, rank_dropout_p=0.0):
    """``lora_gemm``'s contract with the base operand a ``QuantizedOperand``
    (W^T for the forward, W for dX): out[M, N] = lhs @ deq(W)(^T) + bias +
    lora_scale * ((p @ q) * keep) in lhs's dtype; ``rank_rt``: the decode GEMM
    that makes h = rank_scale * (lhs * keep) @ rank_rt itself (into p)."""
    _check(lhs, operand, p, q)
    if dropout_p > 0 and rank_dropout_p > 0:
        raise ValueError("qlora_gemm masks either the rank term's output (dropout_p) or "
                         "its input (rank_dropout_p), not both")
    m, k = lhs.shape
    n, r = operand.shape[1], p.shape[1]
    out = empty((m, n), lhs.dtype, lhs.device)
    in_kernel = rank_rt is not None
    if in_kernel and n == 0:
        raise ValueError("the rank product in the GEMM needs N > 0: some program writes h")
    if m == 0 or n == 0:
        return out
    pq_dtype = torch.promote_types(p.dtype, q.dtype)
    block_r = epilogue_rank_block(r, pq_dtype.itemsize)
    if in_kernel and block_r < r:
        raise ValueError(f"rank {r} does not fit one epilogue chunk of {block_r}")
    cfg = config or qlora_gemm_config(m)
    paired = _paired(operand)
    if paired:
        cfg = replace(cfg, block_k=min(cfg.block_k, operand.blocksize))
    elif cfg == QLORA_DECODE:
        cfg = QLORA_DECODE_GENERIC
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    has_bias = bias is not None
    threshold = dropout_threshold(max(dropout_p, rank_dropout_p))
    w, scales, code, absmax2, code2, offset, stride_cn = _storage_args(operand)
    with launching("qlora_gemm"):
        _qlora_gemm_kernel[grid](
            lhs, w, scales, code, absmax2, code2, offset,
            p, q, rank_rt if in_kernel else p, bias if has_bias else out, out,
            m, n, k, r, operand.weight_shape[1],
            lhs.stride(0), lhs.stride(1), stride_cn, p.stride(0), p.stride(1),
            q.stride(0), q.stride(1),
            rank_rt.stride(0) if in_kernel else 0, rank_rt.stride(1) if in_kernel else 0,
            bias.stride(0) if has_bias else 0, out.stride(0), out.stride(1),
            float(lora_scale), float(rank_scale), threshold, seed,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            GROUP_M=cfg.group_m, FORMAT="int8" if operand.base_kind == "int8" else "4bit",
            TRANSPOSED=operand.transposed, PAIRED=paired,
            BLOCKSIZE=max(operand.blocksize, 1),
            BLOCKSIZE2=max(operand.blocksize2, 1), NESTED=operand.nested,
            STATE=_STATE_DTYPES[operand.state_dtype],
            HAS_BIAS=has_bias, HAS_DROPOUT=dropout_p > 0,
            UPCAST_DOT=INTERPRET, DOT_PRECISION=dot_precision(lhs.dtype),
            RANK_DOT_PRECISION=dot_precision(pq_dtype),
            RANK_IN_KERNEL=in_kernel, RANK_DROPOUT=in_kernel and rank_dropout_p > 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
    return out
