"""The model level against models and configs that break easy assumptions.

Tied weights in ``modules_to_save``, PEFT config values that are falsy but still
acted on, a target that fails halfway through ``inject_lora``, task heads that
PEFT matches by plain suffix, and turning lorakern layers back into plain
modules (``unload``). Where PEFT defines the behaviour, the real ``peft``
package is the reference (tiny transformers models, as in test_peft_interop).
"""
import copy
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import DistilBertConfig, DistilBertForSequenceClassification  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import lorakern  # noqa: E402
from conftest import DEVICE  # noqa: E402
from lorakern import models  # noqa: E402
from lorakern.layers import LoRALayer, LoRALinear  # noqa: E402
from lorakern.models import inject_lora, merge_lora  # noqa: E402
from lorakern.peft import load_adapter, patch_peft, save_adapter  # noqa: E402
from test_peft_config import peft_trainable, trainable  # noqa: E402
from test_peft_interop import (assert_close, base_model, logits, lorakern_model,  # noqa: E402
                               peft_model, read_config)


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def snapshot(model):
    """Everything a refused call must leave as it was: the module objects under
    their names, every parameter object and its requires_grad flag, every value."""
    return ({name: m for name, m in model.named_modules()},
            {name: (p, p.requires_grad, p.detach().clone())
             for name, p in model.named_parameters(remove_duplicate=False)})


def assert_unchanged(model, before):
    modules, params = before
    assert {name: m for name, m in model.named_modules()} == modules, "modules were replaced"
    now = dict(model.named_parameters(remove_duplicate=False))
    assert now.keys() == params.keys(), "parameters were added or removed"
    for name, (param, requires_grad, value) in params.items():
        assert now[name] is param, f"{name} is another Parameter object"
        assert now[name].requires_grad == requires_grad, f"{name}.requires_grad changed"
        assert torch.equal(now[name].detach(), value), f"{name} changed value"


def tied_gpt2():
    model = base_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight, "the tiny GPT-2 is not tied"
    return model


# ------------------------------------------------------------------------------------------------
# a saved module whose parameter is tied to another module trains its own copy, as PEFT's
# ModulesToSaveWrapper (a deepcopy) does
# ------------------------------------------------------------------------------------------------

def test_a_saved_lm_head_tied_to_wte_trains_its_own_copy_and_wte_stays_frozen():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                        modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the tied layer in modules_to_save
        reference = get_peft_model(tied_gpt2(), copy.deepcopy(config))
    model = tied_gpt2()
    wte = model.transformer.wte.weight
    inject_lora(model, config)

    assert model.transformer.wte.weight is wte and not wte.requires_grad
    assert model.lm_head.weight is not wte and model.lm_head.weight.requires_grad
    assert torch.equal(model.lm_head.weight, wte)
    assert trainable(model) == peft_trainable(reference)

    model.train()
    model(torch.randint(97, (2, 5), device=DEVICE)).logits.sum().backward()
    assert model.lm_head.weight.grad is not None and wte.grad is None


def test_load_adapter_of_a_peft_adapter_with_a_tied_saved_lm_head_gives_peft_logits(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_model("gpt2", target_modules=["c_attn"], modules_to_save=["lm_head"])
    with torch.no_grad():  # "train" the saved head
        head = reference.base_model.model.lm_head.modules_to_save["default"]
        head.weight.add_(0.5 * torch.randn(head.weight.shape, device=DEVICE))
    reference.save_pretrained(tmp_path)

    model = load_adapter(tied_gpt2(), tmp_path).eval()
    assert_close(logits(model), logits(reference), "load_adapter logits, tied lm_head saved")
    assert torch.equal(model.transformer.wte.weight, base_model("gpt2").transformer.wte.weight)


def test_save_adapter_of_a_tied_saved_lm_head_loads_in_peft_with_the_same_logits(tmp_path):
    model = lorakern_model("gpt2", targets=["c_attn"], modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn(model.lm_head.weight.shape, device=DEVICE))
    save_adapter(model, tmp_path, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tied_gpt2(), tmp_path).eval()
    assert_close(logits(loaded), logits(model), "PEFT-loaded logits, tied lm_head saved")


# ------------------------------------------------------------------------------------------------
# falsy config values that PEFT still acts on
# ------------------------------------------------------------------------------------------------

GPT2_CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}


