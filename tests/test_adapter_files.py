"""Adapter files: a refused ``load_adapter`` changes nothing, a failed ``save_adapter``
leaves the previous adapter as it was, damaged files are refused by path.

The models are the tiny Llama of test_peft_interop (its helpers build them).
"""
import errno
import json
import os
import pathlib
import re

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from peft import PeftModel  # noqa: E402
from test_peft_interop import (assert_close, base_model, logits,  # noqa: E402
                               lorakern_model, read_config)

import lorakern  # noqa: E402
from lorakern.layers import LoRALinear  # noqa: E402
from lorakern.peft.adapter_format import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from lorakern.peft import load_adapter, save_adapter  # noqa: E402

HEAD = "base_model.model.lm_head.weight"
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def saved_adapter(path, seed=0, targets=("q_proj", "v_proj"), r=4):
    """A lorakern adapter with a trained lm_head saved whole (modules_to_save): its
    logits, and the files' bytes."""
    model = lorakern_model("llama", seed=seed, targets=list(targets), r=r,
                           modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn(model.lm_head.weight.shape,
                                                     generator=torch.Generator().manual_seed(seed)
                                                     ).to(model.lm_head.weight.device))
    save_adapter(model, path)
    return model, logits(model)


def file_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {name: type(m) for name, m in model.named_modules()},
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model, before):
    state, types, trainable = snapshot(model)
    assert types == before[1], "modules were replaced"
    assert trainable == before[2], "requires_grad flags changed"
    assert state.keys() == before[0].keys()
    changed = [k for k in state if not torch.equal(state[k], before[0][k])]
    assert not changed, f"tensors changed: {changed}"


def edit_config(path, **fields):
    config = read_config(path)
    config.update(fields)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def edit_weights(path, change):
    weights = safetensors_torch.load_file(path / WEIGHTS_NAME)
    change(weights)
    safetensors_torch.save_file(weights, path / WEIGHTS_NAME)


# ------------------------------------------------------------------------------------------------
# load_adapter: all checks before the first change
# ------------------------------------------------------------------------------------------------

BAD_ADAPTERS = {
    "dropout_one": (lambda p: edit_config(p, lora_dropout=1.0), r"lora_dropout=1\.0"),
    "alpha_null": (lambda p: edit_config(p, lora_alpha=None), r"lora_alpha=None"),
    "r_string": (lambda p: edit_config(p, r="4"), r"r='4'"),
    "alpha_pattern_null": (lambda p: edit_config(p, alpha_pattern={"q_proj": None}),
                           r"alpha_pattern\['q_proj'\]=None"),
    "rank_pattern_list": (lambda p: edit_config(p, rank_pattern=["q_proj"]),
                          r"rank_pattern=\['q_proj'\]"),
    "modules_to_save_string": (lambda p: edit_config(p, modules_to_save="lm_head"),
                               r"modules_to_save='lm_head'"),
    "modules_to_save_a_target": (lambda p: edit_config(p, modules_to_save=["lm_head", "q_proj"]),
                                 r"'model\.layers\.0\.self_attn\.q_proj' and "
                                 r"'model\.layers\.0\.self_attn\.q_proj'"),
    "integer_lora_A": (lambda p: edit_weights(p, lambda w: w.update(
        {Q_PROJ_A: w[Q_PROJ_A].to(torch.int32)})), r"lora_A \(torch\.int32\)"),
    "lora_A_of_another_width": (lambda p: edit_weights(p, lambda w: w.update(
        {Q_PROJ_A: torch.zeros(4, 31)})), r"do not fit its 32 inputs"),
    "head_of_another_shape": (lambda p: edit_weights(p, lambda w: w.update(
        {HEAD: torch.zeros(96, 32)})), r"lm_head\.weight' \(96, 32\)"),
    "tensor_the_model_lacks": (lambda p: edit_weights(p, lambda w: w.update(
        {"base_model.model.extra.weight": torch.zeros(3)})), r"lacks.*extra\.weight"),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_a_refused_load_changes_nothing_in_the_model(case, tmp_path):
    saved_adapter(tmp_path)
    damage, match = BAD_ADAPTERS[case]
    damage(tmp_path)
    model = base_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_a_refused_adapter_dtype_changes_nothing_in_the_model(tmp_path):
    saved_adapter(tmp_path)
    model = base_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_dtype=torch\.int8"):
        load_adapter(model, tmp_path, adapter_dtype=torch.int8)
    assert_unchanged(model, before)


def test_the_undamaged_adapter_loads_with_its_saved_head(tmp_path):
    """The control for the cases above: the same files, unedited, load."""
    _, expected = saved_adapter(tmp_path)
    model = load_adapter(base_model("llama"), tmp_path).eval()
    assert_close(logits(model), expected, "logits of the loaded adapter")


# ------------------------------------------------------------------------------------------------
# damaged files: ValueError naming the file
# ------------------------------------------------------------------------------------------------

def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


DAMAGED_FILES = {
    "truncated_weights": (WEIGHTS_NAME, _truncate, "is not a readable safetensors file"),
    "garbage_weights": (WEIGHTS_NAME, lambda f: f.write_bytes(b"\x00not safetensors" * 4),
                        "is not a readable safetensors file"),
    "config_a_list": (CONFIG_NAME, lambda f: f.write_text('["r", 4]'),
                      "holds a JSON list, not an object"),
    "config_not_json": (CONFIG_NAME, lambda f: f.write_text('{"r": 4,'), "is not valid JSON"),
    "config_not_utf8": (CONFIG_NAME, lambda f: f.write_bytes(b'{"r": "\xff"}'),
                        "is not valid JSON"),
}


@pytest.mark.parametrize("case", DAMAGED_FILES)
def test_a_damaged_file_is_refused_naming_its_path(case, tmp_path):
    saved_adapter(tmp_path)
    name, damage, what = DAMAGED_FILES[case]
    damage(tmp_path / name)
    model = base_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path / name}' {what}")):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_a_damaged_pytorch_weights_file_is_refused_naming_its_path(tmp_path):
    saved_adapter(tmp_path)
    os.remove(tmp_path / WEIGHTS_NAME)
    (tmp_path / "adapter_model.bin").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path / 'adapter_model.bin'}' is not "
                                                   f"a readable PyTorch weights file")):
        load_adapter(base_model("llama"), tmp_path)


