"""The LoRA layer over a bitsandbytes 4-bit or 8-bit base (QLoRA), kernels and reference.

The oracle is the float64 layer over the weight bitsandbytes itself dequantises
(bit-exact with ours, tests/test_dequant_bnb.py); every gradient of x, A, B and
the bias is checked, with dropout, odd shapes, ranks below 16, fp32 adapters on
a bf16 base, 3-D and strided x. The saved-tensor test proves that no tensor of
the base's shape is kept for the backward.
"""
import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

import lorakern.functional.fused_linear  # noqa: E402
from lorakern import kernels  # noqa: E402
from lorakern.functional.quantized_weight import (Bnb4bitWeight, Bnb8bitWeight,  # noqa: E402
                                                  quantized_lora_linear)
from oracle import assert_matches_oracle, oracle  # noqa: E402

SEED = 4321


def base_4bit(out_features, in_features, dtype, quant_type="nf4", nested=True, blocksize=64,
              compute_dtype=None):
    # in_features a multiple of blocksize: bitsandbytes 0.50.2's CPU dequantisation is
    # wrong otherwise (see tests/test_dequant_bnb.py), and it is the oracle's W here
    assert in_features % blocksize == 0
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype) * 0.5
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    base = Bnb4bitWeight("layers.0.q_proj", packed, state, compute_dtype or dtype)
    return base, bnb_functional.dequantize_4bit(packed, state).to(compute_dtype or dtype)


def base_8bit(out_features, in_features, dtype):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.float16)
    cb, scb, _ = bnb_functional.int8_vectorwise_quant(w)
    return (Bnb8bitWeight("layers.0.v_proj", cb, scb, dtype),
            bnb_functional.int8_vectorwise_dequant(cb, scb).to(dtype))


def adapters(rank, in_features, out_features, dtype, seed=7):
    gen = torch.Generator().manual_seed(seed)
    lora_A = (torch.randn(rank, in_features, generator=gen) * 0.3).to(dtype).requires_grad_()
    lora_B = (torch.randn(out_features, rank, generator=gen) * 0.3).to(dtype).requires_grad_()
    return lora_A, lora_B


# the kernels each strategy runs for W: its tiles dequantised in the GEMM, or a buffer
STRATEGY_KERNELS = {"fused": ("qlora_gemm", "dequant"), "cublas": ("dequant", "qlora_gemm")}


def run_and_check(base, dense, x, lora_A, lora_B, bias, scale, dropout_p, compute_dtype,
                  monkeypatch, strategy="fused"):
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: SEED)
    monkeypatch.setenv("LORAKERN_STRATEGY", strategy)
    before = dict(kernels.launch_counts)
    y = quantized_lora_linear(x, base, lora_A, lora_B, scale, bias, dropout_p)
    gen = torch.Generator().manual_seed(8)
    grad_y = torch.randn(y.shape, generator=gen).to(y.dtype)
    y.backward(grad_y)
    launched = {name for name, count in kernels.launch_counts.items()
                if count > before.get(name, 0)}
    runs, not_run = STRATEGY_KERNELS[strategy]
    assert any(name.startswith(runs) for name in launched), (strategy, launched)
    assert not any(name.startswith(not_run) for name in launched), (strategy, launched)
    keep = None
    if dropout_p > 0:
        m = x.shape[:-1].numel()
        keep = kernels.dropout_keep_mask(m, x.shape[-1], dropout_p, SEED, x.device)
        keep = keep.reshape(x.shape)
    y_ref, grads = oracle(x, dense, lora_A, lora_B, scale, bias, keep,
                          kernels.effective_dropout_p(dropout_p), grad_y)
    assert y.dtype == x.dtype
    assert_matches_oracle(y, y_ref, compute_dtype, "y")
    for name, tensor in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if tensor is not None and tensor.requires_grad:
            assert tensor.grad.dtype == tensor.dtype
            assert_matches_oracle(tensor.grad, grads[name], compute_dtype, f"d{name}")


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
@pytest.mark.parametrize("quant_type,nested,rank,dropout_p", [
    ("nf4", True, 3, 0.1),    # QLoRA's default, a rank below 16, dropout
    ("fp4", False, 20, 0.0),  # a rank over 16, no dropout
])
def test_4bit_base_with_fp32_adapters_every_gradient(quant_type, nested, rank, dropout_p,
                                                     strategy, monkeypatch):
    # bf16 compute, fp32 adapters (PEFT's QLoRA), a 3-D x, odd sizes, a bias
    base, dense = base_4bit(40, 64, torch.bfloat16, quant_type, nested)
    lora_A, lora_B = adapters(rank, 64, 40, torch.float32)
    x = torch.randn(2, 9, 64).bfloat16().requires_grad_()
    bias = torch.randn(40).bfloat16().requires_grad_()
    run_and_check(base, dense, x, lora_A, lora_B, bias, 0.5, dropout_p, torch.bfloat16,
                  monkeypatch, strategy)


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
def test_4bit_base_fp16_adapters_strided_x(strategy, monkeypatch):
    base, dense = base_4bit(24, 64, torch.float16, "nf4", True, blocksize=32)
    lora_A, lora_B = adapters(8, 64, 24, torch.float16)
    x = torch.randn(64, 11).half().t().requires_grad_()  # (11, 64), stride 11 along K
    run_and_check(base, dense, x, lora_A, lora_B, None, 2.0, 0.2, torch.float16, monkeypatch,
                  strategy)


