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
# a save killed between its two renames
# ------------------------------------------------------------------------------------------------

KILLED_SAVE = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_adapter_files import a_different_model
    from lorakern.peft import save_adapter

    real_replace = os.replace

    def replace_then_die(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        os._exit(3)  # killed right after the first rename: no cleanup runs

    os.replace = replace_then_die
    save_adapter(a_different_model(), {path!r})
""")


def hidden_files(path):
    return sorted(name for name in os.listdir(path) if name.startswith("."))


@pytest.fixture(scope="module")
def killed_save(tmp_path_factory):
    """A directory where a save over saved_adapter's adapter was killed between the
    renames of the weights and of the config."""
    path = tmp_path_factory.mktemp("killed")
    saved_adapter(path)
    old_config = (path / CONFIG_NAME).read_bytes()
    old_weights = (path / WEIGHTS_NAME).read_bytes()
    script = KILLED_SAVE.format(root=str(TESTS.parent), tests=str(TESTS), path=str(path))
    run = subprocess.run([sys.executable, "-c", script], cwd=TESTS.parent, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 3, run.stdout + run.stderr
    # the simulated kill: new weights beside the old config, and the config's temporary
    assert (path / CONFIG_NAME).read_bytes() == old_config
    assert (path / WEIGHTS_NAME).read_bytes() != old_weights
    assert hidden_files(path), "the killed save left no temporary files: nothing is tested"
    return path


def copy_of(directory, tmp_path):
    return pathlib.Path(shutil.copytree(directory, tmp_path / "adapter"))


def test_load_adapter_refuses_the_weights_of_a_killed_save_beside_the_old_config(
        killed_save, tmp_path):
    path = copy_of(killed_save, tmp_path)
    model = base_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"different saves.*\br: 4 in .*, 2 in"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_the_next_save_removes_the_temporaries_of_a_killed_save(killed_save, tmp_path):
    path = copy_of(killed_save, tmp_path)
    new_model = a_different_model()
    save_adapter(new_model, path)
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = load_adapter(base_model("llama"), path).eval()
    assert_close(logits(loaded), logits(new_model), "logits of the adapter saved again")


def test_a_save_keeps_the_temporaries_of_a_save_still_running(tmp_path):
    """A temporary of a live process (here this one, as another thread saving into the
    same directory would be) is not stale: removing it would break that save."""
    from lorakern.peft import atomic_files
    saved_adapter(tmp_path)
    in_flight = pathlib.Path(atomic_files.temporary_name(tmp_path, WEIGHTS_NAME))
    in_flight.write_bytes(b"being written")
    save_adapter(a_different_model(), tmp_path)
    assert in_flight.read_bytes() == b"being written"


def test_a_config_whose_layer_settings_differ_from_the_saved_ones_is_refused(tmp_path):
    """A config replaced after the save gives another scale: refused, naming the field."""
    saved_adapter(tmp_path)
    edit_config(tmp_path, lora_alpha=16)
    model = base_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lora_alpha: 16 in .*, 8 in"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_a_config_edited_in_a_descriptive_field_still_loads(tmp_path):
    _, expected = saved_adapter(tmp_path)
    edit_config(tmp_path, base_model_name_or_path="/models/moved", task_type="CAUSAL_LM")
    loaded = load_adapter(base_model("llama"), tmp_path).eval()
    assert_close(logits(loaded), expected, "logits after editing the config's description")


def test_the_saved_files_stay_plain_peft_files(tmp_path):
    """The record of the settings is in the safetensors metadata, which PEFT ignores: the
    config holds LoraConfig fields only, and PEFT loads the adapter without a warning."""
    _, expected = saved_adapter(tmp_path)
    assert set(read_config(tmp_path)) <= set(LoraConfig.__dataclass_fields__)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path).eval()
    assert not [w for w in caught if "adapter" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()], [str(w.message) for w in caught]
    assert_close(logits(loaded), expected, "PEFT logits of lorakern's adapter")


def test_an_adapter_peft_saved_again_loads_without_the_record(tmp_path):
    _, expected = saved_adapter(tmp_path / "ours")
    PeftModel.from_pretrained(base_model("llama"), tmp_path / "ours").save_pretrained(
        tmp_path / "theirs")
    loaded = load_adapter(base_model("llama"), tmp_path / "theirs").eval()
    assert_close(logits(loaded), expected, "logits of the adapter PEFT saved again")


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