@pytest.mark.parametrize("value", [0, [0], 1, [0, 1], (), (0,)], ids=repr)
def test_layers_to_transform_is_refused_for_every_value_peft_acts_on(value):
    model = tied_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"layers_to_transform={value!r}")):
        inject_lora(model, LoraConfig(**GPT2_CONFIG, layers_to_transform=value))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="layers_to_transform="):
        inject_lora(model, {**GPT2_CONFIG, "layers_to_transform": value})
    assert_unchanged(model, before)


@pytest.mark.parametrize("value", [None, []], ids=repr)
def test_layers_to_transform_off_adapts_every_layer_as_peft(value):
    config = LoraConfig(**GPT2_CONFIG, layers_to_transform=value)
    reference = get_peft_model(base_model("gpt2"), copy.deepcopy(config))
    model = inject_lora(base_model("gpt2"), config)
    assert sorted(lora_layers(model)) == ["transformer.h.0.attn.c_attn",
                                          "transformer.h.1.attn.c_attn"]
    assert trainable(model) == peft_trainable(reference)


@pytest.mark.parametrize("field, value", [
    ("trainable_token_indices", []),   # PEFT tests `is not None`: wraps the embedding
    ("velora_config", {}),             # a {} becomes a VeloraConfig: the variant is on
    ("monteclora_config", {}),
    ("kasa_config", {}),
    ("arrow_config", {}),
    ("use_bdlora", {}),
    ("alora_invocation_tokens", []),   # `is not None` for quantized layers and task checks
])
def test_falsy_values_that_peft_acts_on_are_refused_by_inject_lora(field, value):
    model = base_model("gpt2")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{field}="):
        inject_lora(model, {**GPT2_CONFIG, field: value})
    assert_unchanged(model, before)


@pytest.mark.parametrize("field, value", [("trainable_token_indices", []),
                                          ("velora_config", {}), ("kasa_config", {})])
def test_falsy_values_that_peft_acts_on_are_refused_by_load_adapter(field, value, tmp_path):
    peft_model("gpt2", target_modules=["c_attn"]).save_pretrained(tmp_path)
    config_file = os.path.join(tmp_path, "adapter_config.json")
    config = read_config(tmp_path)
    config[field] = value
    with open(config_file, "w") as f:
        json.dump(config, f)
    model = base_model("gpt2")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{field}="):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("field, value", [("target_parameters", []), ("layer_replication", []),
                                          ("megatron_config", {}), ("use_dora", False)])
def test_falsy_values_that_peft_ignores_are_accepted(field, value):
    model = inject_lora(base_model("gpt2"), {**GPT2_CONFIG, field: value})
    assert len(lora_layers(model)) == 2


def test_load_adapter_of_a_peft_adapter_with_layers_to_transform_gives_peft_logits(tmp_path):
    """The adapter file holds the tensors of the transformed layers only, and load_adapter
    adapts the layers the file holds: nothing to refuse."""
    reference = peft_model("gpt2", target_modules=["c_attn"], layers_to_transform=0)
    reference.save_pretrained(tmp_path)
    assert read_config(tmp_path)["layers_to_transform"] == 0
    model = load_adapter(base_model("gpt2"), tmp_path).eval()
    assert sorted(lora_layers(model)) == ["transformer.h.0.attn.c_attn"]
    assert_close(logits(model), logits(reference), "load_adapter logits, layers_to_transform=0")


# ------------------------------------------------------------------------------------------------
# a refused inject_lora leaves the model exactly as it was
# ------------------------------------------------------------------------------------------------

def two_linears():
    torch.manual_seed(0)
    model = nn.Module()
    model.a = nn.Linear(4, 4)
    model.b = nn.Linear(4, 4)
    model.c = nn.Linear(4, 4)
    model.c.bias.requires_grad_(False)  # a flag that a blanket "unfreeze all" would change
    return model.to(DEVICE)


def test_a_weight_norm_parametrised_second_target_is_refused_and_the_first_left_as_it_was():
    model = two_linears()
    model.b = torch.nn.utils.parametrizations.weight_norm(model.b)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"'b'.*parametri[sz]ed.*weight"):
        inject_lora(model, ["a", "b"], modules_to_save=["c"])
    assert_unchanged(model, before)


def test_an_allocation_failure_on_the_second_target_leaves_the_model_as_it_was(monkeypatch):
    model = two_linears()
    before = snapshot(model)
    real_from_linear = LoRALinear.from_linear.__func__
    calls = []

    def from_linear_failing_second(cls, linear, *args, **kwargs):
        calls.append(linear)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated: cannot allocate lora_A")
        return real_from_linear(cls, linear, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "from_linear", classmethod(from_linear_failing_second))
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        inject_lora(model, ["a", "b"], modules_to_save=["c"])
    assert len(calls) == 2
    assert_unchanged(model, before)


