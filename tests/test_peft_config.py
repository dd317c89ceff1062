"""``inject_lora`` reading a ``peft.LoraConfig`` (or its dict) and PEFT's argument names.

Each config is given to both ``peft.get_peft_model`` and ``inject_lora`` on two
copies of one tiny Llama (see test_peft_interop): the same modules must get an
adapter, with the same rank, scaling, shapes and trainable parameters, and
with PEFT's random adapter weights copied over, the same logits as PEFT's run
in float64 (the oracle).
"""
import copy
import dataclasses
import json
import re

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402

from lorakern.models import inject_lora  # noqa: E402
from lorakern.layers import LoRALinear  # noqa: E402
from oracle import assert_matches_oracle  # noqa: E402
from test_peft_interop import base_model, randomize_adapters, token_ids  # noqa: E402

PEFT_PREFIX = "base_model.model."
QV = ["q_proj", "v_proj"]

CONFIGS = {
    "target list": dict(r=4, lora_alpha=8, target_modules=QV),
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "all-linear, exclude list": dict(
        r=4, lora_alpha=8, target_modules="all-linear",
        exclude_modules=["down_proj", "model.layers.0.self_attn.o_proj"]),
    "regex, exclude regex": dict(r=4, lora_alpha=8, target_modules=r".*\.(q|k|v)_proj",
                                 exclude_modules=r".*layers\.1\.self_attn\.k_proj"),
    "rank and alpha patterns": dict(r=4, lora_alpha=8, target_modules="all-linear",
                                    rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                                    alpha_pattern={"^model.layers.0.self_attn.v_proj": 3,
                                                   "down_proj": 5}),
    "rslora with a rank pattern": dict(r=4, lora_alpha=8, target_modules=QV, use_rslora=True,
                                       rank_pattern={"v_proj": 9}),
    "modules_to_save and dropout": dict(r=4, lora_alpha=8, target_modules=QV, lora_dropout=0.1,
                                        modules_to_save=["lm_head"]),
}


def lorakern_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def peft_layers(model):
    return {name[len(PEFT_PREFIX):]: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def peft_trainable(model):
    """PEFT's trainable parameter names as lorakern names them: 'x.lora_A' for
    'x.lora_A.default.weight', 'head.weight' for 'head.modules_to_save.default.weight'."""
    names = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name[len(PEFT_PREFIX):]
            name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)
            names.add(name.replace(".modules_to_save.default.", "."))
    return names


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def both_ways(config):
    """(PEFT model with random adapters, lorakern model from the same config)."""
    reference = get_peft_model(base_model("llama"), copy.deepcopy(config))
    randomize_adapters(reference)
    return reference, inject_lora(base_model("llama"), config)


def assert_same_adapters(reference, model):
    ours, theirs = lorakern_layers(model), peft_layers(reference)
    assert sorted(ours) == sorted(theirs)
    for name, layer in ours.items():
        peft_layer = theirs[name]
        assert layer.r == peft_layer.r["default"], name
        assert layer.scale == pytest.approx(peft_layer.scaling["default"], rel=1e-12), name
        assert layer.lora_A.shape == peft_layer.lora_A["default"].weight.shape, name
        assert layer.lora_B.shape == peft_layer.lora_B["default"].weight.shape, name
        assert layer.dropout == getattr(peft_layer.lora_dropout["default"], "p", 0.0), name
    assert trainable(model) == peft_trainable(reference)


def assert_same_logits(reference, model):
    """lorakern with PEFT's adapter weights against PEFT in float64."""
    with torch.no_grad():
        for name, layer in lorakern_layers(model).items():
            peft_layer = peft_layers(reference)[name]
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
        ids = token_ids()
        expected = copy.deepcopy(reference).double().eval()(ids).logits
        got = model.eval()(ids).logits
    assert_matches_oracle(got, expected, torch.float32, "logits")


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_lora_config_injects_what_get_peft_model_injects(case):
    reference, model = both_ways(LoraConfig(**CONFIGS[case]))
    assert_same_adapters(reference, model)
    assert_same_logits(reference, model)


def test_all_linear_leaves_out_the_output_layer_as_peft_does():
    reference, model = both_ways(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layers = lorakern_layers(model)
    assert "lm_head" not in layers
    assert len(layers) == 2 * 7  # every projection of both layers
    assert sorted(layers) == sorted(peft_layers(reference))


def test_the_dict_of_an_adapter_config_json_reads_as_the_config():
    config = LoraConfig(**CONFIGS["rank and alpha patterns"], task_type="CAUSAL_LM")
    as_json = json.loads(json.dumps(config.to_dict(), default=list))
    reference, _ = both_ways(config)
    model = inject_lora(base_model("llama"), as_json)
    assert_same_adapters(reference, model)
    assert_same_logits(reference, model)


def test_inference_mode_freezes_the_adapters_as_peft_does():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=QV, inference_mode=True)
    reference, model = both_ways(config)
    assert trainable(model) == peft_trainable(reference) == set()


