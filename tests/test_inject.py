"""``inject_lora`` and friends on toy models with transformer-style module names.

The kernels run in Triton's interpreter on CPU (see conftest): widths are tens.
"""
import copy
import re

import pytest
import torch
from torch import nn

from lorakern.models import (count_parameters, format_lora_report, inject_lora, lora_report,
                             merge_lora, unmerge_lora)
from lorakern.layers import LoRALinear
from oracle import assert_matches_oracle

D = 16


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1)
        return self.o_proj(attn @ v)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Toy(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: weight (in, out), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def lora_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))


def randomize_adapters(model, std=0.1):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape) * std)


@pytest.fixture
def toy(device):
    torch.manual_seed(0)
    return Toy().to(device)


# ---------------------------------------------------------------- matching
def test_suffixes_replace_the_matching_linears_in_place_with_the_same_weights(toy):
    weights = {name: m.weight for name, m in toy.named_modules() if isinstance(m, nn.Linear)}
    assert inject_lora(toy, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.1) is toy
    assert lora_names(toy) == ["layers.0.attn.q_proj", "layers.0.attn.v_proj",
                               "layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    for name in lora_names(toy):
        layer = toy.get_submodule(name)
        assert layer.weight is weights[name]
        assert (layer.r, layer.scale, layer.dropout) == (4, 2.0, 0.1)
    assert type(toy.layers[0].attn.k_proj) is nn.Linear
    assert type(toy.layers[1].mlp[0]) is nn.Linear


def test_a_full_name_matches_that_module_only(toy):
    inject_lora(toy, ["layers.1.attn.o_proj"])
    assert lora_names(toy) == ["layers.1.attn.o_proj"]


def test_a_suffix_matches_whole_name_components_only(toy):
    """PEFT semantics: "proj" matches no "q_proj" (it is not "." + "proj")."""
    with pytest.raises(ValueError, match=r"\['proj'\] matched no module"):
        inject_lora(toy, ["proj"])


def test_sequential_indices_are_names(toy):
    inject_lora(toy, ["mlp.0", "mlp.2"])
    assert lora_names(toy) == ["layers.0.mlp.0", "layers.0.mlp.2", "layers.1.mlp.0",
                               "layers.1.mlp.2"]
    torch.manual_seed(1)
    model = inject_lora(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ["2"])
    assert isinstance(model[2], LoRALinear) and type(model[0]) is nn.Linear


def test_a_string_is_a_regex_that_must_match_the_whole_name(toy):
    inject_lora(toy, r"layers\.1\.attn\.(q|v)_proj")
    assert lora_names(toy) == ["layers.1.attn.q_proj", "layers.1.attn.v_proj"]


def test_a_regex_that_only_matches_part_of_a_name_matches_nothing(toy):
    with pytest.raises(ValueError, match=r"\['q_proj'\] matched no module"):
        inject_lora(toy, "q_proj")
    assert lora_names(toy) == []


def test_an_unmatched_target_lists_the_linear_modules_and_changes_nothing(toy):
    with pytest.raises(ValueError) as info:
        inject_lora(toy, ["q_proj", "query"])
    message = str(info.value)
    assert "['query'] matched no module" in message
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "head"):
        assert leaf in message
    for name in ("layers.0.attn.q_proj", "layers.1.mlp.2", "head"):
        assert name in message
    assert lora_names(toy) == []
    assert all(p.requires_grad for p in toy.parameters())


def test_a_long_list_of_linear_names_is_shortened(device):
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(30))).to(device)
    with pytest.raises(ValueError, match=r"0, 1, 2, .*19, \.\.\. \(30 in all\)"):
        inject_lora(model, ["nothing"])


def test_a_target_that_is_not_linear_is_refused_by_name_and_type(toy):
    with pytest.raises(ValueError, match=r"'layers\.0\.norm' is a LayerNorm"):
        inject_lora(toy, ["norm"])
    with pytest.raises(ValueError, match=r"'layers\.0\.attn' is a Attention"):
        inject_lora(toy, r".*attn.*")
    assert lora_names(toy) == []


