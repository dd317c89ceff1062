"""Models built without memory (``torch.device("meta")``, accelerate's
``init_empty_weights``) get shapes and dtypes from lorakern as from nn.Linear."""
import pytest
import torch
from torch import nn

import lorakern


@pytest.mark.parametrize("backend", ["", "triton", "reference"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_meta_layer_gives_the_shapes_of_nn_linear(backend, dropout, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", backend)
    with torch.device("meta"):
        layer = lorakern.LoRALinear(16, 8, r=3, alpha=6, dropout=dropout,
                                    dtype=torch.bfloat16)
        base = nn.Linear(16, 8, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert (y.shape, y.dtype, y.device) == (base(x).shape, base(x).dtype, x.device)
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    assert layer.lora_A.grad.shape == layer.lora_A.shape
    assert layer.lora_B.grad.dtype == layer.lora_B.dtype == torch.float32


def test_lora_linear_on_meta_tensors_under_autocast_settings():
    x = torch.randn(7, 12, device="meta")
    y = lorakern.lora_linear(x, torch.randn(4, 12, device="meta"),
                             torch.randn(2, 12, device="meta"),
                             torch.randn(4, 2, device="meta"), 0.5,
                             torch.randn(4, device="meta"), 0.2)
    assert y.shape == (7, 4) and y.device.type == "meta"


def test_a_model_injected_on_meta_is_materialized_and_runs():
    """The init_empty_weights workflow: build and inject on meta, materialize, load."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
        lorakern.inject_lora(model, ["0", "2"], r=2, alpha=4)
    assert model(torch.randn(3, 12, device="meta")).shape == (3, 6)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    x = torch.randn(3, 12)
    expected = lorakern.reference.lora_linear(
        torch.relu(lorakern.reference.lora_linear(x, model[0].weight, model[0].lora_A,
                                                  model[0].lora_B, model[0].scale,
                                                  model[0].bias)),
        model[2].weight, model[2].lora_A, model[2].lora_B, model[2].scale, model[2].bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