def test_a_failure_after_the_targets_were_replaced_puts_the_old_modules_back(monkeypatch):
    """The last step, the saved module's own copy of a tied parameter, fails: the targets
    already replaced and every flag already changed are undone."""
    from lorakern.models import inject
    model = tied_gpt2()
    before = snapshot(model)

    def failing_copy(param):
        raise torch.OutOfMemoryError("simulated: cannot copy the tied weight")

    monkeypatch.setattr(inject, "_own_copy", failing_copy)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        inject_lora(model, ["c_attn"], modules_to_save=["lm_head"])
    assert_unchanged(model, before)
    assert model.lm_head.weight is model.transformer.wte.weight


# ------------------------------------------------------------------------------------------------
# task heads: PEFT's task models save every module whose name ends with a head's name
# ------------------------------------------------------------------------------------------------

def distilbert():
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=97, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                              max_position_embeddings=32, num_labels=3, dropout=0.0,
                              attention_dropout=0.0, seq_classif_dropout=0.0)
    return DistilBertForSequenceClassification(config).to(DEVICE).eval()


def test_seq_cls_trains_pre_classifier_and_classifier_as_peft():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    reference = get_peft_model(distilbert(), copy.deepcopy(config))
    model = inject_lora(distilbert(), config)
    assert {"pre_classifier.weight", "classifier.weight"} <= trainable(model)
    assert trainable(model) == peft_trainable(reference)


