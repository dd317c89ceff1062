"""The Triton dequantisation of bitsandbytes' layouts against bitsandbytes itself, bit for bit.

bitsandbytes quantises on the CPU here and its own ``dequantize_4bit`` /
``int8_vectorwise_dequant`` is the oracle; the kernels run in the interpreter
(on a GPU, compiled). Equality is of the bits (a view as integers): every rounding
counts (for FP4 up to the sign of a zero, see below).
"""
import itertools

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from lorakern.kernels.dequant_bnb import dequantize_4bit, dequantize_int8  # noqa: E402

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # every blocksize bitsandbytes takes
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(autouse=True)
def eager_bitsandbytes(monkeypatch):
    """bitsandbytes' PyTorch path (a blocksize of 2048 or more on an AVX-512 CPU, an odd
    last dimension) is wrapped in torch.compile, which compiles C++ for seconds per
    shape; run eagerly it is the same function, element by element."""
    from bitsandbytes.backends.default import ops
    compiled = ops._dequantize_4bit_compute
    monkeypatch.setattr(ops, "_dequantize_4bit_compute", getattr(compiled, "__wrapped__", compiled))


def bitsandbytes_dequantize(packed, state):
    """bitsandbytes' dequantisation of a 4-bit weight.

    Its CPU backend runs a C++ kernel, except for a blocksize of 2048 or more on
    an AVX-512 CPU and an odd last dimension, which go to its PyTorch
    implementation (bitsandbytes/backends/cpu/ops.py). The C++ kernel assumes
    rows made of whole blocks: with in_features not a multiple of the blocksize
    it scales elements by the wrong block's absmax (bitsandbytes 0.50.2; the
    round trip of a (8, 32) weight at blocksize 64 is off by 5 where the
    quantisation step is under 1). Its PyTorch implementation, like its CUDA
    kernel and ours, indexes blocks over the flattened weight: it is the oracle
    there.
    """
    from bitsandbytes.backends.cpu import ops as cpu_ops
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    in_features, blocksize = state.shape[-1], state.blocksize
    if in_features % blocksize == 0 and not (cpu_ops._has_avx512 and blocksize >= 2048):
        return bnb_functional.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    expected = default_ops._dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax,
                                                    code, blocksize, state.shape, state.dtype)
    return expected


def assert_same_bits(actual, expected, name):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{name}: {tuple(actual.shape)} {actual.dtype}, bitsandbytes "
        f"{tuple(expected.shape)} {expected.dtype}")
    differ = actual.view(BITS[actual.dtype]) != expected.view(BITS[expected.dtype])
    if differ.any():
        where = tuple(int(i) for i in differ.nonzero()[0])
        raise AssertionError(f"{name}: {int(differ.sum())} of {differ.numel()} values differ, "
                             f"first at {where}: {actual[where].item()!r} vs bitsandbytes "
                             f"{expected[where].item()!r}")


def quantised(shape, dtype, quant_type, nested, blocksize, storage=torch.uint8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 3).to(dtype)
    return bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=nested, quant_storage=storage)


def kernel_dequantize(packed, state):
    nested = {}
    if state.nested:
        nested = dict(absmax2=state.state2.absmax, code2=state.state2.code,
                      blocksize2=state.state2.blocksize, offset=state.offset)
    return dequantize_4bit(packed, state.absmax, state.code,
                           state.blocksize, state.shape, state.dtype, **nested)


def check_4bit(shape, dtype, quant_type, nested, blocksize, storage=torch.uint8):
    packed, state = quantised(shape, dtype, quant_type, nested, blocksize, storage)
    expected = bitsandbytes_dequantize(packed, state)
    name = f"{shape} {quant_type} nested={nested} blocksize={blocksize} {dtype} storage={storage}"
    actual = kernel_dequantize(packed, state)
    if quant_type == "fp4":
        assert_same_bits_up_to_zero_sign(actual, expected, name)
    else:
        assert_same_bits(actual, expected, name)


def assert_same_bits_up_to_zero_sign(actual, expected, name):
    """FP4 has a zero code of each sign; bitsandbytes' CPU paths disagree on the sign
    of code 0b1000's (its scalar C++ loop -0.0, elsewhere +0.0): values, not bits."""
    zeros = expected == 0
    assert (actual[zeros] == 0).all(), f"{name}: a zero of bitsandbytes is not zero here"
    assert_same_bits(torch.where(zeros, 0.0, actual).to(actual.dtype),
                     torch.where(zeros, 0.0, expected).to(expected.dtype), name)


# bf16 (the interpreter's cast is corrected to round to nearest) at every blocksize,
# NF4 and FP4, absmax nested or not; rows of 4096 (whole blocks, as in a model)
@pytest.mark.parametrize("quant_type,nested",
                         list(itertools.product(("nf4", "fp4"), (False, True))))
def test_4bit_every_blocksize_bf16_is_bitsandbytes_bit_for_bit(quant_type, nested):
    for blocksize in BLOCKSIZES:
        check_4bit((1, 4096), torch.bfloat16, quant_type, nested, blocksize)


def test_4bit_fp16_fp32_and_16_bit_storages_are_bitsandbytes_bit_for_bit():
    for quant_type, nested, dtype in itertools.product(("nf4", "fp4"), (False, True),
                                                       (torch.float16, torch.float32)):
        check_4bit((6, 24), dtype, quant_type, nested, 64)
    # FSDP's quant_storage: the same bytes held as 16- or 32-bit elements
    for storage in (torch.bfloat16, torch.float16, torch.float32):
        check_4bit((8, 32), torch.bfloat16, "nf4", True, 64, storage)


def test_nested_absmax_over_several_second_level_blocks():
    # 10240 elements / 32 = 320 absmax blocks: two of the second level's 256, and
    # five kernel programs of 64 blocks
    check_4bit((64, 160), torch.bfloat16, "nf4", True, 32)
    check_4bit((64, 160), torch.float16, "fp4", True, 32)


def test_an_odd_blocksize_is_refused_by_name():
    packed, state = quantised((4, 32), torch.bfloat16, "nf4", False, 64)
    with pytest.raises(ValueError, match="blocksize 63 must be even"):
        dequantize_4bit(packed, state.absmax, state.code, 63, state.shape, state.dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_blocks_across_rows_and_odd_in_features_match_bitsandbytes(quant_type):
    for shape in ((12, 40), (8, 32), (5, 13)):
        check_4bit(shape, torch.bfloat16, quant_type, True, 32)
        check_4bit(shape, torch.float16, quant_type, False, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_rows_are_bitsandbytes_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(19, 150, generator=gen).to(torch.float16)
    w[3] *= 40  # rows of very different ranges
    cb, scb, _ = bnb_functional.int8_vectorwise_quant(w)
    expected = bnb_functional.int8_vectorwise_dequant(cb, scb).to(dtype)
    assert_same_bits(dequantize_int8(cb, scb, dtype), expected, f"int8 {dtype}")
