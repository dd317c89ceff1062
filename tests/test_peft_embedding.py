"""LoRA on embeddings with PEFT: the GPTBigCode tutorial config runs fused end to end.

The config, as a tutorial gives it:
``LoraConfig(r=16, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte", "wpe"],
lora_dropout=0.1, bias="none")``, on a tiny GPTBigCode built from a config. Comparisons
with PEFT use lora_dropout=0 (PEFT's dropout masks cannot be reproduced); tolerances as
in test_peft_interop.py (both sides float32, different accumulation orders).
"""
import pickle

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM  # noqa: E402

import lorakern  # noqa: E402
from conftest import DEVICE  # noqa: E402
from lorakern import kernels  # noqa: E402
from test_peft_interop import assert_close  # noqa: E402

VOCAB = 61
TARGETS = ["c_attn", "c_proj", "c_fc", "wte", "wpe"]


def tutorial_config(dropout=0.0):
    return LoraConfig(r=16, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                      bias="none")


def base_model(seed=0, tied=False):
    """The tutorial's architecture, tiny; input and output embeddings untied unless asked
    (merging an adapter into a tied table would change the output layer too)."""
    torch.manual_seed(seed)
    config = GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=24,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                              multi_query=True, tie_word_embeddings=tied)
    return GPTBigCodeForCausalLM(config).to(DEVICE).eval()


def randomize(model, seed=0):
    """Every adapter tensor random, so each contributes to the outputs compared."""
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((0.1 * torch.randn(p.shape, generator=gen)).to(p.device))
    return model


def token_ids(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (2, 7), generator=gen).to(DEVICE)


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    ids = token_ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_training_signal(actual, expected):
    (logits, loss, grads), (logits_ref, loss_ref, grads_ref) = actual, expected
    assert_close(logits, logits_ref, "logits")
    assert_close(loss, loss_ref, "loss")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], f"grad of {name}")


def test_patch_peft_fuses_the_tutorial_model_and_matches_peft():
    model = randomize(get_peft_model(base_model(), tutorial_config())).eval()
    expected = loss_and_grads(model)
    lorakern.patch_peft(model)  # strict: every LoRA layer, embeddings included, is fused
    summary = lorakern.patch_summary(model)
    assert not summary.left_to_peft
    assert {n.rsplit(".", 1)[-1] for n in summary.fused} == set(TARGETS)
    launches = kernels.launch_counts["lora_embedding_forward"]
    actual = loss_and_grads(model)
    assert kernels.launch_counts["lora_embedding_forward"] == launches + 2  # wte and wpe
    assert_same_training_signal(actual, expected)


def _peft_to_lorakern_names(grads):
    """PEFT's parameter names as inject_lora's: prefix, adapter and module names."""
    renamed = {}
    for name, grad in grads.items():
        name = name.replace("base_model.model.", "").replace("lora_embedding_", "lora_")
        renamed[name.replace(".weight", "") if ".lora_" in name else name] = grad
    return renamed


def test_inject_lora_with_the_tutorial_config_matches_peft():
    reference = randomize(get_peft_model(base_model(), tutorial_config())).eval()
    logits_ref, loss_ref, grads_ref = loss_and_grads(reference)
    model = lorakern.inject_lora(base_model(), tutorial_config()).eval()
    assert isinstance(model.transformer.wte, lorakern.LoRAEmbedding)
    assert isinstance(model.transformer.wpe, lorakern.LoRAEmbedding)
    peft_state = {k.replace("base_model.model.", "").replace(".default", ""): v
                  for k, v in reference.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                key = name.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight")
                if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), lorakern.LoRAEmbedding):
                    key = name.replace(".lora_A", ".lora_embedding_A").replace(".lora_B",
                                                                              ".lora_embedding_B")
                p.copy_(peft_state[key])
    assert_same_training_signal(loss_and_grads(model),
                                (logits_ref, loss_ref, _peft_to_lorakern_names(grads_ref)))


def test_adapters_with_embeddings_round_trip_both_ways_with_peft(tmp_path):
    # lorakern -> PEFT
    model = randomize(lorakern.inject_lora(base_model(), tutorial_config())).eval()
    lorakern.save_adapter(model, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "ours").eval()
    ids = token_ids()
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits, "PEFT loading lorakern's adapter")
    # PEFT -> lorakern
    theirs = randomize(get_peft_model(base_model(), tutorial_config()), seed=1).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lorakern.load_adapter(base_model(), tmp_path / "theirs").eval()
    assert isinstance(ours.transformer.wte, lorakern.LoRAEmbedding)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, "lorakern loading PEFT's adapter")


def test_a_training_step_with_dropout_runs_fused_and_the_model_pickles():
    model = lorakern.patch_peft(get_peft_model(base_model(), tutorial_config(dropout=0.1)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids()
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    embedding_B = model.base_model.model.transformer.wte.lora_embedding_B["default"]
    assert embedding_B.grad is not None and embedding_B.grad.abs().sum() > 0
    clone = pickle.loads(pickle.dumps(model))
    assert lorakern.patch_summary(clone).fused == lorakern.patch_summary(model).fused


def test_merge_lora_and_lora_report_include_embeddings():
    model = randomize(lorakern.inject_lora(base_model(), tutorial_config())).eval()
    report = lorakern.format_lora_report(model)
    assert "transformer.wte.lora_A" in report and "transformer.wpe.lora_B" in report
    total, trainable = lorakern.count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        lorakern.merge_lora(model)
        assert model.transformer.wte.merged and model.transformer.wpe.merged
        assert_close(model(ids).logits, before, "merged logits")


def test_merging_an_embedding_tied_to_the_output_layer_is_refused():
    """GPTBigCode ties wte to lm_head: merging wte's adapter would change lm_head too."""
    model = randomize(lorakern.inject_lora(base_model(tied=True), tutorial_config())).eval()
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'transformer.wte' is tied to \['lm_head.weight'\]"):
        lorakern.merge_lora(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, lorakern.LoRAEmbedding))
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())