def test_injecting_into_a_lora_layer_again_is_refused(toy):
    inject_lora(toy, ["q_proj"])
    with pytest.raises(ValueError, match="already a LoRALinear"):
        inject_lora(toy, ["q_proj"])


def test_the_model_itself_cannot_be_the_target(device):
    with pytest.raises(ValueError, match="from_linear"):
        inject_lora(nn.Linear(4, 4).to(device), ".*")


def test_conv1d_modules_are_targets_too(device):
    torch.manual_seed(2)
    model = nn.Sequential()
    model.add_module("c_attn", Conv1D(3 * D, D))
    model.add_module("c_proj", Conv1D(D, 3 * D))
    model = model.to(device)
    x = torch.randn(2, 5, D, device=device)
    y_before = model(x).detach()
    weight = model.c_attn.weight
    inject_lora(model, ["c_attn"])
    assert isinstance(model.c_attn, LoRALinear) and model.c_attn.fan_in_fan_out
    assert model.c_attn.weight is weight
    assert_matches_oracle(model(x).detach().cpu(), y_before.cpu().double(), torch.float32, "y")


# ---------------------------------------------------------------- freezing
def test_everything_but_adapters_and_modules_to_save_is_frozen(toy):
    inject_lora(toy, ["q_proj", "v_proj"], modules_to_save=["head"])
    trainable = sorted(name for name, p in toy.named_parameters() if p.requires_grad)
    expected = sorted([f"layers.{i}.attn.{m}.lora_{ab}" for i in (0, 1)
                       for m in ("q_proj", "v_proj") for ab in "AB"]
                      + ["head.weight", "head.bias"])
    assert trainable == expected


def test_adapters_already_in_the_model_stay_trainable(toy):
    inject_lora(toy, ["q_proj"])
    inject_lora(toy, ["v_proj"])
    assert toy.layers[0].attn.q_proj.lora_A.requires_grad
    assert toy.layers[0].attn.v_proj.lora_B.requires_grad
    assert not toy.layers[0].attn.q_proj.weight.requires_grad


