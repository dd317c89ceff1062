"""The layer level (``LoRALayer``, ``LoRALinear``, ``LoRAEmbedding``) under inputs that
its happy paths do not meet: max_norm tables and merging, out-of-range ids, loads
refused halfway through a model, numpy numbers, meta layers, tensor scales.

Every refusal is checked to change nothing: weights, adapters and merged flags
compare bit for bit with their state before the call.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

import lorakern
from lorakern.layers import LoRAEmbedding, LoRALayer, LoRALinear


def with_random_adapter(layer, b_std=0.5):
    """Nonzero A and B, as after some training."""
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * b_std)
    return layer


def snapshot(module):
    """Every tensor of the state dict (merged flags included), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, f"changed: {changed}"


# ---------------------------------------------------------------- max_norm and merging
def max_norm_embedding(device, max_norm=0.5):
    torch.manual_seed(3)
    return with_random_adapter(LoRAEmbedding(10, 6, r=2, alpha=4, max_norm=max_norm,
                                             device=device))


def test_merging_an_embedding_with_max_norm_is_refused_and_changes_nothing(device):
    layer = max_norm_embedding(device)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"max_norm=0.5 cannot be merged.*renormalise"):
        layer.merge()
    assert not layer.merged
    assert_unchanged(layer, before)


def test_merge_lora_refuses_a_model_with_a_max_norm_embedding_all_or_none(device):
    torch.manual_seed(4)
    model = nn.Sequential(with_random_adapter(LoRALinear(6, 6, r=2, device=device)),
                          max_norm_embedding(device))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"max_norm=0.5 cannot be merged"):
        lorakern.merge_lora(model)
    assert not model[0].merged and not model[1].merged
    assert_unchanged(model, before)


def test_a_merged_state_dict_is_refused_by_an_embedding_with_max_norm(device):
    source = with_random_adapter(LoRAEmbedding(10, 6, r=2, alpha=4, device=device))
    source.merge()
    target = max_norm_embedding(device)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=r"max_norm=0.5 cannot be merged"):
        target.load_state_dict(source.state_dict())
    assert not target.merged
    assert_unchanged(target, before)


def test_an_embedding_with_max_norm_unmerged_keeps_nn_embeddings_output(device):
    """The refusal leaves the unmerged layer as it was: nn.Embedding's renormalised
    rows plus the adapter."""
    layer = max_norm_embedding(device)
    twin = nn.Embedding(10, 6, max_norm=0.5, device=device)
    twin.weight.data.copy_(layer.weight.data)
    ids = torch.tensor([[1, 4, 4, 9]], device=device)
    with pytest.raises(ValueError):
        layer.merge()
    delta = layer.scale * (layer.lora_A[:, ids].permute(1, 2, 0) @ layer.lora_B.t())
    torch.testing.assert_close(layer(ids), twin(ids) + delta)


# ---------------------------------------------------------------- ids out of range
@pytest.mark.parametrize("ids,error,message", [
    ([3, 10], ValueError, r"token id 10 is out of range.*num_embeddings=10"),
    ([-1, 3], ValueError, r"token id -1 is out of range"),
    ([3.0, 4.0], TypeError, r"ids has dtype torch.float32"),
], ids=["too-large", "negative", "float"])
def test_bad_ids_into_a_max_norm_embedding_are_refused_before_the_table_is_renormalised(
        ids, error, message, device):
    layer = max_norm_embedding(device, max_norm=0.01)  # row 3 would be renormalised
    before = snapshot(layer)
    with pytest.raises(error, match=message):
        layer(torch.tensor(ids, device=device))
    assert_unchanged(layer, before)


@pytest.mark.parametrize("ids,error,message", [
    ([3, 10], ValueError, r"token id 10 is out of range"),
    ([3.0, 4.0], TypeError, r"ids has dtype torch.float32"),
], ids=["too-large", "float"])
def test_bad_ids_into_a_merged_embedding_raise_the_documented_errors(ids, error, message,
                                                                     device):
    layer = with_random_adapter(LoRAEmbedding(10, 6, r=2, device=device))
    layer.merge()
    with pytest.raises(error, match=message):
        layer(torch.tensor(ids, device=device))


# ---------------------------------------------------------------- a refused load changes nothing
def two_layer_model(device, seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(with_random_adapter(LoRALinear(6, 5, r=2, device=device))),
        nn.ReLU(),
        with_random_adapter(LoRALinear(5, 4, r=2, device=device)))