# ------------------------------------------------------------------------------------------------
# save_adapter: both files replaced, or neither
# ------------------------------------------------------------------------------------------------

def a_different_model():
    """Another rank and other targets than saved_adapter's: its config cannot load the
    old weights, nor the old config its weights."""
    return lorakern_model("llama", targets=["k_proj", "o_proj"], r=2)


def disk_full_while_writing_weights(monkeypatch):
    real_save_file = safetensors_torch.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        _truncate(pathlib.Path(filename))
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors_torch, "save_file", save_half_then_fail)


def config_rename_fails(monkeypatch):
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        if os.path.basename(dst) == CONFIG_NAME:
            raise OSError(errno.EIO, "Input/output error", dst)
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


FAILURES = {"weights_write": disk_full_while_writing_weights,
            "config_rename": config_rename_fails}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_save_leaves_the_old_adapter_loadable(failure, tmp_path, monkeypatch):
    _, old_logits = saved_adapter(tmp_path)
    old_files = file_bytes(tmp_path)
    new_model = a_different_model()

    with monkeypatch.context() as patch:
        FAILURES[failure](patch)
        with pytest.raises(OSError):
            save_adapter(new_model, tmp_path)

    assert file_bytes(tmp_path) == old_files, "files changed, or temporary files left behind"
    loaded = load_adapter(base_model("llama"), tmp_path).eval()
    assert_close(logits(loaded), old_logits, "logits of the old adapter after a failed save")


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_first_save_leaves_no_adapter_files(failure, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        FAILURES[failure](patch)
        with pytest.raises(OSError):
            save_adapter(a_different_model(), tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_save_over_an_old_adapter_replaces_both_files_and_leaves_no_temporaries(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "README.md").write_text("kept")
    new_model = a_different_model()
    save_adapter(new_model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    assert read_config(tmp_path)["r"] == 2
    loaded = load_adapter(base_model("llama"), tmp_path).eval()
    assert_close(logits(loaded), logits(new_model), "logits of the new adapter")


# ------------------------------------------------------------------------------------------------
# merged layers
# ------------------------------------------------------------------------------------------------

def test_save_adapter_of_a_merged_model_saves_the_adapter_against_the_original_base(tmp_path):
    """A and B are saved, never the base weight: PEFT on a fresh base gives the
    outputs of the merged model."""
    model = lorakern_model("llama", targets=["q_proj", "v_proj"])
    lorakern.merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    save_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path).eval()
    assert_close(logits(loaded), logits(model), "PEFT logits of a merged model's adapter")
