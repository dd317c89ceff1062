"""The Triton kernels, through ``lorakern.lora_linear``, against the float64 oracle.

On a machine without CUDA these run in Triton's interpreter (see conftest), so
shapes stay small; every case checks the output and every gradient asked for.
"""
import logging

import numpy as np
import pytest
import torch

import lorakern
import lorakern.functional.fused_linear
import lorakern.functional.layouts
from lorakern import kernels
from oracle import assert_matches_oracle, oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED = 20261123


def _make_x(lead, k, layout, dtype, device):
    if layout == "contiguous":
        x = torch.randn(*lead, k)
    elif layout == "transposed":  # (M, K) view of a (K, M) tensor
        x = torch.randn(k, *lead).movedim(0, -1)
    elif layout == "sliced":  # every other column of a wider tensor
        x = torch.randn(*lead, 2 * k)[..., ::2]
    else:
        raise ValueError(layout)
    return x.to(device=device, dtype=dtype)


def _make_grad(shape, layout, dtype, device):
    if layout == "contiguous":
        g = torch.randn(shape)
    elif layout == "transposed":
        g = torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)
    elif layout == "expanded":  # what y.sum() hands back: stride 0 everywhere
        g = torch.randn(()).expand(shape)
    else:
        raise ValueError(layout)
    return g.to(device=device, dtype=dtype)


def make_layer(lead, k, n, r, dtype, device, *, bias=True, x_layout="contiguous",
               adapter_dtype=None, train_weight=False):
    adapter_dtype = adapter_dtype or dtype
    x = _make_x(lead, k, x_layout, dtype, device).requires_grad_()
    weight = torch.randn(n, k, dtype=dtype, device=device).requires_grad_(train_weight)
    lora_A = (torch.randn(r, k, device=device) / k**0.5).to(adapter_dtype).requires_grad_()
    lora_B = torch.randn(n, r, device=device).to(adapter_dtype).requires_grad_()
    b = torch.randn(n, dtype=dtype, device=device).requires_grad_() if bias else None
    return {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "bias": b}


@pytest.fixture(params=["fused", "cublas"])
def strategy(request, monkeypatch):
    """Each strategy of the layer (kernels/lora_layer.py), forced as a user would."""
    monkeypatch.setenv("LORAKERN_STRATEGY", request.param)
    return request.param


def run_and_check(layer, scale, dropout_p, grad_layout, dtype, monkeypatch):
    """Forward + backward through the kernels; compare all against the oracle."""
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: SEED)
    launches_before = sum(kernels.launch_counts.values())
    y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"],
                             scale, layer["bias"], dropout_p)
    grad_y = _make_grad(y.shape, grad_layout, y.dtype, y.device)
    y.backward(grad_y)
    if layer["x"].numel() or y.numel():
        assert sum(kernels.launch_counts.values()) > launches_before, "no kernel launched"

    x = layer["x"]
    keep = None
    if dropout_p > 0:
        m = x.shape[:-1].numel()
        keep = kernels.dropout_keep_mask(m, x.shape[-1], dropout_p, SEED, x.device)
        keep = keep.reshape(x.shape)
    # the kernels drop with p quantised to 1/65536 and scale by 1 / (1 - that p)
    y_ref, grads_ref = oracle(x, layer["weight"], layer["lora_A"], layer["lora_B"], scale,
                              layer["bias"], keep, kernels.effective_dropout_p(dropout_p),
                              grad_y)
    assert y.dtype == x.dtype
    assert_matches_oracle(y.cpu(), y_ref, dtype, "y")
    for name, tensor in layer.items():
        if tensor is None:
            continue
        if tensor.requires_grad:
            assert tensor.grad is not None, f"d{name} was not computed"
            assert tensor.grad.dtype == tensor.dtype, f"d{name} dtype {tensor.grad.dtype}"
            assert_matches_oracle(tensor.grad.cpu(), grads_ref[name], dtype, f"d{name}")
        else:
            assert tensor.grad is None