def test_peft_keyword_names_give_what_the_config_gives():
    config = dict(r=4, target_modules="all-linear", exclude_modules=["down_proj"],
                  rank_pattern={"q_proj": 2}, alpha_pattern={"k_proj": 3}, use_rslora=True)
    reference, _ = both_ways(LoraConfig(**config, lora_alpha=8, lora_dropout=0.1))
    model = inject_lora(base_model("llama"), **config, lora_alpha=8, lora_dropout=0.1,
                        init_lora_weights="gaussian", bias="none")
    assert_same_adapters(reference, model)
    assert all(layer.init == "gaussian" for layer in lorakern_layers(model).values())
    assert_same_logits(reference, model)
    # lorakern's own names, positionally, still work
    model = inject_lora(base_model("llama"), QV, 4, 8, 0.1)
    assert sorted(lorakern_layers(model)) == sorted(
        n for n, m in base_model("llama").named_modules() if n.endswith(("q_proj", "v_proj")))


def test_the_config_may_also_be_given_as_config():
    reference, _ = both_ways(LoraConfig(**CONFIGS["target list"]))
    model = inject_lora(base_model("llama"), config=LoraConfig(**CONFIGS["target list"]),
                        adapter_dtype=torch.float64)
    assert sorted(lorakern_layers(model)) == sorted(peft_layers(reference))
    assert all(layer.lora_A.dtype == torch.float64 for layer in lorakern_layers(model).values())


@pytest.mark.parametrize("fields, match", [
    (dict(lora_bias=True), r"lora_bias=True"),
    (dict(layers_to_transform=[0]), r"layers_to_transform=\[0\]"),
    (dict(target_parameters=["mlp.experts.gate_up_proj"]), r"target_parameters="),
    (dict(layer_replication=[(0, 2)]), r"layer_replication="),
    (dict(bias="lora_only"), r"bias='lora_only'"),
    (dict(init_lora_weights=False), r"init_lora_weights=False"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa'"),
    (dict(rank_pattern={"o_proj": 2}), r"rank_pattern keys \['o_proj'\] match no target"),
    (dict(exclude_modules=["nothing"]), r"exclude_modules \['nothing'\] matched no module"),
    (dict(exclude_modules=QV), r"excludes every target"),
    (dict(target_modules=None), r"target_modules is required"),
    (dict(modules_to_save=["head"]), r"modules_to_save \['head'\] matched no module"),
])
def test_config_fields_without_a_loralinear_equivalent_are_refused_by_name(fields, match):
    model = base_model("llama")
    state = copy.deepcopy(model.state_dict())
    config = LoraConfig(**{**CONFIGS["target list"], **fields})
    with pytest.raises(ValueError, match=match):
        inject_lora(model, config)
    assert lorakern_layers(model) == {}
    assert all(p.requires_grad for p in model.parameters()), "a refused config froze the model"
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


def test_an_unknown_field_set_in_a_config_dict_is_refused_and_unset_ones_are_not():
    config = {**CONFIGS["target list"], "peft_type": "LORA", "future_option": None}
    assert lorakern_layers(inject_lora(base_model("llama"), config))
    with pytest.raises(ValueError, match=r"future_option=3"):
        inject_lora(base_model("llama"), {**config, "future_option": 3})
    with pytest.raises(ValueError, match=r"peft_type='IA3'"):
        inject_lora(base_model("llama"), {**config, "peft_type": "IA3"})


def test_modules_to_save_that_peft_would_read_as_more_modules_is_refused():
    # PEFT's plain suffix test: "proj" saves every *proj module too
    model = nn.ModuleDict({"proj": nn.Linear(4, 4), "q_proj": nn.Linear(4, 4),
                           "k": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=r"would also save \['q_proj'\]"):
        inject_lora(model, LoraConfig(target_modules=["k"], modules_to_save=["proj"]))
    assert lorakern_layers(model) == {}
    # the same keyword keeps lorakern's whole-component matching
    inject_lora(model, ["k"], modules_to_save=["proj"])
    assert trainable(model) == {"k.lora_A", "k.lora_B", "proj.weight", "proj.bias"}


def test_both_names_of_one_setting_are_refused():
    model = base_model("llama")
    with pytest.raises(ValueError, match=r"both alpha=16 and lora_alpha=32"):
        inject_lora(model, QV, alpha=16, lora_alpha=32)
    with pytest.raises(ValueError, match=r"both dropout=0.1 and lora_dropout=0.1"):
        inject_lora(model, QV, dropout=0.1, lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"both in the config and as a keyword: r=4 in the "
                                         r"config and r=16"):
        inject_lora(model, LoraConfig(**CONFIGS["target list"]), r=16)
    with pytest.raises(ValueError, match=r"lora_alpha=8 in the config and alpha=16"):
        inject_lora(model, LoraConfig(**CONFIGS["target list"]), alpha=16)
    assert lorakern_layers(model) == {}


def test_every_lora_config_field_is_read_or_refused():
    """A PEFT release that adds a LoraConfig field: set, it is refused unless read."""
    from lorakern.models import config
    known = set(config.CONFIG_ARGUMENTS) | set(config.CONFIG_BOOKKEEPING)
    defaults = LoraConfig()
    for field in dataclasses.fields(defaults):
        if field.name not in known:
            assert not getattr(defaults, field.name), (
                f"LoraConfig.{field.name} defaults to a set value; inject_lora would refuse "
                f"every config")


def test_a_seq_cls_config_saves_the_score_head_and_keeps_it_out_of_all_linear():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0))

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    reference = get_peft_model(classifier(), copy.deepcopy(config))
    model = inject_lora(classifier(), config)
    assert "score" not in lorakern_layers(model)
    assert sorted(lorakern_layers(model)) == sorted(peft_layers(reference))
    assert "score.weight" in trainable(model)
    assert trainable(model) == peft_trainable(reference)