def test_fused_gemm_past_decode_with_blocks_across_rows_and_a_16_bit_storage(monkeypatch):
    # 40 tokens (the GEMM's rank term from a rank pass, not made in the kernel), K = 72
    # not a multiple of the blocksize (absmax blocks cross rows), codes held in a bf16
    # quant_storage (FSDP), the state in fp16 and the compute dtype bf16 (two roundings,
    # as the dequantised buffer and its cast): the oracle's W is our reference
    # dequantiser, since bitsandbytes' CPU dequantisation is wrong for such K
    from lorakern.functional.quantized_weight import reference_dequantize_4bit

    gen = torch.Generator().manual_seed(11)
    w = torch.randn(30, 72, generator=gen).half()
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                 compress_statistics=True,
                                                 quant_storage=torch.bfloat16)
    base = Bnb4bitWeight("layers.1.up_proj", packed, state, torch.bfloat16)
    dense = reference_dequantize_4bit(
        packed, state.absmax, state.code, 64, state.shape, torch.float16,
        absmax2=state.state2.absmax, code2=state.state2.code,
        blocksize2=state.state2.blocksize, offset=state.offset).bfloat16()
    torch.testing.assert_close(base.kernel_operand().dense(), dense, rtol=0, atol=0)
    lora_A, lora_B = adapters(5, 72, 30, torch.float32)
    x = torch.randn(40, 72).bfloat16().requires_grad_()
    bias = torch.randn(30).bfloat16().requires_grad_()
    run_and_check(base, dense, x, lora_A, lora_B, bias, 0.75, 0.1, torch.bfloat16,
                  monkeypatch, "fused")


@pytest.mark.parametrize("tokens", [1, 40])
def test_fused_and_cublas_strategies_agree_on_an_8bit_base(tokens, monkeypatch):
    base, _ = base_8bit(33, 40, torch.bfloat16)
    lora_A, lora_B = adapters(5, 40, 33, torch.float32)
    x = torch.randn(tokens, 40).bfloat16()
    outputs = {}
    for strategy in ("fused", "cublas"):
        monkeypatch.setenv("LORAKERN_STRATEGY", strategy)
        outputs[strategy] = quantized_lora_linear(x, base, lora_A, lora_B, 0.5)
    # the same dequantised values and the same rounded term: only fp32 summation
    # order differs, far below one bf16 rounding of the output
    assert_matches_oracle(outputs["fused"], outputs["cublas"].double(), torch.bfloat16, "y")


