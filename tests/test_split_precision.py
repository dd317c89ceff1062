"""fp32 adapters on a 16-bit base: the rank products on the tensor cores at fp32 accuracy.

Every rank product there meets a 16-bit operand (x or dY) with an fp32 one (A, B, h
or G). ``kernels/_common.mixed_mma`` cuts the fp32 operand into three parts that sum
to it exactly, each exact in the 16-bit operand's MMA type (bf16 for a bf16 operand,
TF32 for fp16), so each product on the tensor cores is exact in fp32 and only the
fp32 accumulation rounds: |error| <= gamma(K + 2) sum_k |a_k b_k|, against gamma(K)
for IEEE fp32 products.

Triton's interpreter computes ``tl.dot`` in full fp32 whatever its input precision,
so the interpreted kernels cannot show a precision loss the GPU would have. Here the
reduced-precision operands are emulated in PyTorch: the parts are made as the kernel
makes them (its own helper, interpreted, checked against the emulation bit for bit),
each part is checked to be exact in its MMA type (so the GPU's TF32 / bf16 operand
rounding leaves it alone), and the products are formed from the parts with fp32
accumulation and compared with the float64 oracle, beside PEFT's fp32 path on the
same inputs (x cast to fp32, IEEE fp32 matmuls).
"""
import pytest
import torch
import triton
import triton.language as tl

from lorakern.kernels import _common

KEEP = {torch.bfloat16: 0xFFFF0000, torch.float16: 0xFFFFE000}  # bf16 / TF32 parts
U = 2.0**-24  # fp32's unit roundoff


def emulated_parts(v, narrow):
    """The three parts of fp32 ``v`` as ``_exact_parts`` makes them, in PyTorch."""
    keep = torch.tensor(KEEP[narrow] - (1 << 32), dtype=torch.int32)  # as a signed word

    def top(t):
        return (t.view(torch.int32) & keep).view(torch.float32)

    hi = top(v)
    rest = v - hi
    mid = top(rest)
    return hi, mid, rest - mid


def exact_in(part, narrow):
    """Whether the GPU's operand rounding leaves ``part`` unchanged."""
    if narrow == torch.bfloat16:
        return torch.equal(part.to(torch.bfloat16).float(), part)
    low_bits = part.view(torch.int32) & 0x1FFF  # TF32 keeps 10 of fp32's 23 mantissa bits
    return bool((low_bits == 0).all())


@triton.jit
def _parts_kernel(v_ptr, narrow_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    hi, mid, lo = _common._exact_parts(tl.load(v_ptr + offs), tl.load(narrow_ptr + offs))
    tl.store(out_ptr + offs, hi)
    tl.store(out_ptr + BLOCK + offs, mid)
    tl.store(out_ptr + 2 * BLOCK + offs, lo)


def _wide_values(n, seed):
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-60, 61, (n,), generator=gen).float())
    return torch.randn(n, generator=gen) * magnitude


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16], ids=str)
def test_the_kernels_parts_sum_exactly_and_are_exact_in_the_mma_type(narrow):
    v = _wide_values(1024, seed=1)
    out = torch.empty(3 * 1024)
    _parts_kernel[(1,)](v, torch.zeros(1024, dtype=narrow), out, BLOCK=1024)
    parts = out.view(3, 1024)
    for got, want in zip(parts, emulated_parts(v, narrow)):
        assert torch.equal(got, want)  # the emulation is the kernel's split
    assert torch.equal(parts.double().sum(0), v.double())  # hi + mid + lo == v, exactly
    for part in parts:
        assert exact_in(part, narrow)
    # the high part alone is what one reduced-precision product would see
    assert (parts[0] != v).any()


def _products(seed, narrow):
    """The layer's four rank products, each (16-bit operand, fp32 operand, how they
    meet): fwd h = x A^T, G = dY B, dB = dY^T h, dA = G^T x (tn_matmul: x^T G)."""
    gen = torch.Generator().manual_seed(seed)
    m, k, n, r = 300, 257, 190, 12

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    x = randn(m, k).to(narrow)
    dy = randn(m, n).to(narrow)
    lora_a = randn(r, k, std=k**-0.5)
    lora_b = randn(n, r, std=r**-0.5)
    h = x.float() @ lora_a.t()
    g = dy.float() @ lora_b
    return {"h = x A^T": (x, lora_a.t()), "G = dY B": (dy, lora_b),
            "dB = dY^T h": (dy.t(), h), "dA^T = x^T G": (x.t(), g)}


