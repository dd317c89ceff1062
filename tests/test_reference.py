"""The PyTorch reference: the math it must do, and its gradients."""
import pytest
import torch

from lorakern import reference


def _inputs(m=6, k=9, n=7, r=3, dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    make = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(m, k), make(n, k), make(r, k), make(n, r), (make(n) if bias else None)


def test_reference_is_the_lora_formula_in_float64():
    x, w, a, b, bias = _inputs()
    y = reference.lora_linear(x, w, a, b, 0.5, bias)
    expected = x @ w.T + bias + 0.5 * (x @ a.T) @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_reference_gradients_pass_gradcheck():
    x, w, a, b, bias = _inputs()
    assert torch.autograd.gradcheck(
        lambda *t: reference.lora_linear(t[0], t[1], t[2], t[3], 1.7, t[4]), (x, w, a, b, bias))


def test_reference_dropout_scales_kept_inputs_by_one_over_keep_probability():
    x, w, a, b, _ = _inputs(m=4, k=5, n=3, r=2)
    mask = torch.rand(4, 5) > 0.5
    y = reference.lora_linear_masked(x, w, a, b, 2.0, None, mask, 0.5)
    expected = x @ w.T + 2.0 * ((x * mask / 0.5) @ a.T) @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_reference_dropout_with_a_fixed_mask_passes_gradcheck():
    x, w, a, b, bias = _inputs()
    mask = torch.rand(x.shape) > 0.3
    assert torch.autograd.gradcheck(
        lambda *t: reference.lora_linear_masked(*t[:4], 0.9, t[4], mask, 0.3), (x, w, a, b, bias))


def test_reference_drops_a_fraction_p_of_lora_inputs():
    torch.manual_seed(1)
    x = torch.ones(200, 100, dtype=torch.float64)
    w = torch.zeros(1, 100, dtype=torch.float64)
    a = torch.ones(1, 100, dtype=torch.float64)
    b = torch.ones(1, 1, dtype=torch.float64)
    y = reference.lora_linear(x, w, a, b, 1.0, None, 0.25)
    # each row sums the kept ones, scaled by 1 / 0.75: the mean stays 100
    assert abs(y.mean().item() - 100.0) < 1.0
    assert y.std().item() > 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_keeps_x_dtype_with_fp32_adapters(dtype):
    x, w, a, b, bias = (t.detach() for t in _inputs(dtype=torch.float32))
    y = reference.lora_linear(x.to(dtype), w.to(dtype), a, b, 1.0, bias.to(dtype))
    assert y.dtype == dtype