def test_fp32_x_on_a_bf16_compute_dtype_is_cast_as_bitsandbytes_casts(monkeypatch):
    # prepare_model_for_kbit_training leaves fp32 hidden states: x is cast to the
    # compute dtype for the products and y comes back in fp32
    base, dense = base_4bit(16, 64, torch.bfloat16)
    lora_A, lora_B = adapters(4, 64, 16, torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    y = quantized_lora_linear(x, base, lora_A, lora_B, 1.0)
    assert y.dtype == torch.float32
    y_ref, _ = oracle(x.detach().bfloat16(), dense, lora_A, lora_B, 1.0)
    assert_matches_oracle(y.detach(), y_ref, torch.bfloat16, "y")
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and lora_A.grad is not None


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
def test_8bit_base_every_gradient(strategy, monkeypatch):
    base, dense = base_8bit(33, 40, torch.bfloat16)
    lora_A, lora_B = adapters(5, 40, 33, torch.float32)
    x = torch.randn(7, 40).bfloat16().requires_grad_()
    run_and_check(base, dense, x, lora_A, lora_B, None, 0.25, 0.1, torch.bfloat16,
                  monkeypatch, strategy)


def test_nothing_of_the_base_weight_is_saved_for_backward():
    base, _ = base_4bit(64, 128, torch.bfloat16)
    lora_A, lora_B = adapters(8, 128, 64, torch.float32)
    x = torch.randn(4, 128).bfloat16().requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = quantized_lora_linear(x, base, lora_A, lora_B, 1.0, None, 0.1)
    assert saved, "no tensor saved at all: the hooks did not see the layer"
    assert all(shape != (64, 128) for shape, _ in saved), saved
    # x, A, B and h (M x r, fp32): the 16-bit bound of a 16-bit base
    saved_bytes = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size()
                      for s, d in saved)
    assert saved_bytes <= (4 * 128 * 2 + 8 * 128 * 4 + 64 * 8 * 4 + 4 * 8 * 4), saved
    y.sum().backward()
    assert lora_B.grad is not None


def test_reference_backend_saves_no_dequantised_weight(monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "reference")
    base, dense = base_4bit(32, 64, torch.bfloat16)
    lora_A, lora_B = adapters(4, 64, 32, torch.float32)
    x = torch.randn(3, 64).bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        y = quantized_lora_linear(x, base, lora_A, lora_B, 1.0)
    assert all(tuple(s) != (32, 64) for s in saved), saved
    y_ref, grads = oracle(x, dense, lora_A, lora_B, 1.0, grad_y=torch.ones(3, 32))
    assert_matches_oracle(y.detach(), y_ref, torch.bfloat16, "y")
    y.backward(torch.ones_like(y))
    assert_matches_oracle(lora_A.grad, grads["lora_A"], torch.bfloat16, "dlora_A")


def test_a_quantised_base_refuses_a_weight_gradient_and_bad_shapes():
    base, _ = base_4bit(16, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="layers.0.q_proj.*frozen"):
        base.grad_buffer(torch.empty)
    lora_A, lora_B = adapters(4, 30, 16, torch.float32)
    with pytest.raises(ValueError, match="layers.0.q_proj.*lora_A"):
        quantized_lora_linear(torch.randn(2, 64).bfloat16(), base, lora_A, lora_B)
    with pytest.raises(ValueError, match="layers.0.q_proj: x has 31 features"):
        quantized_lora_linear(torch.randn(2, 31).bfloat16(), base, *adapters(4, 64, 16,
                                                                              torch.float32))