def adapters_only(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


@pytest.mark.parametrize("merged_layer", ["2", "0.0"])
def test_a_load_refused_by_one_merged_layer_writes_no_lora_layer(merged_layer, device):
    source = two_layer_model(device, seed=1)
    target = two_layer_model(device, seed=2)
    target.get_submodule(merged_layer).merge()
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=rf"LoRALinear '{merged_layer}'.*lora_A and lora_B "
                                           rf"but no weight"):
        target.load_state_dict(adapters_only(source), strict=False)
    assert target.get_submodule(merged_layer).merged
    assert_unchanged(target, before)


def test_a_load_with_a_malformed_flag_on_a_later_layer_writes_no_lora_layer(device):
    source = two_layer_model(device, seed=1)
    target = two_layer_model(device, seed=2)
    broken = {**source.state_dict(),
              "2._extra_state": torch.tensor([2.0, 1.0], dtype=torch.float64)}
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=r"LoRALinear '2'.*_extra_state is a float tensor"):
        target.load_state_dict(broken)
    assert_unchanged(target, before)


def test_a_load_with_another_rank_on_a_later_layer_writes_no_lora_layer(device):
    """A merged source whose last layer has another rank: torch would have copied the
    first layer, and the last layer's merged weight without its flag."""
    source = two_layer_model(device, seed=1)
    source[2] = with_random_adapter(LoRALinear(5, 4, r=3, device=device))
    lorakern.merge_lora(source)
    target = two_layer_model(device, seed=2)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=r"size mismatch for 2.lora_A: copying a param "
                                           r"with shape torch.Size\(\[3, 5\]\)"):
        target.load_state_dict(source.state_dict())
    assert not any(m.merged for m in target.modules() if isinstance(m, LoRALinear))
    assert_unchanged(target, before)


def test_every_refusal_of_a_load_is_reported_once(device):
    source = two_layer_model(device, seed=1)
    target = two_layer_model(device, seed=2)
    lorakern.merge_lora(target)
    with pytest.raises(RuntimeError) as raised:
        target.load_state_dict(adapters_only(source), strict=False)
    text = str(raised.value)
    assert text.count("LoRALinear '0.0'") == 1 and text.count("LoRALinear '2'") == 1


def test_a_lora_layer_shared_by_two_parents_is_checked_under_both_names(device):
    torch.manual_seed(5)
    shared = with_random_adapter(LoRALinear(4, 4, r=2, device=device))
    target = nn.ModuleDict({"first": shared, "second": shared})
    shared.merge()
    source = {"second.lora_A": torch.zeros(2, 4, device=device),
              "second.lora_B": torch.zeros(4, 2, device=device)}
    before = snapshot(shared)
    with pytest.raises(RuntimeError, match=r"LoRALinear 'second'"):
        target.load_state_dict(source, strict=False)
    assert_unchanged(shared, before)


