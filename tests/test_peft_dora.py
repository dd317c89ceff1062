"""PEFT DoRA models patched by ``patch_peft``: the same logits and gradients as
PEFT's own forward, on the reference path and on the kernels (interpreted)."""
import copy

import pytest
import torch
from torch import nn

import lorakern
from oracle import assert_matches_oracle

SEED = 20261204


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.up = nn.Linear(24, 40)
        self.mid = Conv1D(40, 40)  # GPT-2's (in, out) layout: fan_in_fan_out
        self.down = nn.Linear(40, 18, bias=False)
        self.embed = nn.Embedding(11, 24)

    def forward(self, ids):
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(self.embed(ids))))))


def _dora_model(target_modules, rslora=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=target_modules, use_dora=True,
                        use_rslora=rslora, lora_dropout=0.0)
    model = get_peft_model(TinyModel(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    return model


def _trainable_grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patched_dora_model_matches_peft_logits_and_gradients(backend, monkeypatch):
    import warnings
    from peft.tuners.lora.layer import Linear as PeftLinear
    monkeypatch.setenv("LORAKERN_BACKEND", backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note on Conv1D and fan_in_fan_out
        peft_model = _dora_model(["up", "mid", "down"], rslora=backend == "triton")
    patched = lorakern.patch_peft(copy.deepcopy(peft_model))
    assert len(lorakern.patched_modules(patched)) == 3
    launches = sum(lorakern.kernels.launch_counts.values())
    ids = torch.randint(0, 11, (2, 5))
    for model in (peft_model, patched):
        model.train()
        model(ids).square().sum().backward()
    assert (sum(lorakern.kernels.launch_counts.values()) > launches) == (backend == "triton")
    with torch.no_grad():
        peft_model.eval(), patched.eval()
        assert_matches_oracle(patched(ids), peft_model(ids).double(), torch.float32, "logits")
    expected, got = _trainable_grads(peft_model), _trainable_grads(patched)
    assert any("lora_magnitude_vector" in name for name in expected)
    assert set(expected) == set(got)
    for name, grad in expected.items():
        assert_matches_oracle(got[name], grad.double(), torch.float32, name)
    assert all(isinstance(m, PeftLinear) for m in
               (patched.base_model.model.up, patched.base_model.model.mid))


def test_dora_on_an_embedding_is_refused_by_name():
    model = _dora_model(["up", "embed"])
    with pytest.raises(ValueError, match="'base_model.model.embed'.*DoRA.*Embedding"):
        lorakern.patch_peft(model)