def test_modules_to_save_must_match_and_must_not_overlap_the_targets(toy):
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\] matched no module"
                                         r".*head"):
        inject_lora(toy, ["q_proj"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="both a LoRA target and"):
        inject_lora(toy, ["q_proj"], modules_to_save=["attn"])
    with pytest.raises(ValueError, match="both a LoRA target and"):
        inject_lora(toy, ["head"], modules_to_save=["head"])
    assert lora_names(toy) == []


def test_bad_arguments_change_nothing(toy):
    with pytest.raises(ValueError, match="r=0"):
        inject_lora(toy, ["q_proj"], r=0)
    with pytest.raises(ValueError, match="target_modules is required"):
        inject_lora(toy, None)
    # a quantized (int8) weight in the second layer: the first is left as it was too
    toy.layers[1].attn.q_proj.weight = nn.Parameter(torch.ones(D, D, dtype=torch.int8),
                                                    requires_grad=False)
    with pytest.raises(TypeError, match=r"'layers\.1\.attn\.q_proj'.*torch.int8"):
        inject_lora(toy, ["q_proj"])
    assert lora_names(toy) == []
    assert toy.layers[0].attn.q_proj.weight.requires_grad


def test_one_optimizer_step_changes_only_the_adapters_and_modules_to_save(toy, device):
    inject_lora(toy, ["q_proj", "v_proj"], r=4, modules_to_save=["head"])
    randomize_adapters(toy)  # with B = 0 the first step leaves A where it is
    before = {name: p.detach().clone() for name, p in toy.named_parameters()}
    # every parameter handed over, weight decay on: frozen ones have no grad and stay
    optimizer = torch.optim.AdamW(toy.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(3)
    x = torch.randn(2, 5, D, device=device)
    toy(x).square().mean().backward()
    optimizer.step()
    for name, p in toy.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        should = ".lora_" in name or name.startswith("head.")
        assert changed == should, f"{name}: changed={changed}"
        assert (p.grad is not None) == should, f"{name}: grad {p.grad is not None}"


# ---------------------------------------------------------------- counting and report
def test_count_parameters(toy):
    total_before = sum(p.numel() for p in toy.parameters())
    inject_lora(toy, ["q_proj", "v_proj"], r=4, modules_to_save=["head"])
    adapters = 4 * 4 * (D + D)  # four layers, r (in + out) each
    head = D * 3 + 3
    assert count_parameters(toy) == (total_before + adapters, adapters + head)


def test_lora_report_lists_every_parameter_and_the_trainable_share(toy):
    inject_lora(toy, ["q_proj"], r=2)
    report = format_lora_report(toy)
    lines = report.splitlines()
    params = dict(toy.named_parameters())
    assert len(lines) == len(params) + 1
    rows = {line.split()[0]: line.split()[1:] for line in lines[:-1]}
    assert set(rows) == set(params)
    assert rows["layers.0.attn.q_proj.lora_A"] == ["1", str(2 * D)]
    assert rows["layers.0.attn.q_proj.weight"] == ["0", str(D * D)]
    assert rows["head.bias"] == ["0", "3"]
    total, trainable = count_parameters(toy)
    assert trainable == 2 * 2 * (D + D)
    assert lines[-1] == (f"Total parameters: {total}, trainable: {trainable} "
                         f"({100 * trainable / total:.4f}%)")
    assert re.fullmatch(r"Total parameters: \d+, trainable: \d+ \(\d+\.\d{4}%\)", lines[-1])


def test_lora_report_of_a_model_without_parameters():
    assert format_lora_report(nn.ReLU()) == "Total parameters: 0, trainable: 0 (0.0000%)"


def test_lora_report_prints_the_report_and_returns_none_so_a_repl_shows_it_once(toy, capsys):
    inject_lora(toy, ["q_proj"], r=2)
    assert lora_report(toy) is None
    assert capsys.readouterr().out == format_lora_report(toy) + "\n"


# ---------------------------------------------------------------- merging the model
def test_merge_and_unmerge_the_model_round_trip(toy, device):
    reference = copy.deepcopy(toy).double()
    inject_lora(toy, ["q_proj", "v_proj", "o_proj"], r=4, alpha=8)
    randomize_adapters(toy)
    toy.eval()
    # the float64 copy gets the same adapters, merged exactly
    with torch.no_grad():
        for name in lora_names(toy):
            layer = toy.get_submodule(name)
            reference.get_submodule(name).weight += layer.scale * (
                layer.lora_B.double() @ layer.lora_A.double())
    weights = {name: toy.get_submodule(name).weight.detach().clone() for name in lora_names(toy)}
    torch.manual_seed(4)
    x = torch.randn(2, 5, D, device=device)
    y_ref = reference(x.double()).detach().cpu()
    assert_matches_oracle(toy(x).detach().cpu(), y_ref, torch.float32, "y unmerged")

    assert merge_lora(toy) is toy
    assert all(toy.get_submodule(name).merged for name in lora_names(toy))
    assert_matches_oracle(toy(x).detach().cpu(), y_ref, torch.float32, "y merged")
    with pytest.raises(RuntimeError, match="6 LoRA layers are already merged"):
        merge_lora(toy)

    assert unmerge_lora(toy) is toy
    for name, w0 in weights.items():
        layer = toy.get_submodule(name)
        assert not layer.merged
        torch.testing.assert_close(layer.weight.detach(), w0, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(toy)
    assert_matches_oracle(toy(x).detach().cpu(), y_ref, torch.float32, "y unmerged again")


def test_a_non_finite_layer_stops_the_whole_merge_before_any_weight_changes(toy):
    inject_lora(toy, ["q_proj", "v_proj"])
    randomize_adapters(toy)
    with torch.no_grad():
        toy.layers[1].attn.v_proj.lora_B[0, 0] = float("inf")
    weights = {name: toy.get_submodule(name).weight.detach().clone() for name in lora_names(toy)}
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora(toy)
    for name, w0 in weights.items():
        assert not toy.get_submodule(name).merged
        assert torch.equal(toy.get_submodule(name).weight.view(torch.int32), w0.view(torch.int32))


def test_merging_a_model_without_lora_layers_is_an_error(toy):
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(toy)
    with pytest.raises(ValueError, match="no LoRA layers"):
        unmerge_lora(toy)