def _split_product(narrow_operand, wide):
    """The kernel's product: each exact part meets the 16-bit operand (exact in the
    MMA type, so the fp32 emulation is the GPU's product), fp32 accumulation."""
    a = narrow_operand.float()
    acc = torch.zeros(a.shape[0], wide.shape[1])
    for part in reversed(emulated_parts(wide.contiguous(), narrow_operand.dtype)):
        acc = acc + a @ part
    return acc


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16], ids=str)
def test_every_rank_product_is_as_accurate_as_peft_fp32_path(narrow):
    """Against float64: the split's error is within PEFT's fp32 error plus the two
    roundings of adding three partial products, and far below what one TF32 or bf16
    product of the fp32 operand would give (what plain "tf32" costs)."""
    for name, (a, b) in _products(seed=2, narrow=narrow).items():
        oracle = a.double() @ b.double()
        scale = oracle.abs().max().item()

        def error(result):
            return (result.double() - oracle).abs().max().item()

        split = error(_split_product(a, b))
        peft = error(a.float() @ b)  # PEFT: x.to(fp32) @ fp32 weight, IEEE
        one_part = error(a.float() @ emulated_parts(b.contiguous(), narrow)[0])
        print(f"{name} {narrow}: split {split:.3e} PEFT fp32 {peft:.3e} one part "
              f"{one_part:.3e} (max |oracle| {scale:.3e})")
        assert split <= peft + 2 * U * scale, (name, split, peft)
        assert split * 100 < one_part, (name, split, one_part)


def test_the_precision_follows_torchs_switches(monkeypatch):
    """Split by default; TF32 when torch allows it; IEEE FMA products when torch's
    fp32 matmul precision is set to "ieee"; fp32 with fp32 stays IEEE by default."""
    bf16, f32 = torch.bfloat16, torch.float32
    matmul = torch.backends.cuda.matmul
    # torch's default; an earlier `allow_tf32 = False` anywhere leaves "ieee" behind
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "none"
        monkeypatch.setattr(_common, "tf32_allowed", lambda: False)
        assert _common.mixed_precision(bf16, f32) == "split"
        assert _common.mixed_precision(f32, f32) == "ieee"
        assert _common.mixed_precision(bf16, bf16) == "tf32"  # unused by 16-bit dots
        assert _common.term_precision(f32, bf16) == "tf32x3"
        assert _common.term_precision(f32, bf16, block_r=32) == "ieee"  # no stack frame
        assert _common.term_precision(f32, f32) == "ieee"
        monkeypatch.setattr(_common, "tf32_allowed", lambda: True)
        assert _common.mixed_precision(bf16, f32) == "tf32"
        assert _common.term_precision(f32, bf16) == "tf32"
        monkeypatch.undo()
        for precision, mixed, same in (("ieee", "ieee", "ieee"), ("tf32", "tf32", "tf32")):
            matmul.fp32_precision = precision
            assert _common.mixed_precision(bf16, f32) == mixed
            assert _common.term_precision(f32, bf16) == mixed
            assert _common.dot_precision(f32) == same
    finally:
        matmul.fp32_precision = before


def _tf32(t):
    """fp32 rounded to TF32 (nearest, ties away: cvt.rna.tf32.f32, what Triton's
    tf32x3 uses for its parts)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_lora_term_at_tf32x3_stays_below_the_16_bit_outputs_rounding(out_dtype):
    """h B^T (forward) and G A (dX) are fp32 with fp32 products onto a 16-bit output:
    Triton's tf32x3 (a_hi b_hi + a_hi b_lo + a_lo b_hi, each part TF32), emulated, is
    within 2^-16 of max |term| of the float64 term, 2^5-2^7 below the output's own
    rounding (2^-9 bf16, 2^-11 fp16); rounded to the output dtype it is within one
    unit of the rounded IEEE term, plus that bound."""
    gen = torch.Generator().manual_seed(3)
    m, r, n = 257, 12, 190
    h = torch.randn(m, r, generator=gen)
    lora_b = torch.randn(n, r, generator=gen) * r**-0.5
    a_hi, b_hi = _tf32(h), _tf32(lora_b.t())
    a_lo, b_lo = _tf32(h - a_hi), _tf32(lora_b.t() - b_hi)
    term = a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi
    oracle = h.double() @ lora_b.t().double()
    scale = oracle.abs().max().item()
    assert (term.double() - oracle).abs().max().item() <= 2.0**-16 * scale
    ieee = (h @ lora_b.t()).to(out_dtype).double()
    # one unit in the last place: at most 2^-7 |v| (bf16), 2^-10 |v| (fp16)
    ulp = 2.0**-7 if out_dtype == torch.bfloat16 else 2.0**-10
    apart = (term.to(out_dtype).double() - ieee).abs() > ulp * ieee.abs() + 2.0**-16 * scale
    assert int(apart.sum()) == 0, f"{int(apart.sum())} elements more than one unit apart"
