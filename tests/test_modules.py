"""``LoRALinear``: forward and gradients against the float64 oracle, init, dtypes,
``from_linear`` (nn.Linear and GPT-2's Conv1D), merge and unmerge, the merged
state through state dicts.

The kernels run in Triton's interpreter on CPU (see conftest): shapes are tens.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lorakern
import lorakern.functional.fused_linear
import lorakern.layers.adapter
from lorakern import kernels, reference
from lorakern.layers import LoRALinear
from oracle import assert_matches_oracle, oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED = 20261123


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D, as it stores and computes: weight (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        return x @ self.weight + self.bias


def with_random_adapter(layer, b_std=1.0):
    """A nonzero B (and a fresh A), as after some training."""
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape) / layer.in_features**0.5)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * b_std)
    return layer


def out_in(layer):
    return layer.weight.t() if layer.fan_in_fan_out else layer.weight


def ulp(t, dtype):
    """Spacing of ``dtype`` at |t| (float64)."""
    info = torch.finfo(dtype)
    magnitude = t.detach().double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def bits(t):
    return t.detach().clone().view({2: torch.int16, 4: torch.int32}[t.element_size()])


# ---------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_forward_and_gradients_match_the_float64_oracle(dtype, bias, backend, device,
                                                        monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("LORAKERN_BACKEND", "reference")
    torch.manual_seed(1)
    layer = with_random_adapter(LoRALinear(19, 23, r=5, alpha=7, bias=bias, device=device,
                                           dtype=dtype))
    x = torch.randn(3, 7, 19, device=device).to(dtype).requires_grad_()
    launches = sum(kernels.launch_counts.values())
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ran_kernels = sum(kernels.launch_counts.values()) > launches
    assert ran_kernels == (backend == "kernels")

    assert y.dtype == dtype and y.shape == (3, 7, 23)
    y_ref, grads = oracle(x, layer.weight, layer.lora_A, layer.lora_B, 7 / 5, layer.bias,
                          grad_y=grad_y)
    # the formula itself, in float64
    x64, w64, a64, b64 = (t.detach().cpu().double() for t in (x, layer.weight, layer.lora_A,
                                                               layer.lora_B))
    formula = x64 @ w64.T + 7 / 5 * (x64 @ a64.T) @ b64.T
    if bias:
        formula = formula + layer.bias.detach().cpu().double()
    torch.testing.assert_close(y_ref, formula, rtol=1e-12, atol=1e-12)
    assert_matches_oracle(y.detach().cpu(), y_ref, dtype, "y")
    assert_matches_oracle(x.grad.cpu(), grads["x"], dtype, "dx")
    assert_matches_oracle(layer.lora_A.grad.cpu(), grads["lora_A"], dtype, "dA")
    assert_matches_oracle(layer.lora_B.grad.cpu(), grads["lora_B"], dtype, "dB")
    assert layer.lora_A.grad.dtype == layer.lora_A.dtype
    # the base layer is frozen: no gradient reaches it
    assert not layer.weight.requires_grad and layer.weight.grad is None
    if bias:
        assert not layer.bias.requires_grad and layer.bias.grad is None


def test_output_equals_the_reference_function_on_the_same_tensors(device, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "reference")
    torch.manual_seed(2)
    layer = with_random_adapter(LoRALinear(12, 9, r=3, alpha=5, device=device))
    x = torch.randn(4, 12, device=device)
    expected = reference.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, 5 / 3,
                                     layer.bias)
    assert torch.equal(layer(x), expected)


def test_only_the_adapters_are_trainable(device):
    layer = LoRALinear(8, 6, r=2, device=device)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "_extra_state"}


def test_dropout_applies_in_training_only(device, monkeypatch):
    torch.manual_seed(3)
    p = 0.4
    layer = with_random_adapter(LoRALinear(20, 18, r=4, alpha=8, dropout=p, device=device))
    x = torch.randn(2, 9, 20, device=device)
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: SEED)

    y_train = layer(x)  # a new module trains, like nn.Linear
    keep = kernels.dropout_keep_mask(18, 20, p, SEED, x.device).reshape(x.shape)
    assert 0 < keep.sum() < keep.numel()
    y_ref, _ = oracle(x, layer.weight, layer.lora_A, layer.lora_B, 2.0, layer.bias, keep,
                      kernels.effective_dropout_p(p))  # p as the kernels quantise it
    assert_matches_oracle(y_train.cpu(), y_ref, torch.float32, "y (training, dropout)")

    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x)), "eval output is not deterministic"
    no_dropout = lorakern.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, 2.0,
                                      layer.bias, 0.0)
    assert torch.equal(y_eval, no_dropout)
    assert not torch.equal(y_eval, y_train)


@pytest.mark.parametrize("use_rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scale_is_alpha_over_r_or_over_sqrt_r(use_rslora, expected, device):
    torch.manual_seed(4)
    layer = with_random_adapter(LoRALinear(10, 7, r=4, alpha=16, use_rslora=use_rslora,
                                           device=device))
    assert layer.scale == expected and layer.use_rslora == use_rslora
    x = torch.randn(5, 10, device=device)
    y_ref, _ = oracle(x, layer.weight, layer.lora_A, layer.lora_B, expected, layer.bias)
    assert_matches_oracle(layer(x).detach().cpu(), y_ref, torch.float32, "y")


# ---------------------------------------------------------------- init and dtypes
def test_base_layer_is_drawn_like_nn_linear(device):
    torch.manual_seed(5)
    linear = nn.Linear(30, 20, device=device)
    torch.manual_seed(5)
    layer = LoRALinear(30, 20, device=device)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert LoRALinear(30, 20, bias=False).bias is None


def test_kaiming_init_of_A_is_uniform_within_one_over_sqrt_in_and_B_is_zero():
    torch.manual_seed(6)
    layer = LoRALinear(400, 3, r=64)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) on fan_in = in_features
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.99 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_gaussian_init_of_A_has_std_one_over_r_and_B_is_zero():
    torch.manual_seed(7)
    layer = LoRALinear(400, 3, r=16, init="gaussian")
    a = layer.lora_A.detach()
    assert abs(a.std().item() - 1 / 16) < 0.03 / 16
    assert abs(a.mean().item()) < 0.05 / 16
    assert torch.count_nonzero(layer.lora_B) == 0


def test_a_new_layer_computes_the_base_layer(device):
    """B = 0: the adapter adds nothing until it trains."""
    torch.manual_seed(8)
    layer = LoRALinear(16, 12, device=device)
    x = torch.randn(6, 16, device=device)
    y_ref, _ = oracle(x, layer.weight, torch.zeros(1, 16), torch.zeros(12, 1), 1.0, layer.bias)
    assert_matches_oracle(layer(x).detach().cpu(), y_ref, torch.float32, "y")


@pytest.mark.parametrize("base,adapter_dtype,expected", [
    (torch.bfloat16, None, torch.float32),
    (torch.float16, None, torch.float32),
    (torch.float32, None, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
], ids=str)
def test_adapter_dtype_defaults_to_fp32_on_a_half_precision_base(base, adapter_dtype, expected,
                                                                  device):
    torch.manual_seed(9)
    layer = with_random_adapter(LoRALinear(16, 8, r=4, dtype=base, device=device,
                                           adapter_dtype=adapter_dtype))
    assert layer.weight.dtype == layer.bias.dtype == base
    assert layer.lora_A.dtype == layer.lora_B.dtype == expected
    x = torch.randn(3, 16, device=device, dtype=base)
    y = layer(x)
    assert y.dtype == base
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == expected


@pytest.mark.parametrize("kwargs,pattern", [
    ({"r": 0}, r"r=0"),
    ({"r": -3}, r"r=-3"),
    ({"r": 2.5}, r"r=2.5"),
    ({"r": True}, r"r=True"),
    ({"alpha": float("inf")}, r"alpha=inf"),
    ({"alpha": float("nan")}, r"alpha=nan"),
    ({"alpha": "16"}, r"alpha='16'"),
    ({"dropout": 1.0}, r"dropout=1.0"),
    ({"dropout": -0.1}, r"dropout=-0.1"),
    ({"init": "xavier"}, r"init='xavier'"),
    ({"adapter_dtype": torch.int8}, r"adapter_dtype=torch.int8"),
    ({"in_features": -1}, r"in_features=-1"),
])
def test_bad_constructor_arguments_are_refused_by_value(kwargs, pattern):
    args = {"in_features": 8, "out_features": 4, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        LoRALinear(**args)
    if "in_features" not in kwargs:
        with pytest.raises(ValueError, match=pattern):
            LoRALinear.from_linear(nn.Linear(8, 4), **kwargs)


def test_extra_repr_and_merged_is_read_only(device):
    layer = LoRALinear(19, 23, r=5, alpha=7, dropout=0.1, device=device)
    text = repr(layer)
    assert text.startswith("LoRALinear(")
    assert ("in_features=19, out_features=23, r=5, alpha=7, scale=1.4, dropout=0.1, "
            "bias=True, merged=False") in text
    layer.merge()
    assert "merged=True" in repr(layer)
    with pytest.raises(AttributeError):
        layer.merged = False
    assert "fan_in_fan_out=True" in repr(LoRALinear.from_linear(Conv1D(4, 3)))


# ---------------------------------------------------------------- from_linear
def test_from_linear_holds_the_same_parameter_objects(device):
    torch.manual_seed(10)
    linear = nn.Linear(14, 11, device=device).eval()
    weight, bias = linear.weight, linear.bias
    layer = LoRALinear.from_linear(linear, r=3, alpha=6, dropout=0.2)
    assert layer.weight is weight and layer.bias is bias
    assert not weight.requires_grad and not bias.requires_grad
    assert (layer.in_features, layer.out_features, layer.r, layer.scale) == (14, 11, 3, 2.0)
    assert layer.dropout == 0.2 and not layer.fan_in_fan_out and not layer.training
    assert layer.lora_A.device == weight.device and layer.lora_A.shape == (3, 14)
    x = torch.randn(5, 14, device=device)
    assert_matches_oracle(layer(x).detach().cpu(), linear(x).detach().cpu().double(),
                          torch.float32, "y at init")
    with_random_adapter(layer)
    y_ref, _ = oracle(x, weight, layer.lora_A, layer.lora_B, 2.0, bias)
    assert_matches_oracle(layer(x).detach().cpu(), y_ref, torch.float32, "y")


def test_from_linear_on_bf16_without_bias_gets_fp32_adapters(device):
    linear = nn.Linear(8, 5, bias=False, device=device, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(linear)
    assert layer.bias is None and layer.weight is linear.weight
    assert layer.lora_A.dtype == torch.float32


def test_from_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALinear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="already"):
        LoRALinear.from_linear(LoRALinear(4, 4))
    quantized = nn.Linear(4, 4)
    quantized.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="torch.int8 weight"):
        LoRALinear.from_linear(quantized)


def _check_conv1d(conv, device):
    conv = conv.to(device)
    weight, bias = conv.weight, conv.bias
    layer = LoRALinear.from_linear(conv, r=4, alpha=4)
    assert layer.weight is weight and layer.bias is bias and not weight.requires_grad
    assert layer.fan_in_fan_out
    assert tuple(layer.weight.shape) == (13, 21)  # (in, out), as stored, never copied
    assert (layer.in_features, layer.out_features) == (13, 21)
    assert layer.lora_A.shape == (4, 13) and layer.lora_B.shape == (21, 4)
    x = torch.randn(2, 3, 13, device=device, requires_grad=True)
    assert_matches_oracle(layer(x).detach().cpu(), conv(x).detach().cpu().double(),
                          torch.float32, "y at init")
    with_random_adapter(layer)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_ref, grads = oracle(x, weight.t(), layer.lora_A, layer.lora_B, 1.0, bias, grad_y=grad_y)
    assert_matches_oracle(y.detach().cpu(), y_ref, torch.float32, "y")
    assert_matches_oracle(layer.lora_A.grad.cpu(), grads["lora_A"], torch.float32, "dA")
    assert_matches_oracle(layer.lora_B.grad.cpu(), grads["lora_B"], torch.float32, "dB")
    assert weight.grad is None


def test_from_conv1d_keeps_its_in_out_weight_and_computes_x_w_plus_b(device):
    torch.manual_seed(11)
    _check_conv1d(Conv1D(21, 13), device)


def test_from_transformers_conv1d(device):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(12)
    _check_conv1d(pytorch_utils.Conv1D(21, 13), device)


# ---------------------------------------------------------------- merge / unmerge
def _conv1d_layer(dtype, device):
    conv = Conv1D(23, 19).to(device=device, dtype=dtype)
    return LoRALinear.from_linear(conv, r=5, alpha=10)


LAYOUTS = {
    "linear": lambda dtype, device: LoRALinear(19, 23, r=5, alpha=10, dtype=dtype,
                                               device=device),
    "conv1d": _conv1d_layer,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_output_matches_the_oracle_like_the_unmerged(layout, dtype, device):
    torch.manual_seed(13)
    layer = with_random_adapter(LAYOUTS[layout](dtype, device), b_std=0.2).eval()
    x = torch.randn(6, 19, device=device).to(dtype)
    y_ref, _ = oracle(x, out_in(layer), layer.lora_A, layer.lora_B, 2.0, layer.bias)
    before = sum(kernels.launch_counts.values())
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    assert sum(kernels.launch_counts.values()) == before, "merged layer ran the LoRA kernels"
    assert_matches_oracle(y_merged.detach().cpu(), y_ref, dtype, "y merged")
    layer.unmerge()
    assert not layer.merged
    assert_matches_oracle(layer(x).detach().cpu(), y_ref, dtype, "y unmerged")


def test_merging_twice_or_unmerging_an_unmerged_layer_raises(device):
    layer = with_random_adapter(LoRALinear(6, 5, r=2, device=device))
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    merged = layer.weight.clone()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, merged) and layer.merged


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_merge_that_would_be_non_finite_raises_and_leaves_weight_bit_identical(
        layout, dtype, device, monkeypatch):
    """The bad row is in the last chunk: every chunk is checked before any is written."""
    monkeypatch.setattr(lorakern.layers.adapter, "MERGE_CHUNK_ROWS", 4)
    torch.manual_seed(14)
    layer = with_random_adapter(LAYOUTS[layout](dtype, device))
    with torch.no_grad():
        if layout == "linear":  # stored rows are outputs: B's last row
            layer.lora_B[-1, 0] = float("nan")
        else:  # stored rows are inputs: A's last column
            layer.lora_A[0, -1] = float("nan")
    original = bits(layer.weight)
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(bits(layer.weight), original)
    assert not layer.merged


def test_a_merge_that_overflows_float16_raises_and_leaves_weight_bit_identical(device):
    """Finite in fp32, beyond float16's 65504 once cast."""
    torch.manual_seed(15)
    layer = with_random_adapter(LoRALinear(8, 6, r=2, alpha=2, dtype=torch.float16,
                                           device=device))
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B[2].fill_(5e4)  # row 2 of the delta: 1e5
    original = bits(layer.weight)
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(bits(layer.weight), original)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_rounds_once_to_the_weight_dtype(layout, dtype, device):
    """W + s B A formed in float32 and rounded once: within half an ulp of the exact
    sum, plus float32's own rounding (what a half-precision delta would exceed)."""
    torch.manual_seed(22)
    layer = with_random_adapter(LAYOUTS[layout](dtype, device), b_std=0.5)
    w0 = out_in(layer).detach().double()
    a64, b64 = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    exact = w0 + layer.scale * (b64 @ a64)
    magnitude = w0.abs() + layer.scale * (b64.abs() @ a64.abs())
    layer.merge()
    merged = out_in(layer).detach()
    error = (merged.double() - exact).abs()
    bound = 0.5 * ulp(merged, dtype) + 8 * torch.finfo(torch.float32).eps * magnitude
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"merged weight off by {worst:.3f} of the allowed rounding"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unmerge_restores_the_weight_to_one_unit_in_the_last_place(layout, dtype, device):
    """Merge and unmerge each round once: W comes back within one ulp at the
    magnitude of the merged weight, whatever the size of the delta."""
    torch.manual_seed(16)
    layer = with_random_adapter(LAYOUTS[layout](dtype, device), b_std=0.5)
    w0 = layer.weight.detach().clone()
    layer.merge()
    w_merged = layer.weight.detach().clone()
    assert not torch.equal(w_merged, w0)
    layer.unmerge()
    w1 = layer.weight.detach()
    largest = torch.maximum(torch.maximum(w0.abs(), w_merged.abs()), w1.abs())
    error = (w1.double() - w0.double()).abs()
    bound = ulp(largest, dtype)
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"unmerge is {worst:.3f} ulp from the original weight"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unmerge_of_a_small_delta_restores_each_weight_to_one_ulp_of_itself(layout, dtype,
                                                                              device):
    """The common case, |s B A| well below |W| everywhere: rtol = eps, atol = 0."""
    torch.manual_seed(17)
    layer = LAYOUTS[layout](dtype, device)
    with torch.no_grad():
        magnitude = torch.rand(layer.weight.shape) * 0.5 + 0.5
        layer.weight.copy_(magnitude * torch.randn(layer.weight.shape).sign())
        layer.lora_A.copy_(torch.rand(layer.lora_A.shape) * 2 - 1)
        layer.lora_B.copy_((torch.rand(layer.lora_B.shape) * 2 - 1) * 0.02)  # |delta| < 0.2
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert 0 < (layer.weight.double() - w0.double()).abs().max() < 0.25
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, atol=0, rtol=torch.finfo(dtype).eps)


