"""DoRA linear: the reference against PEFT's own DoRA layer, and the kernels
(interpreted on CPU) against the float64 reference, every gradient."""
import pytest
import torch
from torch import nn

import lorakern.functional.dora as dora
from lorakern import kernels
from oracle import assert_matches_oracle

SEED = 20261203


class KeepMaskDropout(nn.Module):
    """Dropout with a given keep-mask, so PEFT and the reference drop the same elements."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return torch.where(self.keep, x, 0.0) / (1.0 - self.p)


def _peft_dora_layer(in_features, out_features, r, bias, dropout_p, rslora, fan_in_fan_out,
                     base_dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if fan_in_fan_out:
                self.proj = Conv1D(out_features, in_features)
                if not bias:
                    self.proj.bias = None
            else:
                self.proj = nn.Linear(in_features, out_features, bias=bias)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(SEED)
    net = Net()
    if bias:
        nn.init.normal_(net.proj.bias)
    config = LoraConfig(r=r, lora_alpha=7, target_modules=["proj"], use_dora=True,
                        lora_dropout=dropout_p, use_rslora=rslora,
                        fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(net.to(base_dtype), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.mul_(torch.rand_like(magnitude) + 0.5)
    return model, layer


# (lead, in, out, r, bias, dropout_p, rslora, fan_in_fan_out, training)
PEFT_CASES = [
    ((2, 5), 37, 29, 5, True, 0.0, False, False, True),
    ((11,), 24, 13, 3, False, 0.1, True, False, True),
    ((3, 4), 19, 21, 7, True, 0.1, False, True, True),
    ((6,), 16, 9, 2, True, 0.1, False, False, False),  # eval: no dropout, base reused
]


@pytest.mark.parametrize("lead, k, n, r, bias, p, rslora, fifo, training", PEFT_CASES)
def test_reference_matches_peft_dora_layer(lead, k, n, r, bias, p, rslora, fifo, training):
    model, layer = _peft_dora_layer(k, n, r, bias, p, rslora, fifo)
    model.train(training)
    x = torch.randn(*lead, k, requires_grad=True)
    keep = torch.rand(*lead, k) > p
    if p > 0:
        layer.lora_dropout["default"] = KeepMaskDropout(keep, p)
    grad_y = torch.randn(*lead, n)
    y_peft = model(x)
    y_peft.backward(grad_y)
    A = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    base = layer.get_base_layer()
    peft_grads = {"x": x.grad, "A": A.grad, "B": B.grad, "m": m.grad}

    leaves = {name: t.detach().clone().requires_grad_() for name, t in
              (("x", x), ("A", A), ("B", B), ("m", m))}
    weight = base.weight.detach().t() if fifo else base.weight.detach()
    y = dora.dora_linear_masked(leaves["x"], weight, leaves["A"], leaves["B"], leaves["m"],
                                layer.scaling["default"], base.bias,
                                keep if (p > 0 and training) else None, p)
    y.backward(grad_y)
    assert_matches_oracle(y, y_peft.detach().double(), torch.float32, "y")
    for name, leaf in leaves.items():
        assert_matches_oracle(leaf.grad, peft_grads[name].double(), torch.float32, f"d{name}")


def test_reference_matches_peft_on_a_bf16_base_with_fp32_adapters():
    model, layer = _peft_dora_layer(32, 24, 4, True, 0.0, False, False, torch.bfloat16)
    A = layer.lora_A["default"].weight
    assert A.dtype == torch.float32  # PEFT keeps the adapters in fp32
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y_peft = model(x)
    base = layer.get_base_layer()
    y = dora.dora_linear_masked(x, base.weight, A, layer.lora_B["default"].weight,
                                layer.lora_magnitude_vector["default"].weight,
                                layer.scaling["default"], base.bias, None, 0.0)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_peft)


def _dora_inputs(lead, k, n, r, bias, base_dtype, adapter_dtype, device):
    torch.manual_seed(SEED)
    inputs = {
        "x": torch.randn(*lead, k, dtype=base_dtype),
        "weight": torch.randn(n, k, dtype=base_dtype) / k ** 0.5,
        "lora_A": torch.randn(r, k, dtype=adapter_dtype) / k ** 0.5,
        "lora_B": torch.randn(n, r, dtype=adapter_dtype),
        "magnitude": torch.rand(n, dtype=adapter_dtype) + 0.5,
        "bias": torch.randn(n, dtype=base_dtype) if bias else None,
    }
    return {name: None if t is None else t.to(device).requires_grad_(name != "weight")
            for name, t in inputs.items()}


# (lead, in, out, r, bias, dropout_p, base dtype, adapter dtype, a zero in m): M < in
# scales the output, M >= in folds g into W, a zero m_i or dropout saves z
KERNEL_CASES = [
    ((2, 5), 24, 20, 3, True, 0.0, torch.float32, torch.float32, False),
    ((40,), 24, 20, 3, True, 0.0, torch.float32, torch.float32, False),
    ((4, 9), 32, 17, 5, True, 0.0, torch.bfloat16, torch.float32, False),
    ((3,), 16, 12, 2, False, 0.0, torch.bfloat16, torch.bfloat16, True),
    ((7,), 19, 23, 20, False, 0.3, torch.float32, torch.float32, False),
    ((9,), 32, 17, 5, True, 0.2, torch.bfloat16, torch.float32, False),
]


@pytest.mark.parametrize("lead, k, n, r, bias, p, base_dtype, adapter_dtype, zero_m",
                         KERNEL_CASES)
def test_kernels_match_the_float64_reference(lead, k, n, r, bias, p, base_dtype,
                                             adapter_dtype, zero_m, device, monkeypatch):
    monkeypatch.setattr(dora, "draw_seed", lambda: SEED)
    inputs = _dora_inputs(lead, k, n, r, bias, base_dtype, adapter_dtype, device)
    if zero_m:
        with torch.no_grad():
            inputs["magnitude"][1] = 0.0
    launches = dict(kernels.launch_counts)
    y = dora.dora_linear(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"],
                         inputs["magnitude"], 7 / r, inputs["bias"], p)
    grad_y = torch.randn(y.shape, dtype=y.dtype, device=device)
    y.backward(grad_y)
    for name in ("dora_norm", "lora_forward", "lora_grad_input", "tn_matmul"):
        assert kernels.launch_counts[name] > launches.get(name, 0), f"{name} not launched"

    keep = None
    if p > 0:
        m = inputs["x"].shape[:-1].numel()
        keep = kernels.dropout_keep_mask(m, k, p, SEED, device).reshape(inputs["x"].shape).cpu()
    leaves = {name: None if t is None else t.detach().cpu().double().requires_grad_()
              for name, t in inputs.items()}
    y64 = dora.dora_linear_masked(leaves["x"], leaves["weight"], leaves["lora_A"],
                                  leaves["lora_B"], leaves["magnitude"], 7 / r,
                                  leaves["bias"], keep, kernels.effective_dropout_p(p))
    y64.backward(grad_y.cpu().double())
    assert y.dtype == base_dtype
    assert_matches_oracle(y.cpu(), y64.detach(), base_dtype, "y")
    for name, t in inputs.items():
        if t is not None and name != "weight":
            assert t.grad.dtype == t.dtype, f"d{name} dtype {t.grad.dtype}"
            assert_matches_oracle(t.grad.cpu(), leaves[name].grad, base_dtype, f"d{name}")
    assert inputs["weight"].grad is None


@pytest.mark.parametrize("r, transposed", [(5, False), (40, True)])
def test_factored_norm_kernel_matches_the_dense_norm(r, transposed, device):
    torch.manual_seed(SEED)
    n, k = 45, 70
    weight = torch.randn(k, n).t() if transposed else torch.randn(n, k)
    A = torch.randn(r, k) / k ** 0.5
    B = torch.randn(n, r)
    weight, A, B = weight.to(device), A.to(device), B.to(device)
    expected = dora.dense_weight_norm(weight.cpu().double(), A.cpu().double(),
                                      B.cpu().double(), 0.7, torch.float64)
    norm, sq = kernels.dora_weight_norm(weight, A, B, 0.7)
    assert_matches_oracle(norm.cpu(), expected, torch.float32, "norm")
    assert_matches_oracle(sq.cpu(), weight.cpu().double().pow(2).sum(1), torch.float32, "sq")
    again, sq_again = kernels.dora_weight_norm(weight, A, B, 0.7, sq)
    assert sq_again is sq
    assert torch.equal(again, norm)


def test_peft_dora_pricing_has_the_second_base_product_with_dropout_only():
    from bench import roofline, static_dora
    from bench.cases import make_cases

    plain, dropped = make_cases(("4096x4096",), (8192,), (16,), ("bf16",), (0.0, 0.1))
    names = {case: [name for name, _, _ in static_dora.peft_dora_ops(case)["fwd"]]
             for case in (plain, dropped)}
    assert "base on drop(x), fp32" in names[dropped]
    assert "base on drop(x), fp32" not in names[plain] and "result - bias" in names[plain]
    machine = roofline.MACHINES[90]
    times = {case: static_dora._predict_peft(static_dora.peft_dora_ops(case), machine)
             for case in (plain, dropped)}
    peft_lora = static_dora.predict_ops(roofline.peft_ops(plain), machine)
    assert times[dropped]["fwd"][0] > times[plain]["fwd"][0] > peft_lora["fwd"][0]
    records = static_dora._records(plain, "peft DoRA", times[plain])
    assert {r["variant"] for r in records} == {"dora"}
    assert {r["mode"] for r in records} == {"fwd", "bwd", "fwd+bwd"}
