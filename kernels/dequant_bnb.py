"""Dequantisation of bitsandbytes' 4-bit and 8-bit weight layouts, bit for bit.

4-bit (``Params4bit``, NF4 or FP4). W (N, K) is stored flattened in row-major
order, two codes per byte, element 2j in the high nibble of byte j and 2j + 1
in the low one; the bytes may be held in a 16- or 32-bit ``quant_storage``
tensor (FSDP), which is read here as its bytes. Element i belongs to absmax
block i // blocksize over the flattened tensor (blocks cross rows when K is not
a multiple of blocksize):

    W[i] = fp32(code[nibble(i)] * absmax[i // blocksize])          cast to dtype

With nested ("double") quantisation the absmax is itself 8-bit blockwise
quantised against a 256-entry second-level code, with an offset added back:

    absmax[b] = fp32(fp32(code2[q[b]] * absmax2[b // blocksize2]) + offset)

8-bit (``Int8Params``, LLM.int8()'s row-wise layout): CB (N, K) int8, SCB (N,)
fp32 the absolute maximum of each row,

    W[n, k] = fp32(fp32(CB[n, k] * SCB[n]) * fp32(1 / 127))          cast to dtype

``code`` is ``QuantState.code`` (fp32), FP4's code 0b1000 read from it as +0.0.
bitsandbytes' own CPU paths disagree on that zero's sign (its vectorised C++
kernel and PyTorch fallback give +0.0, its scalar C++ loop -0.0); nothing else
differs. Each product above is one fp32 rounding, in that order, then one
round-to-nearest cast: what bitsandbytes computes. The launches disable
floating-point contraction, since a fused multiply-add of the nested absmax
would round once where bitsandbytes rounds twice.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, empty, launching, to_storage

# bitsandbytes multiplies by this float (1/127 rounded as its source writes it)
INT8_INVERSE_SCALE = 7.874015718698502e-3
DEQUANT_BYTES = 1024  # packed bytes a program: whole absmax blocks, at least one


def dequant_4bit_blocks(blocksize):
    """(absmax blocks a program, bytes a block padded to a power of two) of the
    4-bit dequantisation for this blocksize."""
    half = triton.next_power_of_2(blocksize // 2)
    return max(1, DEQUANT_BYTES // half), half


@triton.jit
def absmax_of(block, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, mask,
              BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """The fp32 absmax of the 4-bit blocks ``block`` (an int tensor of block ids)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0)
        scale = scale * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        return scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def dequant_4bit_at(flat, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                    mask, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                    NESTED: tl.constexpr):
    """fp32 values of the elements at flat (int64) indices ``flat`` of a 4-bit weight."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = absmax_of(flat // BLOCKSIZE, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, mask,
                      BLOCKSIZE2, NESTED)
    return value * scale


@triton.jit
def _dequant_4bit_kernel(
    # pointers
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    # sizes
    numel, blocks,
    # meta-parameters
    BLOCKS: tl.constexpr, HALF: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """BLOCKS whole absmax blocks a program, read as bytes: each byte's two codes
    are looked up and scaled by their block's one absmax, and written as the
    adjacent pair (2j, 2j + 1). HALF is BLOCKSIZE / 2 (bytes a block) rounded up
    to a power of two."""
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offs_byte = tl.arange(0, HALF)
    byte_index = block[:, None] * (BLOCKSIZE // 2) + offs_byte[None, :]
    load_mask = (offs_byte[None, :] < BLOCKSIZE // 2) & (byte_index * 2 < numel)
    byte = tl.load(packed_ptr + byte_index, mask=load_mask, other=0).to(tl.int32)
    scale = absmax_of(block, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block < blocks,
                      BLOCKSIZE2, NESTED)[:, None]
    high = tl.load(code_ptr + (byte >> 4), mask=load_mask, other=0.0) * scale
    low = tl.load(code_ptr + (byte & 0xF), mask=load_mask, other=0.0) * scale
    value = tl.reshape(tl.join(high, low), (BLOCKS, 2 * HALF))
    offs_element = tl.arange(0, 2 * HALF)
    flat = block[:, None] * BLOCKSIZE + offs_element[None, :]
    store_mask = (offs_element[None, :] < BLOCKSIZE) & (flat < numel)
    tl.store(out_ptr + flat, to_storage(value, out_ptr.dtype.element_ty, INTERPRETED),
             mask=store_mask)


@triton.jit
def dequant_int8_at(rows, cols, cb_ptr, scb_ptr, stride_cn, mask, INVERSE_SCALE: tl.constexpr):
    """fp32 values of CB[rows, cols] * SCB[rows] / 127 (rows, cols broadcastable)."""
    q = tl.load(cb_ptr + rows.to(tl.int64) * stride_cn + cols, mask=mask, other=0)
    row_max = tl.load(scb_ptr + rows, mask=mask, other=0.0)
    return (q.to(tl.float32) * row_max) * INVERSE_SCALE


@triton.jit
def _dequant_int8_kernel(
    # pointers
    cb_ptr, scb_ptr, out_ptr,
    # sizes
    N, K,
    # strides
    stride_cn, stride_on,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INVERSE_SCALE: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    value = dequant_int8_at(rows[:, None], cols[None, :], cb_ptr, scb_ptr, stride_cn, mask,
                            INVERSE_SCALE)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_on + cols[None, :],
             to_storage(value, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


INT8_BLOCK_N, INT8_BLOCK_K = 16, 128


def as_bytes(packed):
    """The packed codes as a flat uint8 tensor, whatever ``quant_storage`` holds them."""
    packed = packed.contiguous()
    return packed.view(torch.uint8).reshape(-1)


def dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, *, absmax2=None, code2=None,
                    blocksize2=256, offset=None, out=None):
    """W of ``shape`` in ``dtype`` from a 4-bit layout (see the module docstring).

    ``absmax``: fp32 (plain) or uint8 (nested, with ``absmax2``, ``code2``,
    ``blocksize2`` and the 0-d fp32 ``offset``). ``out``: a contiguous buffer of
    ``shape`` and ``dtype`` to write (else one is allocated).
    """
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"dequantize_4bit: blocksize {blocksize} must be even (a block is "
                         "whole bytes of two codes), as bitsandbytes' blocksizes are")
    nested = absmax2 is not None
    numel = 1
    for size in shape:
        numel *= size
    if out is None:
        out = empty(tuple(shape), dtype, packed.device)
    if numel == 0:
        return out
    if nested:
        extra = (absmax2, code2, offset.reshape(1))
    else:
        extra = (absmax, absmax, absmax)  # not read: NESTED is off
    blocks_per_program, half = dequant_4bit_blocks(blocksize)
    blocks = triton.cdiv(numel, blocksize)
    grid = (triton.cdiv(blocks, blocks_per_program),)
    with launching("dequant_4bit"):
        _dequant_4bit_kernel[grid](as_bytes(packed), absmax, code, *extra, out, numel, blocks,
                                   BLOCKS=blocks_per_program, HALF=half, BLOCKSIZE=blocksize,
                                   BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested,
                                   INTERPRETED=INTERPRET, enable_fp_fusion=False)
    return out


def dequantize_int8(cb, scb, dtype, *, out=None):
    """W (N, K) in ``dtype`` from LLM.int8()'s row-wise layout: CB (N, K) int8, SCB (N,)."""
    n, k = cb.shape
    if cb.stride(1) != 1:
        cb = cb.contiguous()
    if out is None:
        out = empty((n, k), dtype, cb.device)
    if cb.numel() == 0:
        return out
    grid = (triton.cdiv(n, INT8_BLOCK_N), triton.cdiv(k, INT8_BLOCK_K))
    with launching("dequant_int8"):
        _dequant_int8_kernel[grid](cb, scb, out, n, k, cb.stride(0), out.stride(0),
                                   BLOCK_N=INT8_BLOCK_N, BLOCK_K=INT8_BLOCK_K,
                                   INVERSE_SCALE=INT8_INVERSE_SCALE, INTERPRETED=INTERPRET,
                                   enable_fp_fusion=False)
    return out