def test_unmerge_subtracts_what_merge_added_even_if_scale_changed(device):
    torch.manual_seed(18)
    layer = with_random_adapter(LoRALinear(12, 10, r=3, device=device), b_std=0.1)
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.scale = 100.0
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, atol=1e-6, rtol=1e-6)


class AllocationLog(TorchDispatchMode):
    """Records the size of every tensor an op returns, except views of ``known``."""

    def __init__(self, known):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known if t is not None}
        self.new_bytes = []
        self.mm_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.new_bytes.append(t.untyped_storage().nbytes())
        if func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default):
            self.mm_shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("layout,rows,cols", [("linear", 64, 12), ("conv1d", 40, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_works_in_chunks_and_never_allocates_an_out_by_in_tensor(
        layout, rows, cols, dtype, device, monkeypatch):
    monkeypatch.setattr(lorakern.layers.adapter, "MERGE_CHUNK_ROWS", 8)
    torch.manual_seed(19)
    if layout == "linear":
        layer = LoRALinear(cols, rows, r=3, dtype=dtype, device=device)
    else:  # Conv1D stores (in, out): its stored rows are the input features
        layer = LoRALinear.from_linear(Conv1D(cols, rows).to(device=device, dtype=dtype), r=3)
    with_random_adapter(layer)
    assert tuple(layer.weight.shape) == (rows, cols)
    expected = out_in(layer).double() + layer.scale * (layer.lora_B.double()
                                                       @ layer.lora_A.double())
    log = AllocationLog([layer.weight, layer.bias, layer.lora_A, layer.lora_B])
    with log:
        layer.merge()
    one_chunk_fp32 = 8 * cols * 4
    assert max(log.new_bytes) <= one_chunk_fp32, sorted(log.new_bytes)[-5:]
    assert max(log.new_bytes) < rows * cols * layer.weight.element_size()
    # the delta is made chunk by chunk, each a block of stored rows, covering all of them
    assert log.mm_shapes and all(shape == (8, cols) for shape in log.mm_shapes)
    assert len(log.mm_shapes) >= rows // 8
    assert_matches_oracle(out_in(layer).detach(), expected, dtype, "merged weight")


def test_merge_with_the_default_chunk_size_spans_several_chunks(device):
    rows = 2 * lorakern.layers.adapter.MERGE_CHUNK_ROWS + 5
    torch.manual_seed(20)
    layer = with_random_adapter(LoRALinear(3, rows, r=2, device=device))
    expected = layer.weight.double() + layer.scale * (layer.lora_B.double()
                                                      @ layer.lora_A.double())
    log = AllocationLog([layer.weight, layer.bias, layer.lora_A, layer.lora_B])
    with log:
        layer.merge()
    assert max(log.new_bytes) <= lorakern.layers.adapter.MERGE_CHUNK_ROWS * 3 * 4
    assert sorted(set(s[0] for s in log.mm_shapes)) == [5, lorakern.layers.adapter.MERGE_CHUNK_ROWS]
    assert_matches_oracle(layer.weight.detach(), expected, torch.float32, "merged weight")


def test_merged_forward_is_a_plain_linear(device):
    torch.manual_seed(21)
    layer = with_random_adapter(LoRALinear(10, 8, r=2, dropout=0.5, device=device))
    layer.merge()
    x = torch.randn(4, 10, device=device)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


# ---------------------------------------------------------------- merged state in the state dict

def _adapter_oracle(layer, x):
    """The float64 output of the layer's unmerged function: base + s * B A."""
    return oracle(x, out_in(layer), layer.lora_A, layer.lora_B, layer.scale, layer.bias)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_merged_state_dict_loads_as_a_merged_layer_with_the_same_outputs(layout, device):
    torch.manual_seed(22)
    source = with_random_adapter(LAYOUTS[layout](torch.float32, device))
    x = torch.randn(4, source.in_features, device=device)
    expected = _adapter_oracle(source, x)
    source.merge()
    target = LAYOUTS[layout](torch.float32, device)
    assert not target.merged

    target.load_state_dict(source.state_dict())
    assert target.merged
    assert torch.equal(target(x), source(x))
    assert_matches_oracle(target(x), expected, torch.float32, "loaded merged layer")
    # the scale it was merged with travels too: unmerge gives the source's base weight back
    target.unmerge()
    source.unmerge()
    assert torch.equal(target.weight, source.weight)
    assert_matches_oracle(target(x), expected, torch.float32, "loaded layer, unmerged")


def test_an_unmerged_state_dict_loads_into_a_merged_layer_as_unmerged(device):
    torch.manual_seed(23)
    source = with_random_adapter(LoRALinear(12, 9, r=3, alpha=5, device=device))
    target = with_random_adapter(LoRALinear(12, 9, r=3, alpha=5, device=device))
    target.merge()
    x = torch.randn(4, 12, device=device)

    target.load_state_dict(source.state_dict())
    assert not target.merged
    assert torch.equal(target(x), source(x))
    assert_matches_oracle(target(x), _adapter_oracle(source, x), torch.float32, "loaded layer")


def test_unmerge_after_loading_uses_the_saved_merge_scale_not_the_layers_own(device):
    torch.manual_seed(24)
    source = with_random_adapter(LoRALinear(12, 9, r=3, alpha=5, device=device), b_std=0.1)
    base = source.weight.detach().clone()
    source.merge()
    target = LoRALinear(12, 9, r=3, alpha=50, device=device)  # scale 50/3, not 5/3
    target.load_state_dict(source.state_dict())
    target.unmerge()
    torch.testing.assert_close(target.weight.detach(), base, atol=1e-6, rtol=1e-6)


def test_a_state_dict_without_the_merged_flag_loads_strictly_as_unmerged(device):
    """State dicts written before the flag existed hold no ``_extra_state``."""
    torch.manual_seed(25)
    source = with_random_adapter(LoRALinear(12, 9, r=3, device=device))
    old = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    target = with_random_adapter(LoRALinear(12, 9, r=3, device=device))
    target.merge()

    result = target.load_state_dict(old, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert not target.merged
    x = torch.randn(4, 12, device=device)
    assert torch.equal(target(x), source(x))


def test_loading_adapters_without_the_weight_into_a_merged_layer_is_refused(device):
    torch.manual_seed(26)
    source = with_random_adapter(LoRALinear(12, 9, r=3, device=device))
    target = with_random_adapter(LoRALinear(12, 9, r=3, device=device))
    target.merge()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    adapters_only = {k: v for k, v in source.state_dict().items() if k.startswith("lora_")}

    with pytest.raises(RuntimeError, match=r"lora_A and lora_B but no weight.*merged.*unmerge"):
        target.load_state_dict(adapters_only, strict=False)
    assert target.merged
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # into an unmerged layer the same partial load is fine
    target.unmerge()
    target.load_state_dict(adapters_only, strict=False)
    assert torch.equal(target.lora_B, source.lora_B)


@pytest.mark.parametrize("state", [torch.tensor([2.0, 1.0], dtype=torch.float64),
                                   torch.tensor([1.0, float("nan")], dtype=torch.float64),
                                   torch.tensor([1.0], dtype=torch.float64),
                                   torch.tensor([1, 2])], ids=str)
def test_a_malformed_merged_flag_is_refused_naming_it(state, device):
    source = LoRALinear(12, 9, r=3, device=device)
    target = LoRALinear(12, 9, r=3, device=device)
    broken = {**source.state_dict(), "_extra_state": state}
    with pytest.raises(RuntimeError, match=r"_extra_state is a float tensor \[merged"):
        target.load_state_dict(broken)
    assert not target.merged


def test_a_merged_model_round_trips_through_its_state_dict(device):
    def model(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                            nn.Linear(16, 6)).to(device)
        lorakern.inject_lora(net, ["0", "2", "4"], r=2, alpha=3)
        for layer in net:
            if isinstance(layer, LoRALinear):
                with_random_adapter(layer, b_std=0.3)
        return net

    x = torch.randn(5, 10, device=device)
    source = model(27)
    unmerged_out = source(x).detach()
    lorakern.merge_lora(source)
    merged_out = source(x).detach()
    target = model(28)

    target.load_state_dict(source.state_dict(), strict=True)
    assert all(layer.merged for layer in target if isinstance(layer, LoRALinear))
    assert torch.equal(target(x), merged_out)
    lorakern.unmerge_lora(target)
    assert_matches_oracle(target(x), unmerged_out.double(), torch.float32, "unmerged again")