def test_bitsandbytes_layers_that_cannot_be_read_are_refused_by_name():
    import bitsandbytes as bnb
    from torch import nn
    from lorakern.functional.quantized_weight import bnb_base_weight

    not_quantised = bnb.nn.Linear4bit(64, 16, compute_dtype=torch.bfloat16)  # not moved yet
    with pytest.raises(ValueError, match="blocks.1.fc: .*no quant state"):
        bnb_base_weight(not_quantised, "blocks.1.fc", torch.bfloat16)
    on_meta = bnb.nn.Linear4bit(64, 16, device="meta")
    with pytest.raises(ValueError, match="blocks.1.fc: .*meta device"):
        bnb_base_weight(on_meta, "blocks.1.fc", torch.bfloat16)
    fp16_weights = bnb.nn.Linear8bitLt(64, 16, has_fp16_weights=True)
    with pytest.raises(ValueError, match="blocks.1.fc: .*no int8 weight"):
        bnb_base_weight(fp16_weights, "blocks.1.fc", torch.bfloat16)
    with pytest.raises(ValueError, match="blocks.1.fc: Linear is not a quantised base"):
        bnb_base_weight(nn.Linear(64, 16), "blocks.1.fc", torch.bfloat16)
    quantised = bnb.nn.Linear4bit(64, 16, compute_dtype=torch.bfloat16,
                                  quant_type="nf4").to("cpu")
    weight = bnb_base_weight(quantised, "blocks.1.fc", torch.float32)
    assert weight.shape == (16, 64) and weight.dtype == torch.bfloat16  # compute_dtype's