class RenamingModel(nn.Module):
    """A model whose load_state_dict renames the keys, then loads through torch's."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def load_state_dict(self, state_dict, strict=True, assign=False):
        renamed = {"inner." + k.removeprefix("old."): v for k, v in state_dict.items()}
        return super().load_state_dict(renamed, strict=strict, assign=assign)


def test_a_model_overriding_load_state_dict_still_loads_all_or_none(device):
    source = two_layer_model(device, seed=1)
    target = RenamingModel(two_layer_model(device, seed=2))
    target.inner[2].merge()
    before = snapshot(target)
    partial = {"old." + k: v for k, v in adapters_only(source).items()}
    with pytest.raises(RuntimeError, match=r"LoRALinear 'inner.2'"):
        target.load_state_dict(partial, strict=False)
    assert_unchanged(target, before)
    # a submodule loaded on its own checks the layers below it
    with pytest.raises(RuntimeError, match=r"LoRALinear '2'"):
        target.inner.load_state_dict(adapters_only(source), strict=False)
    assert_unchanged(target, before)


def test_an_accepted_load_still_reports_strict_and_non_strict_keys_as_torch_does(device):
    source = two_layer_model(device, seed=1)
    target = two_layer_model(device, seed=2)
    partial = adapters_only(source)
    result = target.load_state_dict(partial, strict=False)
    assert result.unexpected_keys == []
    assert "2.weight" in result.missing_keys and "0.0.bias" in result.missing_keys
    assert torch.equal(target[2].lora_B, source[2].lora_B)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*\"0.0.weight\""):
        two_layer_model(device, seed=3).load_state_dict(partial)
    full = target.load_state_dict({**source.state_dict(), "extra": torch.zeros(1)},
                                  strict=False)
    assert (full.missing_keys, full.unexpected_keys) == ([], ["extra"])


def test_a_lora_layer_loaded_directly_refuses_as_before(device):
    """The layer as the root of the load: nothing above it to check."""
    target = with_random_adapter(LoRALinear(6, 5, r=2, device=device))
    target.merge()
    before = snapshot(target)
    source = {k: v for k, v in LoRALinear(6, 5, r=2, device=device).state_dict().items()
              if k.startswith("lora_")}
    with pytest.raises(RuntimeError, match=r"lora_A and lora_B but no weight"):
        target.load_state_dict(source, strict=False)
    assert_unchanged(target, before)


# ---------------------------------------------------------------- numpy numbers
def test_numpy_numbers_become_python_numbers_in_lora_linear():
    layer = LoRALinear(8, 4, r=np.int64(2), alpha=np.float32(16), dropout=np.float32(0.25))
    assert (type(layer.r), type(layer.alpha), type(layer.scale), type(layer.dropout)) == (
        int, float, float, float)
    assert (layer.r, layer.alpha, layer.scale, layer.dropout) == (2, 16.0, 8.0, 0.25)
    wrapped = LoRALinear.from_linear(nn.Linear(8, 4), r=np.int32(4), alpha=np.int64(8))
    assert (type(wrapped.alpha), type(wrapped.scale)) == (int, float)
    assert repr(wrapped).count("alpha=8, scale=2") == 1


def test_numpy_numbers_become_python_numbers_in_lora_embedding():
    layer = LoRAEmbedding(10, 6, r=np.int16(2), alpha=np.float64(3), use_rslora=True)
    assert (type(layer.r), type(layer.alpha), type(layer.scale)) == (int, float, float)
    assert layer.scale == pytest.approx(3 / 2 ** 0.5)


def test_inject_lora_with_numpy_numbers_saves_a_json_adapter(tmp_path, device):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).to(device)
    lorakern.inject_lora(model, ["0", "2"], r=np.int64(2), alpha=np.float32(16),
                         dropout=np.float64(0.1), rank_pattern={"2": np.int64(3)},
                         alpha_pattern={"2": np.int32(6)})
    lorakern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 16.0, 0.1)
    assert list(config["rank_pattern"].values()) == [3]
    assert list(config["alpha_pattern"].values()) == [6]


# ---------------------------------------------------------------- meta layers
def test_merging_a_meta_layer_is_refused_naming_the_meta_device():
    with torch.device("meta"):
        layer = LoRALinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"meta device.*load the weights first"):
        layer.merge()
    assert not layer.merged


def test_merge_lora_refuses_a_model_on_meta_and_merges_no_layer():
    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 3))
        lorakern.inject_lora(model, ["0", "1", "2"], r=2)
    with pytest.raises(ValueError, match=r"meta device"):
        lorakern.merge_lora(model)
    assert not any(m.merged for m in model if isinstance(m, LoRALayer))


def test_unmerging_a_layer_moved_to_meta_is_refused_and_keeps_the_flag():
    layer = with_random_adapter(LoRALinear(8, 4, r=2))
    layer.merge()
    layer.to("meta")
    with pytest.raises(ValueError, match=r"meta device.*nothing to unmerge"):
        layer.unmerge()
    assert layer.merged


# ---------------------------------------------------------------- the scale attribute
@pytest.mark.parametrize("make", [LoRALinear, LoRAEmbedding], ids=["linear", "embedding"])
@pytest.mark.parametrize("value", [torch.tensor(0.5), torch.tensor([0.5]), np.float32(0.5),
                                   torch.tensor(0.5, dtype=torch.float64)], ids=str)
def test_a_scale_set_to_a_one_element_tensor_or_numpy_number_is_a_python_float(make, value):
    layer = make(8, 4, r=2)
    layer.scale = value
    assert type(layer.scale) is float and layer.scale == 0.5
    assert "scale=0.5," in repr(layer)


@pytest.mark.parametrize("value,error,message", [
    (torch.tensor([0.5, 1.0]), TypeError, r"one-element tensor, got a tensor of shape \(2,\)"),
    (torch.tensor(0.5, requires_grad=True), TypeError, r"requires grad"),
    (float("nan"), ValueError, r"scale must be finite"),
    ("0.5", TypeError, r"scale must be a real number, got str"),
    (True, TypeError, r"scale must be a real number, got bool"),
], ids=["two-elements", "requires-grad", "nan", "str", "bool"])
def test_a_scale_the_layer_cannot_use_is_refused_where_it_is_set(value, error, message):
    layer = LoRALinear(8, 4, r=2, alpha=6)
    with pytest.raises(error, match=message):
        layer.scale = value
    assert layer.scale == 3.0
    assert "scale=3," in repr(layer)


def test_a_layer_with_a_tensor_scale_computes_with_that_scale(device):
    torch.manual_seed(8)
    layer = with_random_adapter(LoRALinear(8, 4, r=2, device=device))
    x = torch.randn(3, 8, device=device)
    layer.scale = 0.25
    expected = layer(x)
    layer.scale = torch.tensor(0.25, device=device)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
