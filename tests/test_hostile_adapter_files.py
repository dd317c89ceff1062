"""Adapter files and models that would give other outputs than the saved model's are
refused, before anything is written or changed:

- LoRA on ``nn.Embedding(max_norm=...)``: PEFT renormalises the columns of
  ``lora_embedding_A`` too, lorakern does not (``save_adapter`` and
  ``load_adapter`` refuse it, as ``patch_peft`` does);
- a config beside weights of another save (a save killed between its two
  renames): the weights record the layer settings written with them;
- a model on the meta device, whose tensors cannot hold the loaded values;
- a PEFT model given to ``save_adapter`` (PEFT's ``save_pretrained`` saves it).

The models are the tiny Llama of test_peft_interop, and a two-module language
model for the embedding cases.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_adapter_files import (a_different_model, assert_unchanged, edit_config,  # noqa: E402
                                saved_adapter, snapshot)
from conftest import DEVICE  # noqa: E402
from test_peft_interop import (_llama, assert_close, base_model, logits,  # noqa: E402
                               peft_model, read_config)

from lorakern.models import inject_lora  # noqa: E402
from lorakern.layers import LoRALinear  # noqa: E402
from lorakern.peft import load_adapter, patch_peft, save_adapter  # noqa: E402
from lorakern.peft.adapter_format import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent
VOCAB = 23


# ------------------------------------------------------------------------------------------------
# nn.Embedding(max_norm=...)
# ------------------------------------------------------------------------------------------------

class TinyLM(nn.Module):
    """An embedding and an output layer: the smallest model with an embedding adapter."""

    def __init__(self, max_norm=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8, max_norm=max_norm)
        self.head = nn.Linear(8, VOCAB)
        self.to(DEVICE)

    def forward(self, ids):
        return self.head(self.embed(ids))


def peft_tiny_lm(max_norm):
    model = get_peft_model(TinyLM(max_norm), LoraConfig(r=2, lora_alpha=4,
                                                        target_modules=["embed", "head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE))
    return model.eval()


def test_peft_renormalises_lora_embedding_a_under_max_norm():
    """Why max_norm embeddings are refused: PEFT's forward looks up lora_embedding_A's
    columns with the base layer's max_norm, renormalising them in place."""
    model = peft_tiny_lm(max_norm=1.0)
    lora_a = model.base_model.model.embed.lora_embedding_A["default"]
    with torch.no_grad():
        lora_a.mul_(10.0)  # every column longer than max_norm
    ids = torch.tensor([[0, 3, 5]], device=DEVICE)
    assert (lora_a[:, ids[0]].norm(dim=0) > 1.0).all()
    with torch.no_grad():
        model(ids)
    assert (lora_a[:, ids[0]].norm(dim=0) <= 1.0 + 1e-6).all()


def test_save_adapter_refuses_a_max_norm_embedding_before_writing(tmp_path):
    model = inject_lora(TinyLM(max_norm=1.0), ["embed", "head"], r=2, alpha=4)
    with pytest.raises(ValueError, match=r"'embed'.*max_norm=1\.0.*lora_embedding_A"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_load_adapter_refuses_a_peft_adapter_on_a_max_norm_embedding(tmp_path):
    peft_tiny_lm(max_norm=1.0).save_pretrained(tmp_path)
    model = TinyLM(max_norm=1.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'embed'.*max_norm=1\.0.*lora_embedding_A"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_embeddings_without_max_norm_still_round_trip(tmp_path):
    """The control for the refusals above: the same model without max_norm loads."""
    theirs = peft_tiny_lm(max_norm=None)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(TinyLM(), tmp_path).eval()
    ids = torch.tensor([[0, 3, 5, 7]], device=DEVICE)
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids), "lorakern loading PEFT's embedding adapter")


# ------------------------------------------------------------------------------------------------
# models on the meta device
# ------------------------------------------------------------------------------------------------

def meta_llama():
    with torch.device("meta"):
        torch.manual_seed(0)
        return _llama().eval()


def structure(model):
    return ({name: type(m) for name, m in model.named_modules()},
            {name: (p.device.type, p.requires_grad) for name, p in model.named_parameters()})


def test_load_adapter_into_a_meta_model_is_refused_before_anything_changes(tmp_path):
    saved_adapter(tmp_path)
    model = meta_llama()
    before = structure(model)
    with pytest.raises(ValueError, match=r"meta device.*q_proj\.weight.*to_empty"):
        load_adapter(model, tmp_path)
    assert structure(model) == before


def test_load_adapter_refuses_a_meta_tensor_it_would_copy_a_saved_module_into(tmp_path):
    """Only the output layer (saved whole in the adapter) left on meta."""
    saved_adapter(tmp_path)
    model = base_model("llama")
    model.lm_head.to_empty(device="meta")
    before = structure(model)
    with pytest.raises(ValueError, match=r"meta device.*'lm_head\.weight'"):
        load_adapter(model, tmp_path)
    assert structure(model) == before
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_a_materialised_model_loads_the_adapter(tmp_path):
    """What the refusal says to do: materialise, load the base weights, then the adapter."""
    _, expected = saved_adapter(tmp_path)
    base = base_model("llama")
    model = meta_llama().to_empty(device=DEVICE)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():  # to_empty leaves the buffers no state dict holds (rotary) uninitialised
        for name, buffer in base.named_buffers():
            model.get_buffer(name).copy_(buffer)
    loaded = load_adapter(model, tmp_path).eval()
    assert_close(logits(loaded), expected, "logits of a materialised model")


# ------------------------------------------------------------------------------------------------
# a PEFT model given to save_adapter
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patched", [False, True])
def test_save_adapter_of_a_peft_model_points_to_save_pretrained(patched, tmp_path):
    model = peft_model("llama", target_modules=["q_proj"])
    if patched:
        patch_peft(model)
    with pytest.raises(ValueError, match=r"PEFT LoRA layers.*q_proj.*save_pretrained"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_adapter_of_a_model_without_any_lora_layers_still_says_inject_lora(tmp_path):
    with pytest.raises(ValueError, match=r"no LoRA layers \(inject_lora first\)"):
        save_adapter(base_model("llama"), tmp_path)