# (leading dims, in, out, rank, bias, dropout_p, x layout, dY layout): every value
# of M {0, 1, 7, 33}, in {1, 19, 70}, out {1, 23, 64}, r {1, 3, 8, 16, 20, 64},
# bias on/off, dropout on/off, strided x and dY, and 3-D x, each appears; ranks
# 100 and 256 reach the wide-rank tiles.
CASES = [
    ((0,), 19, 23, 8, True, 0.0, "contiguous", "contiguous"),
    ((1,), 1, 1, 1, False, 0.0, "contiguous", "contiguous"),
    ((1,), 70, 64, 16, True, 0.25, "contiguous", "contiguous"),
    ((7,), 19, 23, 3, False, 0.5, "transposed", "transposed"),
    ((7,), 70, 1, 20, True, 0.0, "sliced", "contiguous"),
    ((33,), 70, 64, 3, True, 0.0, "contiguous", "contiguous"),
    ((33,), 1, 23, 64, False, 0.1, "contiguous", "transposed"),
    ((33,), 19, 64, 8, True, 0.0, "sliced", "expanded"),
    ((3, 11), 19, 23, 16, True, 0.3, "contiguous", "contiguous"),
    ((2, 5), 70, 64, 1, False, 0.0, "transposed", "transposed"),
    ((0, 4), 19, 1, 20, True, 0.2, "contiguous", "contiguous"),
    ((5,), 19, 23, 100, True, 0.1, "contiguous", "contiguous"),
    ((3, 3), 40, 17, 256, False, 0.0, "sliced", "transposed"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r,bias,dropout_p,x_layout,grad_layout", CASES,
                         ids=lambda v: str(v).replace(" ", ""))
def test_output_and_every_gradient_match_the_float64_oracle(
        lead, k, n, r, bias, dropout_p, x_layout, grad_layout, dtype, device, monkeypatch,
        strategy):
    torch.manual_seed(hash((lead, k, n, r)) % 2**31)
    layer = make_layer(lead, k, n, r, dtype, device, bias=bias, x_layout=x_layout)
    run_and_check(layer, 0.75, dropout_p, grad_layout, dtype, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_trainable_weight_gets_its_gradient(dtype, dropout_p, device, monkeypatch, strategy):
    torch.manual_seed(1)
    layer = make_layer((21,), 40, 37, 5, dtype, device, train_weight=True)
    run_and_check(layer, 2.0, dropout_p, "contiguous", dtype, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_on_a_half_precision_base(dtype, device, monkeypatch, strategy):
    """PEFT's default: fp32 A and B on a bf16/fp16 model. y in x's dtype, grads
    of A and B in fp32."""
    torch.manual_seed(2)
    layer = make_layer((5, 7), 48, 33, 12, dtype, device, adapter_dtype=torch.float32)
    run_and_check(layer, 0.5, 0.1, "contiguous", dtype, monkeypatch)


@pytest.mark.parametrize("wanted", [("x",), ("lora_A",), ("lora_B",), ("bias",),
                                    ("weight", "lora_B"), ("weight",), ("x", "lora_A")])
def test_only_the_requested_gradients_are_computed(wanted, device, monkeypatch):
    torch.manual_seed(3)
    layer = make_layer((19,), 26, 30, 6, torch.float32, device)
    for name, tensor in layer.items():
        tensor.requires_grad_(name in wanted)
    run_and_check(layer, 1.5, 0.2, "contiguous", torch.float32, monkeypatch)


def test_dropout_keeps_about_one_minus_p_and_scales_the_kept(device):
    keep = kernels.dropout_keep_mask(256, 300, 0.3, 7, device)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    again = kernels.dropout_keep_mask(256, 300, 0.3, 7, device)
    other_seed = kernels.dropout_keep_mask(256, 300, 0.3, 8, device)
    assert torch.equal(keep, again)
    assert not torch.equal(keep, other_seed)


def _philox4x32(seed, c0, c1, rounds):
    """Philox4x32 with counter (c0, c1, 0, 0) and a 64-bit key, in numpy: the
    generator as Salmon et al. define it (and tl.philox implements it)."""
    mask32 = np.uint64(0xFFFFFFFF)
    c = [np.asarray(c0, np.uint64), np.asarray(c1, np.uint64),
         np.zeros_like(c0, np.uint64), np.zeros_like(c0, np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    mul_a, mul_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(rounds):
        prod_b, prod_a = mul_b * c[2], mul_a * c[0]  # < 2^64: no wrap in uint64
        c = [(prod_b >> np.uint64(32)) ^ c[1] ^ k0, prod_b & mask32,
             (prod_a >> np.uint64(32)) ^ c[3] ^ k1, prod_a & mask32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask32
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask32
    return c


def documented_keep_mask(rows, cols, dropout_p, seed):
    """The mask as kernels/dropout.py defines it: one Philox4x32-7 call per
    (row, column group of 8), lane k % 8 = 16-bit half k % 2 of word (k % 8) // 2."""
    m, k = np.meshgrid(np.asarray(rows, np.uint64), np.asarray(cols, np.uint64), indexing="ij")
    words = _philox4x32(seed, k // np.uint64(8), m, rounds=7)
    lane = k % np.uint64(8)
    word = np.choose((lane // np.uint64(2)).astype(np.int64), words)
    bits = (word >> (np.uint64(16) * (lane % np.uint64(2)))) & np.uint64(0xFFFF)
    threshold = round(kernels.effective_dropout_p(dropout_p) * 65536)
    return torch.from_numpy(bits >= np.uint64(threshold))


def test_the_mask_is_philox_7_rounds_16_bits_an_element_as_documented(device):
    for p, seed in [(0.3, 7), (0.5, 2**31 - 2)]:
        keep = kernels.dropout_keep_mask(40, 72, p, seed, device)
        assert torch.equal(keep.cpu(), documented_keep_mask(range(40), range(72), p, seed))


def test_the_mask_is_a_pure_function_of_seed_row_and_column_past_2_to_the_31(device):
    """A window regenerated anywhere equals the slice of a larger one; rows near
    2^31 / 4096 put the element index of a 4096-wide layer across 2^31."""
    row0 = 2**31 // 4096 - 20
    big = kernels.dropout_keep_mask(48, 160, 0.4, 99, device, row_start=row0, col_start=4000)
    part = kernels.dropout_keep_mask(13, 40, 0.4, 99, device, row_start=row0 + 21,
                                     col_start=4000 + 64)
    assert torch.equal(part, big[21:34, 64:104])
    assert torch.equal(big.cpu(), documented_keep_mask(range(row0, row0 + 48),
                                                       range(4000, 4160), 0.4, 99))
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.dropout_keep_mask(4, 4, 0.4, 99, device, col_start=4)


@pytest.mark.parametrize("dropout_p", [0.001, 0.5, 0.9])
def test_the_mask_keeps_one_minus_the_quantised_p(dropout_p, device):
    """p is quantised to 1/65536 (the kernels scale by 1 / (1 - that p), so
    E[drop(x)] = x exactly); over 2^19 elements the kept fraction is within
    4.5 standard deviations of 1 - p_eff."""
    p_eff = kernels.effective_dropout_p(dropout_p)
    assert abs(p_eff - dropout_p) <= 2**-17 and p_eff * 65536 == round(p_eff * 65536)
    assert kernels.keep_scale(dropout_p) == 1.0 / (1.0 - p_eff)
    keep = kernels.dropout_keep_mask(512, 1024, dropout_p, 12345, device)
    n = keep.numel()
    sigma = (p_eff * (1 - p_eff) / n) ** 0.5
    assert abs((1 - keep.float().mean().item()) - p_eff) < 4.5 * sigma


def test_the_forward_runs_the_rank_pass_once_and_the_gemm_once(device, monkeypatch):
    """The mask and drop(x) A^T are made once per call (not per output-column
    block); the backward adds one pass over dY (G, dB and db: no rank pass) and
    one GEMM (dX)."""
    monkeypatch.setenv("LORAKERN_STRATEGY", "fused")
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: SEED)
    layer = make_layer((40,), 48, 70, 8, torch.float32, device)
    names = ("rank_product", "lora_gemm", "grad_output")
    before = dict(kernels.launch_counts)
    y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"],
                             0.5, layer["bias"], 0.25)
    ran = {k: kernels.launch_counts[k] - before.get(k, 0) for k in names}
    assert ran == {"rank_product": 1, "lora_gemm": 1, "grad_output": 0}, ran
    y.sum().backward()
    ran = {k: kernels.launch_counts[k] - before.get(k, 0) for k in names}
    assert ran == {"rank_product": 1, "lora_gemm": 2, "grad_output": 1}, ran


@pytest.mark.parametrize("tokens,rank,forward_launches", [
    ((7,), 8, {"rank_product": 0, "lora_gemm": 1}),
    ((2, 8), 64, {"rank_product": 0, "lora_gemm": 1}),
    ((17,), 8, {"rank_product": 1, "lora_gemm": 1}),
    ((5,), 65, {"rank_product": 1, "lora_gemm": 1}),
])
def test_a_decode_forward_is_one_launch_that_makes_h_for_the_backward(
        tokens, rank, forward_launches, device, monkeypatch):
    """Up to 16 tokens the fused GEMM computes h = drop(x) A^T itself (no rank
    pass) and keeps it for dB, while the whole rank fits one epilogue chunk
    (r <= 64 in 16-bit); the step matches the oracle either way."""
    monkeypatch.setenv("LORAKERN_STRATEGY", "fused")
    torch.manual_seed(16)
    layer = make_layer(tokens, 40, 70, rank, torch.float16, device)
    before = dict(kernels.launch_counts)
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: SEED)
    lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"], 0.5,
                         layer["bias"], 0.3)
    ran = {k: kernels.launch_counts[k] - before.get(k, 0) for k in forward_launches}
    assert ran == forward_launches, ran
    run_and_check(layer, 0.5, 0.3, "contiguous", torch.float16, monkeypatch)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_fp32_adapters_on_fp16_keep_h_and_db_beyond_the_fp16_range(dropout_p, device,
                                                                   monkeypatch, strategy):
    """PEFT computes the rank products of fp32 adapters in fp32: here h = x A^T
    (~9e4) and dB (~3e5) exceed fp16's 65504 while y stays in range. Rounded to
    fp16 they would be inf; in fp32 every output is finite and matches."""
    torch.manual_seed(14)
    layer = make_layer((5, 7), 48, 33, 12, torch.float16, device, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer["x"].copy_(60 + torch.randn(5, 7, 48))
        layer["lora_A"].copy_(30 + torch.randn(12, 48))
        layer["lora_B"].mul_(1e-3)
        h = layer["x"].float() @ layer["lora_A"].t()
    assert h.abs().min() > 65504
    run_and_check(layer, 0.5, dropout_p, "contiguous", torch.float16, monkeypatch)
    assert layer["lora_B"].grad.abs().max() > 65504


def test_dropout_draws_a_new_mask_each_call_following_torch_manual_seed(device):
    torch.manual_seed(4)
    layer = make_layer((16,), 32, 24, 4, torch.float32, device)
    args = (layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"], 1.0, None, 0.5)
    first, second = lorakern.lora_linear(*args), lorakern.lora_linear(*args)
    assert not torch.equal(first, second)
    torch.manual_seed(11)
    replay_a = lorakern.lora_linear(*args)
    torch.manual_seed(11)
    replay_b = lorakern.lora_linear(*args)
    assert torch.equal(replay_a, replay_b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_in_x_propagate_to_their_rows(dtype, device):
    torch.manual_seed(5)
    layer = make_layer((9,), 20, 18, 4, dtype, device)
    x = layer["x"].detach().clone()
    x[2, 3] = float("nan")
    x[6, 0] = float("inf")
    y = lorakern.lora_linear(x, layer["weight"], layer["lora_A"], layer["lora_B"], 1.0,
                             layer["bias"], 0.0)
    bad_rows = ~torch.isfinite(y).all(dim=1)
    assert bad_rows.tolist() == [i in (2, 6) for i in range(9)]
    assert torch.isnan(y[2]).all()


def test_nan_in_the_incoming_gradient_reaches_every_gradient(device):
    torch.manual_seed(6)
    layer = make_layer((8,), 20, 18, 4, torch.float32, device)
    y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"],
                             1.0, layer["bias"], 0.0)
    grad_y = torch.randn_like(y)
    grad_y[3, 5] = float("nan")
    y.backward(grad_y)
    assert torch.isnan(layer["x"].grad[3]).all()
    for name in ("lora_A", "lora_B", "bias"):
        assert torch.isnan(layer[name].grad).any(), name


def test_saved_for_backward_is_x_xAt_and_the_weights_only(device):
    """Neither the dropout mask nor a dropped copy of x is stored."""
    torch.manual_seed(7)
    m, k, n, r = 24, 40, 36, 5
    layer = make_layer((m,), k, n, r, torch.float32, device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"],
                                 1.0, layer["bias"], 0.5)
    y.sum().backward()
    inputs = {id(t) for t in (layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"])}
    new = [t for t in saved if id(t) not in inputs]
    assert len(saved) == 5, [tuple(t.shape) for t in saved]
    assert [tuple(t.shape) for t in new] == [(m, r)], [tuple(t.shape) for t in new]
    assert sum(t.numel() for t in new) == m * r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_computes_in_the_autocast_dtype_like_nn_linear(dtype, device, monkeypatch):
    torch.manual_seed(8)
    layer = make_layer((10,), 24, 20, 4, torch.float32, device)
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: SEED)
    with torch.autocast(device.type, dtype=dtype):
        y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"],
                                 1.0, layer["bias"], 0.0)
        base = torch.nn.functional.linear(layer["x"], layer["weight"], layer["bias"])
    assert y.dtype == base.dtype == dtype
    y.float().sum().backward()
    assert layer["lora_A"].grad.dtype == torch.float32
    cast = {k: (None if v is None else v.detach().to(dtype)) for k, v in layer.items()}
    y_ref, _ = oracle(cast["x"], cast["weight"], cast["lora_A"], cast["lora_B"], 1.0,
                      cast["bias"])
    assert_matches_oracle(y.cpu(), y_ref, dtype, "y under autocast")


def test_the_kernels_get_rows_of_unit_stride_and_a_copy_is_said_once(device, monkeypatch,
                                                                     caplog):
    """A transposed x and the expanded dY of ``y.sum()`` are copied to contiguous
    rows before any kernel reads them (the layouts the kernels are compiled and
    checked for); the log says so once per tensor role, and the result is the
    oracle's."""
    seen = []
    real_forward, real_grad_output = kernels.lora_forward, kernels.lora_grad_output

    def forward(x, *args, **kwargs):
        seen.append(("x", x.stride()))
        return real_forward(x, *args, **kwargs)

    def grad_output(dy, *args, **kwargs):
        seen.append(("dY", dy.stride()))
        return real_grad_output(dy, *args, **kwargs)

    monkeypatch.setattr(kernels, "lora_forward", forward)
    monkeypatch.setattr(kernels, "lora_grad_output", grad_output)
    monkeypatch.setattr(lorakern.functional.layouts, "_copied", set())
    layer = make_layer((7,), 19, 23, 3, torch.float32, device, x_layout="transposed")
    assert layer["x"].stride(-1) != 1
    with caplog.at_level(logging.INFO, logger="lorakern"):
        for _ in range(2):
            for t in layer.values():
                if t is not None:
                    t.grad = None
            run_and_check(layer, 1.0, 0.5, "expanded", torch.float32, monkeypatch)
    assert {name for name, _ in seen} == {"x", "dY"}
    assert all(stride[-1] == 1 for _, stride in seen), seen
    copies = [r.getMessage() for r in caplog.records
              if "copied to contiguous rows" in r.getMessage()]
    assert len(copies) == 2 and copies[0].startswith("lorakern: x ") and \
        copies[1].startswith("lorakern: dY "), copies


def test_cpu_calls_go_through_the_kernels_under_the_interpreter(device, monkeypatch):
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    layer = make_layer((4,), 8, 6, 2, torch.float32, device)
    before = kernels.launch_counts["lora_forward"]
    lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"])
    assert kernels.launch_counts["lora_forward"] == before + 1


def test_backend_reference_forces_the_pytorch_path(device, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "reference")
    layer = make_layer((4,), 8, 6, 2, torch.float32, device)
    before = sum(kernels.launch_counts.values())
    y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"])
    y.sum().backward()
    assert sum(kernels.launch_counts.values()) == before


def test_fused_function_can_be_applied_directly(device):
    torch.manual_seed(9)
    layer = make_layer((6,), 12, 10, 3, torch.float32, device)
    y = lorakern.FusedLoRALinear.apply(layer["x"], layer["weight"], layer["lora_A"],
                                       layer["lora_B"], layer["bias"], 0.5, 0.0)
    y_ref, _ = oracle(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"], 0.5,
                      layer["bias"])
    assert_matches_oracle(y.detach().cpu(), y_ref, torch.float32, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,r", [(512, 1024, 1024, 16), (300, 2048, 1000, 128),
                                     (4, 4096, 1024, 8), (1, 1000, 3000, 256)])
def test_llm_sized_layers_match_the_oracle_on_cuda(m, k, n, r, dtype, monkeypatch):
    torch.manual_seed(10)
    layer = make_layer((m,), k, n, r, dtype, torch.device("cuda"), train_weight=True)
    run_and_check(layer, 2.0, 0.1, "contiguous", dtype, monkeypatch)


def _strided_bias(layout, n, dtype, device):
    """(bias view, the leaf it views): a bias that is not a contiguous vector."""
    if layout == "every-other":
        source = torch.randn(2 * n)
        view = lambda t: t[::2]
    elif layout == "matrix-column":
        source = torch.randn(n, 3)
        view = lambda t: t[:, 1]
    elif layout == "expanded":  # one value broadcast: stride 0
        source = torch.randn(1)
        view = lambda t: t.expand(n)
    else:
        raise ValueError(layout)
    leaf = source.to(device=device, dtype=dtype).requires_grad_()
    return view(leaf), leaf, view


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["every-other", "matrix-column", "expanded"])
def test_a_strided_bias_is_read_through_its_strides(layout, dtype, device, monkeypatch,
                                                    strategy):
    torch.manual_seed(12)
    layer = make_layer((9,), 20, 18, 4, dtype, device, bias=False)
    bias, leaf, view = _strided_bias(layout, 18, dtype, device)
    assert not bias.is_contiguous()
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: SEED)
    y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"],
                             0.5, bias, 0.0)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_ref, grads = oracle(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"], 0.5,
                          bias, None, 0.0, grad_y)
    assert_matches_oracle(y.cpu(), y_ref, dtype, f"y with a {layout} bias")
    # the oracle's bias gradient, routed back to the leaf the bias views
    leaf64 = torch.zeros(leaf.shape, dtype=torch.float64, requires_grad=True)
    view(leaf64).backward(grads["bias"])
    assert_matches_oracle(leaf.grad.cpu(), leaf64.grad, dtype, f"d(bias source), {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", [(0, 7), (11, 0), (0, 0)], ids=["in=0", "out=0", "in=out=0"])
def test_a_layer_without_inputs_or_outputs_behaves_like_nn_linear(k, n, dtype, device,
                                                                   monkeypatch, strategy):
    """No input features: y is the bias (zeros without one); no output features: an
    empty y. Every gradient comes back, zero where nothing flows."""
    torch.manual_seed(13)
    layer = make_layer((2, 5), k, n, 3, dtype, device, train_weight=True)
    run_and_check(layer, 1.5, 0.2, "contiguous", dtype, monkeypatch)
    base = torch.nn.functional.linear(layer["x"].detach(), layer["weight"].detach(),
                                      layer["bias"].detach())
    y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"],
                             1.5, layer["bias"], 0.2)
    assert y.shape == base.shape == (2, 5, n)
    assert torch.equal(y.detach(), base)


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=str)
def test_the_custom_ops_fake_h_has_the_kernels_dtype(adapter_dtype, device):
    """torch.compile builds its graph from the fake implementation: h is fp32
    with fp32 adapters, as the rank pass writes it, and x's dtype otherwise."""
    from lorakern.functional.ops import lora_linear_op

    torch.manual_seed(15)
    layer = make_layer((6,), 16, 12, 4, torch.float16, device, adapter_dtype=adapter_dtype)
    args = (layer["x"].detach(), layer["weight"].detach(), layer["lora_A"].detach(),
            layer["lora_B"].detach(), layer["bias"].detach(), 0.5, 0.0,
            torch.zeros(1, dtype=torch.int64))
    _, h = lora_linear_op(*args)
    assert h.dtype == adapter_dtype
    torch.library.opcheck(lora_linear_op, args,
                          test_utils=("test_schema", "test_faketensor"))
