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
    return _randomised(get_peft_model(TinyModel(), config))


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


def _linear_model():
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 7))


def _randomised(model):
    torch.manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
            if "magnitude" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    return model


def test_inject_lora_use_dora_makes_trainable_dora_layers_merge_and_unmerge_exactly():
    from lorakern.models.inject import inject_lora
    from peft import LoraConfig
    model = inject_lora(_linear_model(), config=LoraConfig(r=3, target_modules=["0", "2"],
                                                            use_dora=True))
    assert all(type(model[i]).__name__ == "DoRALinear" for i in (0, 2))
    assert model[0].lora_magnitude.requires_grad and not model[0].weight.requires_grad
    with pytest.raises(ValueError, match=r"use_dora=True on embedding targets \['1'\]"):
        inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4)), ["0", "1"],
                    use_dora=True)
    _randomised(model)
    x = torch.randn(6, 12, dtype=torch.float64)
    model.double()
    before = model(x)
    weights = [model[i].weight.clone() for i in (0, 2)]
    lorakern.merge_lora(model)
    assert_matches_oracle(model(x), before.detach(), torch.float32, "merged")
    lorakern.unmerge_lora(model)
    for i, w in zip((0, 2), weights):
        assert_matches_oracle(model[i].weight, w, torch.float32, f"unmerged {i}")
    assert "lora_magnitude" in lorakern.format_lora_report(model)


def test_dora_adapter_files_round_trip_with_peft_both_ways(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from lorakern.models.inject import inject_lora
    x = torch.randn(5, 12)
    # lorakern -> PEFT
    ours = _randomised(inject_lora(_linear_model(), ["0", "2"], r=3, alpha=6, use_dora=True))
    lorakern.save_adapter(ours, tmp_path / "lk")
    theirs = PeftModel.from_pretrained(_linear_model(), tmp_path / "lk").eval()
    with torch.no_grad():
        assert_matches_oracle(theirs(x), ours.eval()(x).double(), torch.float32, "PEFT <- lk")
    # PEFT -> lorakern
    peft_model = _randomised(get_peft_model(_linear_model(), LoraConfig(
        r=2, lora_alpha=5, target_modules=["0", "2"], use_dora=True, use_rslora=True)))
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lorakern.load_adapter(_linear_model(), tmp_path / "peft").eval()
    assert type(loaded[2]).__name__ == "DoRALinear"
    with torch.no_grad():
        assert_matches_oracle(loaded(x), peft_model.eval()(x).double(), torch.float32,
                              "lk <- PEFT")