def test_seq_cls_all_linear_refuses_a_head_that_peft_would_adapt_and_save_both():
    """PEFT's all-linear gives pre_classifier a LoRA layer, which its task model then
    tries to save whole (and PEFT refuses); lorakern refuses it by name, before any change."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        get_peft_model(distilbert(), copy.deepcopy(config))
    model = distilbert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'pre_classifier'.*exclude_modules"):
        inject_lora(model, config)
    assert_unchanged(model, before)

    excluded = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS",
                          exclude_modules=["pre_classifier"])
    reference = get_peft_model(distilbert(), copy.deepcopy(excluded))
    model = inject_lora(distilbert(), excluded)
    assert "pre_classifier" not in lora_layers(model)
    assert trainable(model) == peft_trainable(reference)


# ------------------------------------------------------------------------------------------------
# unload: every lorakern layer back to the plain module it replaced
# ------------------------------------------------------------------------------------------------

class Mixed(nn.Module):
    """An embedding with padding_idx (and max_norm, which cannot be merged), a linear
    without bias, a GPT-2 Conv1D."""

    def __init__(self, max_norm=None):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=1, max_norm=max_norm, norm_type=3.0)
        self.proj = nn.Linear(8, 6, bias=False)
        self.conv = Conv1D(5, 6)
        self.head = nn.Linear(5, 2)

    def forward(self, ids):
        return self.head(self.conv(self.proj(self.embed(ids))))


def mixed_lora(max_norm=None):
    torch.manual_seed(0)
    model = Mixed(max_norm).to(DEVICE)
    base = copy.deepcopy(model)
    inject_lora(model, ["embed", "proj", "conv"], r=2, alpha=4, modules_to_save=["head"])
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    return base, model.eval()


IDS = torch.tensor([[0, 1, 2, 3], [4, 5, 1, 10]])


def run(model):
    with torch.no_grad():
        return model(IDS.to(DEVICE))


def assert_plain(model, base):
    assert type(model.embed) is nn.Embedding and type(model.proj) is nn.Linear
    assert type(model.conv) is Conv1D and model.conv.nf == 5 and model.conv.nx == 6
    embed, base_embed = model.embed, base.embed
    assert ((embed.padding_idx, embed.max_norm, embed.norm_type)
            == (base_embed.padding_idx, base_embed.max_norm, base_embed.norm_type))
    assert model.proj.bias is None
    assert model.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("merged_before", [False, True])
def test_unload_merge_gives_the_merged_model_as_plain_modules(merged_before):
    base, model = mixed_lora()
    if merged_before:
        merge_lora(model)
    weights = {name: layer.weight for name, layer in lora_layers(model).items()}
    expected = run(merge_lora(copy.deepcopy(model)) if not merged_before else model)
    assert models.unload(model) is model
    assert_plain(model, base)
    for name, weight in weights.items():
        assert model.get_submodule(name).weight is weight, f"{name}: weight not kept"
        assert not weight.requires_grad
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    assert_close(run(model), expected, "unload(merge=True) vs the merged model")


def test_unload_without_merge_gives_the_base_model_back():
    base, model = mixed_lora(max_norm=50.0)
    models.unload(model, merge=False)
    assert_plain(model, base)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head"))
    assert torch.equal(run(model), run(base))


def test_unload_on_a_gpt2_matches_peft_merge_and_unload(tmp_path):
    reference = peft_model("gpt2", target_modules=["c_attn", "c_fc", "wpe"])
    reference.save_pretrained(tmp_path)
    model = load_adapter(base_model("gpt2"), tmp_path).eval()
    expected = logits(reference.merge_and_unload())
    models.unload(model)
    assert not lora_layers(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert type(model.transformer.wpe) is nn.Embedding
    assert model.state_dict().keys() == base_model("gpt2").state_dict().keys()
    assert_close(logits(model), expected, "unload vs PEFT's merge_and_unload")


def test_unload_of_a_tied_model_whose_saved_lm_head_trained_a_copy_unties_the_config():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_model("gpt2", target_modules=["c_attn"], modules_to_save=["lm_head"])
        reference.merge_and_unload()
    assert reference.base_model.model.config.tie_word_embeddings is False

    model = lorakern_model("gpt2", targets=["c_attn"], modules_to_save=["lm_head"])
    with pytest.warns(UserWarning, match="tie_word_embeddings=False"):
        models.unload(model)
    assert model.config.tie_word_embeddings is False
    still_tied = models.unload(lorakern_model("gpt2", targets=["c_attn"]))
    assert still_tied.config.tie_word_embeddings is True


def test_refused_unloads_change_nothing():
    with pytest.raises(ValueError, match="no LoRA layers"):
        models.unload(Mixed())

    base, model = mixed_lora()
    model.proj.merge()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merge=False.*'proj'.*merged"):
        models.unload(model, merge=False)
    assert_unchanged(model, before)

    base, model = mixed_lora()
    with torch.no_grad():
        model.conv.lora_B.fill_(3e38)  # merging would overflow float32
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        models.unload(model)
    assert_unchanged(model, before)

    base, model = mixed_lora(max_norm=50.0)  # a max_norm embedding cannot be merged
    before = snapshot(model)
    with pytest.raises(ValueError, match="max_norm"):
        models.unload(model)
    assert_unchanged(model, before)

    model = lorakern_model("gpt2", targets=["wte"])  # tied to lm_head: merging would change it
    before = snapshot(model)
    with pytest.raises(ValueError, match="tied"):
        models.unload(model)
    assert_unchanged(model, before)

    layer = LoRALinear(4, 4)
    with pytest.raises(ValueError, match="is a LoRALinear itself"):
        models.unload(layer)


def test_unload_is_exported():
    assert lorakern.unload is models.unload and "unload" in lorakern.__all__
    assert "unload" in lorakern.models.__all__


# ------------------------------------------------------------------------------------------------
# merge_lora / unload on a PEFT model point to PEFT's own merge_and_unload
# ------------------------------------------------------------------------------------------------

def test_merge_lora_and_unload_on_a_peft_model_point_to_merge_and_unload():
    model = patch_peft(peft_model("llama", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"PEFT LoRA layers.*merge_and_unload\(\)"):
        merge_lora(model)
    with pytest.raises(ValueError, match=r"merge_and_unload\(\)"):
        models.unload(model)
    with pytest.raises(ValueError, match=r"inject_lora first"):
        merge_lora(nn.Sequential(nn.Linear(2, 2)))


def test_the_peft_check_does_not_import_peft():
    code = ("import sys, torch\n"
            "import lorakern\n"
            "try:\n"
            "    lorakern.merge_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)))\n"
            "except ValueError as err:\n"
            "    assert 'inject_lora first' in str(err), err\n"
            "assert 'peft' not in sys.modules, 'merge_lora imported peft'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr


def test_save_adapter_of_a_seq_cls_model_saves_both_heads_and_peft_loads_it(tmp_path):
    """PEFT's plain suffix matching selects pre_classifier for "classifier": with both
    saved, that is the set save_adapter must write, not a clash."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    model = inject_lora(distilbert(), config)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
        for head in (model.pre_classifier, model.classifier):
            head.weight.add_(0.5 * torch.randn(head.weight.shape, device=DEVICE))
    save_adapter(model, tmp_path, task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(distilbert(), tmp_path).eval()
    ids = torch.randint(0, 97, (2, 7), device=DEVICE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                     "PEFT-loaded SEQ_CLS logits")