def test_the_dequantise_then_addmm_composition_keeps_no_weight_and_matches_addmm():
    from bench.composition import addmm_lora, dequant_addmm_lora

    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    lora_A, lora_B = adapters(3, 20, 12, torch.float64)
    x = torch.randn(5, 20, generator=gen, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        y = dequant_addmm_lora(x, lambda: weight.clone(), lora_A, lora_B, 0.5)
    assert all(tuple(s) != (12, 20) for s in saved), saved
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, lora_A, lora_B)]
    for t in (x, lora_A, lora_B):
        t.grad = None
    addmm_lora(x, weight, lora_A, lora_B, 0.5).sum().backward()
    for got, t in zip(grads, (x, lora_A, lora_B)):
        torch.testing.assert_close(got, t.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("quant_type,nested,blocksize,storage,state_dtype,compute_dtype,"
                         "in_features", [
    ("nf4", True, 64, torch.uint8, torch.bfloat16, torch.bfloat16, 72),  # QLoRA's default
    ("fp4", True, 32, torch.float16, torch.float16, torch.bfloat16, 72),  # two roundings
    ("nf4", False, 128, torch.float32, torch.float32, torch.float16, 72),
    ("nf4", True, 32, torch.uint8, torch.bfloat16, torch.bfloat16, 96),  # whole blocks a row
    ("fp4", True, 64, torch.float16, torch.float16, torch.bfloat16, 128),  # 2 roundings too
])
def test_the_fused_gemm_dequantises_each_weight_bit_for_bit(quant_type, nested, blocksize,
                                                           storage, state_dtype,
                                                           compute_dtype, in_features):
    # I @ deq(W)^T and I @ deq(W) with a zero LoRA term hold each dequantised weight
    # once, exactly: the tiles the main loop builds equal the dequantised buffer bit for
    # bit. K = 72 leaves absmax blocks across rows (the generic loop); K a multiple of
    # the blocksize takes the forward's byte-pair loop
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(20, in_features, generator=gen).to(state_dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested,
                                                 quant_storage=storage)
    operand = Bnb4bitWeight("layers.2.down_proj", packed, state, compute_dtype).kernel_operand()
    _check_fused_reads_the_buffer(operand, compute_dtype)


def test_the_fused_gemm_dequantises_each_int8_weight_bit_for_bit():
    base, _ = base_8bit(20, 72, torch.float16)
    _check_fused_reads_the_buffer(base.kernel_operand(), torch.float16)


def _check_fused_reads_the_buffer(operand, compute_dtype):
    from lorakern.kernels.qlora_gemm import qlora_gemm

    buffer = operand.dense()  # (out, in), the cublas strategy's
    for rhs, expected in ((operand.t(), buffer.t()), (operand, buffer)):
        k, n = rhs.shape
        eye = torch.eye(k, dtype=compute_dtype)
        p, q = torch.zeros(k, 1, dtype=compute_dtype), torch.zeros(1, n, dtype=compute_dtype)
        out = qlora_gemm(eye, rhs, p, q, None, 1.0)
        assert torch.equal(out.view(torch.int16), expected.contiguous().view(torch.int16)), \
            (out - expected).abs().max()


# ---- the decode forward (kernels/qlora_decode.py): W as the left operand, K split

@pytest.mark.parametrize("programs", [4, 64], ids=["one-slice", "k-slices"])
@pytest.mark.parametrize("m,n,k,r,dropout_p,adapter_dtype,quant_type,nested,blocksize", [
    (5, 200, 128, 5, 0.0, torch.bfloat16, "nf4", True, 64),
    (16, 96, 256, 16, 0.3, torch.float32, "fp4", False, 64),
    (1, 70, 192, 3, 0.1, torch.float32, "nf4", True, 32),
    (9, 64, 512, 20, 0.2, torch.bfloat16, "nf4", True, 128)])
def test_the_decode_forward_makes_y_and_h_in_one_launch(m, n, k, r, dropout_p, adapter_dtype,
                                                        quant_type, nested, blocksize,
                                                        programs, monkeypatch):
    """At M <= 16 the fused forward over a 4-bit base is one qlora_decode launch
    (y and h, K split into slices whose partials the last slice sums); y and every
    gradient (dB from its h) match the float64 oracle, and the counters are left at
    zero for the next launch."""
    from lorakern.kernels import _common, qlora_decode
    monkeypatch.setattr(qlora_decode, "target_programs", lambda device: programs)
    base, dense = base_4bit(n, k, torch.bfloat16, quant_type=quant_type, nested=nested,
                            blocksize=blocksize)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(m, k, generator=gen).bfloat16().requires_grad_()
    lora_A, lora_B = adapters(r, k, n, adapter_dtype)
    bias = torch.randn(n, generator=gen).bfloat16().requires_grad_()
    before = dict(kernels.launch_counts)
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: SEED)
    monkeypatch.setenv("LORAKERN_STRATEGY", "fused")
    y = quantized_lora_linear(x, base, lora_A, lora_B, 0.7, bias, dropout_p)
    ran = {name: kernels.launch_counts[name] - before.get(name, 0)
           for name in ("qlora_decode", "qlora_gemm", "rank_product")}
    assert ran == {"qlora_decode": 1, "qlora_gemm": 0, "rank_product": 0}, ran
    grad_y = torch.randn(y.shape, generator=gen).bfloat16()
    y.backward(grad_y)
    keep = None
    if dropout_p > 0:
        keep = kernels.dropout_keep_mask(m, k, dropout_p, SEED, x.device)
    y_ref, grads = oracle(x, dense, lora_A, lora_B, 0.7, bias, keep,
                          kernels.effective_dropout_p(dropout_p), grad_y)
    assert_matches_oracle(y, y_ref, torch.bfloat16, "y")
    for name, tensor in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        assert_matches_oracle(tensor.grad, grads[name], tensor.dtype, name)
    assert all(int(c.abs().sum()) == 0 for c in _common._ARRIVAL_COUNTERS.values())


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_the_decode_forward_dequantises_w_bit_for_bit(quant_type, nested, monkeypatch):
    """Rows of x that each pick one k (and B = 0, no bias): y is W's column k as
    bitsandbytes dequantises it, bit for bit, through the code lookups and K slices."""
    from lorakern.kernels import qlora_decode
    monkeypatch.setattr(qlora_decode, "target_programs", lambda device: 64)
    n, k, r = 96, 256, 4
    base, dense = base_4bit(n, k, torch.bfloat16, quant_type=quant_type, nested=nested)
    picks = torch.tensor([0, 1, 2, 63, 64, 65, 127, 128, 129, 190, 191, 200, 233, 254, 255, 7])
    x = torch.zeros(16, k, dtype=torch.bfloat16)
    x[torch.arange(16), picks] = 1.0
    h = torch.empty(16, r, dtype=torch.float32)
    lora_a_t = torch.randn(k, r)
    y = qlora_decode.qlora_decode(x, base.kernel_operand().t(), h, torch.zeros(r, n), None,
                                  1.0, lora_a_t, 1.0, 0.0, 0)
    assert torch.equal(y.view(torch.int16), dense[:, picks].t().contiguous().view(torch.int16))
    torch.testing.assert_close(h, x.float() @ lora_a_t, rtol=1e-6, atol=1e-6)
