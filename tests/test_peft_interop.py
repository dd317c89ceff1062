"""lorakern against the real PEFT package, on tiny transformers models built from configs.

Two architectures: a 2-layer Llama (nn.Linear everywhere) and a 2-layer GPT-2
(transformers Conv1D, i.e. ``fan_in_fan_out=True``, with biases). Every adapter
gets random A and B, so the LoRA term contributes to every output compared.
Models live on the suite's device (see conftest): CPU tensors run the kernels
in Triton's interpreter, so the models are tiny.

Tolerance: both sides compute in float32 and differ only in the order of their
accumulations, so they agree to a few float32 ulps of each tensor's largest
value (observed: below 4e-7 of it on logits, 1.5e-6 on gradients). Each
comparison is ``assert_close(rtol=1e-5, atol=1e-6)`` on the two tensors divided
by the expected tensor's largest magnitude: gradients have no natural scale (it
follows the loss's; across these models it spans 1e-3 to 10), and a fixed atol
would demand less than one ulp of agreement on large tensors and almost nothing
on small ones.
"""
import json
import logging
import os
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
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)

import lorakern  # noqa: E402
from conftest import DEVICE  # noqa: E402
from lorakern import kernels  # noqa: E402
from lorakern.models import inject_lora  # noqa: E402
from lorakern.layers import LoRALinear  # noqa: E402
from lorakern.peft import (load_adapter, patch_peft, patched_modules,  # noqa: E402
                                   save_adapter, unpatch_peft)

RTOL, ATOL = 1e-5, 1e-6
VOCAB = 97
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
FEW_TARGETS = ["model.layers.1.self_attn.q_proj", "v_proj"]  # 3 modules: quicker tests


def _llama():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _gpt2():
    # no dropout in the base model: train mode changes only the LoRA dropout
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


ARCHS = {
    "llama": (_llama, LLAMA_TARGETS, False, 14),  # builder, targets, fan_in_fan_out, modules
    "gpt2": (_gpt2, GPT2_TARGETS, True, 8),
}


def base_model(arch, seed=0):
    torch.manual_seed(seed)
    return ARCHS[arch][0]().to(DEVICE).eval()


def peft_model(arch, seed=0, **lora_kwargs):
    """A PEFT LoRA model on a fresh base, every lora_A/lora_B random, in eval mode
    (get_peft_model leaves it in train mode)."""
    _, targets, fan_in_fan_out, _ = ARCHS[arch]
    lora_kwargs = {"r": 4, "lora_alpha": 8, "target_modules": targets,
                   "fan_in_fan_out": fan_in_fan_out, **lora_kwargs}
    model = get_peft_model(base_model(arch, seed), LoraConfig(**lora_kwargs))
    randomize_adapters(model, seed)
    return model.eval()


def randomize_adapters(model, seed=0):
    """lora_A ~ N(0, 1/in), lora_B ~ N(0, 0.01/r): the LoRA term is about as large as x W^T."""
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:  # lora_B's bias (lora_bias=True)
                continue
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def token_ids(seed=0, batch=2, seq=6):
    ids = torch.randint(VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return ids.to(DEVICE)


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits


def logits_and_lora_grads(model):
    """Logits, and the gradient of a fixed random projection of them for every LoRA parameter."""
    model.zero_grad(set_to_none=True)
    out = model(token_ids()).logits
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    probe /= probe.norm()
    (out * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return out.detach(), grads


def assert_close(actual, expected, what):
    """rtol=1e-5, atol=1e-6, both relative to max|expected| (see the module docstring)."""
    scale = expected.abs().max().clamp_min(1e-30)
    assert scale > 1e-6, f"{what}: expected values vanish (max {scale:.2e}); nothing is tested"
    torch.testing.assert_close(actual / scale, expected / scale, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{what} (divided by max|expected| {scale:.3e}): {m}")


def fused_forward_launches():
    return kernels.launch_counts["lora_forward"]


def lorakern_model(arch, seed=0, targets=None, **inject_kwargs):
    """A lorakern-injected model on a fresh base, every lora_A/lora_B random, eval mode."""
    _, default_targets, _, _ = ARCHS[arch]
    inject_kwargs = {"r": 4, "alpha": 8, **inject_kwargs}
    model = inject_lora(base_model(arch, seed), targets or default_targets, **inject_kwargs)
    randomize_adapters(model, seed)
    return model.eval()


def lorakern_lora_grads_as_peft_names(grads):
    """{'x.lora_A': g} of a lorakern model keyed as PEFT's
    'base_model.model.x.lora_A.default.weight'."""
    return {f"base_model.model.{name}.default.weight": g for name, g in grads.items()}


def read_config(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f)


def read_weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_importing_lorakern_imports_no_optional_package():
    code = ("import sys, lorakern, lorakern.peft.patch, lorakern.peft.save, lorakern.peft.load, "
            "lorakern.peft.bnb, lorakern.layers.quantized_linear; "
            "print(sorted({'peft', 'transformers', 'safetensors', 'bitsandbytes'} "
            "& set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------
# save_adapter: lorakern -> PEFT
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_adapter_loads_in_peft_with_the_same_logits(arch, tmp_path):
    _, targets, fan_in_fan_out, count = ARCHS[arch]
    model = lorakern_model(arch)
    save_adapter(model, tmp_path / "lk")

    config = read_config(tmp_path / "lk")
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert sorted(config["target_modules"]) == sorted(targets)
    assert config["fan_in_fan_out"] is fan_in_fan_out and config["use_rslora"] is False
    assert config["modules_to_save"] is None and config["task_type"] is None

    loaded = PeftModel.from_pretrained(base_model(arch), tmp_path / "lk").eval()
    assert_close(logits(loaded), logits(model), "PEFT-loaded logits vs lorakern's")

    # PEFT saves back exactly the keys and tensors we wrote
    loaded.save_pretrained(tmp_path / "peft")
    ours, theirs = read_weights(tmp_path / "lk"), read_weights(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * count
    for key in ours:
        assert key.startswith("base_model.model.") and key.endswith((".lora_A.weight",
                                                                    ".lora_B.weight"))
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_save_adapter_subset_of_layers_and_per_layer_ranks_via_patterns(tmp_path):
    """Only layer 1's attention at r=4, alpha=8 and layer 0's MLP at r=2, alpha=5:
    no suffix list selects exactly these, and two (r, alpha) need PEFT's patterns."""
    model = base_model("llama")
    inject_lora(model, r"model\.layers\.1\.self_attn\.(q|v)_proj", r=4, alpha=8)
    inject_lora(model, r"model\.layers\.0\.mlp\.(up|down)_proj", r=2, alpha=5)
    randomize_adapters(model)
    model.eval()
    save_adapter(model, tmp_path)

    config = read_config(tmp_path)
    assert isinstance(config["target_modules"], str)
    assert len(config["rank_pattern"]) == 2 and len(config["alpha_pattern"]) == 2
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path).eval()
    ranks = {name: m.r["default"] for name, m in loaded.named_modules()
             if isinstance(m, peft.tuners.lora.layer.Linear)}
    assert ranks == {"base_model.model.model.layers.1.self_attn.q_proj": 4,
                     "base_model.model.model.layers.1.self_attn.v_proj": 4,
                     "base_model.model.model.layers.0.mlp.up_proj": 2,
                     "base_model.model.model.layers.0.mlp.down_proj": 2}
    assert_close(logits(loaded), logits(model), "PEFT-loaded logits, mixed ranks")


def test_save_adapter_modules_to_save_round_trip_through_peft(tmp_path):
    model = lorakern_model("llama", targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():  # "train" the head
        model.lm_head.weight.add_(0.05 * torch.randn(model.lm_head.weight.shape, device=DEVICE))
    save_adapter(model, tmp_path, task_type="CAUSAL_LM")

    config = read_config(tmp_path)
    assert config["modules_to_save"] == ["lm_head"] and config["task_type"] == "CAUSAL_LM"
    assert "base_model.model.lm_head.weight" in read_weights(tmp_path)
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path).eval()
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    assert_close(logits(loaded), logits(model), "PEFT-loaded logits with a saved lm_head")


def test_save_adapter_refuses_what_one_peft_config_cannot_hold(tmp_path):
    model = base_model("llama")
    inject_lora(model, ["q_proj"], use_rslora=True)
    inject_lora(model, ["v_proj"], use_rslora=False)
    with pytest.raises(ValueError, match=r"use_rslora.*q_proj"):
        save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(base_model("llama"), tmp_path)
    assert not os.path.exists(tmp_path / "adapter_config.json")


# ------------------------------------------------------------------------------------------------
# load_adapter: PEFT -> lorakern
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_adapter_gives_peft_logits_and_lora_gradients(arch, tmp_path):
    _, _, fan_in_fan_out, count = ARCHS[arch]
    reference = peft_model(arch, lora_dropout=0.1)
    reference.save_pretrained(tmp_path)
    model = load_adapter(base_model(arch), tmp_path)

    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == count
    assert all((m.r, m.alpha, m.scale, m.dropout, m.fan_in_fan_out, m.use_rslora)
               == (4, 8, 2.0, 0.1, fan_in_fan_out, False) for m in layers)
    assert all(m.lora_A.requires_grad and not m.weight.requires_grad for m in layers)

    reference.eval()
    model.eval()  # dropout off on both sides
    expected_logits, expected_grads = logits_and_lora_grads(reference)
    got_logits, got_grads = logits_and_lora_grads(model)
    assert_close(got_logits, expected_logits, "load_adapter logits vs PEFT's")
    got_grads = lorakern_lora_grads_as_peft_names(got_grads)
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        assert_close(got_grads[name], expected_grads[name], name)


def test_load_adapter_rank_and_alpha_patterns_and_modules_to_save(tmp_path):
    reference = peft_model("llama", target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3},
                           modules_to_save=["lm_head"])
    with torch.no_grad():
        head = reference.base_model.model.lm_head.modules_to_save["default"]
        head.weight.add_(0.05 * torch.randn(head.weight.shape, device=DEVICE))
    reference.save_pretrained(tmp_path)
    model = load_adapter(base_model("llama"), tmp_path).eval()

    q = model.model.layers[0].self_attn.q_proj
    v = model.model.layers[0].self_attn.v_proj
    down = model.model.layers[1].mlp.down_proj
    assert (q.r, q.alpha, v.r, v.alpha, down.r, down.alpha) == (4, 3, 4, 8, 2, 8)
    assert model.lm_head.weight.requires_grad
    assert_close(logits(model), logits(reference), "load_adapter logits with patterns")


def test_rslora_round_trip_both_ways(tmp_path):
    reference = peft_model("llama", use_rslora=True, lora_dropout=0.05)
    reference.save_pretrained(tmp_path / "peft")
    model = load_adapter(base_model("llama"), tmp_path / "peft").eval()
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(m.use_rslora and m.scale == 8 / 2 for m in layers)  # alpha / sqrt(r)
    expected = logits(reference)
    assert_close(logits(model), expected, "rsLoRA: load_adapter logits vs PEFT's")

    save_adapter(model, tmp_path / "lk")
    config = read_config(tmp_path / "lk")
    assert config["use_rslora"] is True and config["lora_dropout"] == 0.05
    again = PeftModel.from_pretrained(base_model("llama"), tmp_path / "lk").eval()
    assert_close(logits(again), expected, "rsLoRA: PEFT logits after save_adapter")


@pytest.mark.parametrize("case, match", [
    ("lora_bias", r"lora_bias=True"),
    ("bias_all", r"bias='all'"),
    ("ia3", r"peft_type='IA3'"),
    ("pissa", r"init_lora_weights='pissa'"),
])
def test_load_adapter_refuses_what_loralinear_cannot_reproduce(case, match, tmp_path):
    if case == "ia3":
        config = peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                feedforward_modules=["down_proj"])
        get_peft_model(base_model("llama"), config).save_pretrained(tmp_path)
    else:
        kwargs = {"lora_bias": {"lora_bias": True},
                  "bias_all": {"bias": "all"}, "pissa": {"init_lora_weights": "pissa"}}[case]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lora_bias on a bias-free base warns
            peft_model("llama", **kwargs).save_pretrained(tmp_path)
    model = base_model("llama")
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()), "model changed"


# ------------------------------------------------------------------------------------------------
# patch_peft
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patched_peft_matches_peft_logits_and_every_lora_gradient(arch):
    model = peft_model(arch).train()  # lora_dropout 0: nn.Identity, train mode changes nothing
    expected_logits, expected_grads = logits_and_lora_grads(model)
    assert len(expected_grads) == 2 * ARCHS[arch][3]

    assert patch_peft(model) is model
    assert len(patched_modules(model)) == ARCHS[arch][3]
    launches = fused_forward_launches()
    got_logits, got_grads = logits_and_lora_grads(model)
    # every LoRA module ran the fused kernel, once
    assert fused_forward_launches() - launches == ARCHS[arch][3]

    assert_close(got_logits, expected_logits, "logits")
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        assert_close(got_grads[name], expected_grads[name], name)

    assert unpatch_peft(model) == ARCHS[arch][3]
    assert patched_modules(model) == []
    launches = fused_forward_launches()
    assert_close(logits(model), expected_logits, "logits after unpatch_peft")
    assert fused_forward_launches() == launches


def test_patched_peft_dropout_only_in_training_with_peft_probability():
    model = peft_model("llama", lora_dropout=0.25, target_modules=FEW_TARGETS)
    expected_eval = logits(model)
    patch_peft(model)

    model.eval()
    assert_close(logits(model), expected_eval, "eval logits with lora_dropout=0.25")
    model.train()
    train = logits(model)
    assert (train - expected_eval).abs().max() > 1e-3, "dropout changed nothing in train mode"

    # one module, against lora_linear with the same seed: p and the scaling are PEFT's
    name = "base_model.model.model.layers.1.self_attn.q_proj"
    module = model.get_submodule(name)
    x = torch.randn(3, 5, 32, device=DEVICE)
    args = (x, module.base_layer.weight, module.lora_A["default"].weight,
            module.lora_B["default"].weight)
    for training, p in ((True, 0.25), (False, 0.0)):
        module.train(training)
        with torch.no_grad():
            torch.manual_seed(11)
            got = module(x)
            torch.manual_seed(11)
            expected = lorakern.lora_linear(*args, scale=2.0, dropout_p=p)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    module.train()
    with torch.no_grad():
        torch.manual_seed(11)
        first = module(x)
        second = module(x)
    assert not torch.equal(first, second), "two training calls drew one dropout mask"


def test_patched_peft_follows_disable_merge_and_adapter_switches():
    model = peft_model("llama", target_modules=FEW_TARGETS)
    base_logits = logits(base_model("llama"))
    adapted = logits(model)
    patch_peft(model)

    with model.disable_adapter():  # PEFT's forward runs: the base layer alone
        assert_close(logits(model), base_logits, "logits with adapters disabled")
    assert_close(logits(model), adapted, "logits after re-enabling")

    model.merge_adapter()
    launches = fused_forward_launches()
    assert_close(logits(model), adapted, "logits with the adapter merged")
    assert fused_forward_launches() == launches, "a merged layer ran the LoRA kernel"
    model.unmerge_adapter()
    assert_close(logits(model), adapted, "logits after unmerge")

    # a second adapter, then activating it: the patched forward follows the switch
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=FEW_TARGETS))
    randomize_adapters(model, seed=5)
    model.set_adapter("other")
    switched = logits(model)
    assert unpatch_peft(model) == 3
    assert_close(switched, logits(model), "patched logits after set_adapter('other')")
    assert (switched - adapted).abs().max() > 1e-3, "the switch changed nothing"
    patch_peft(model)

    # both active after patching: one stacked term, PEFT's numbers
    model.base_model.set_adapter(["default", "other"])
    stacked = logits(model)
    unpatch_peft(model)
    assert_close(stacked, logits(model), "patched logits with both adapters active")


@pytest.mark.parametrize("case, match", [
    ("lora_bias", r"model\.layers\.0\.self_attn\.q_proj.*lora_bias"),
    ("hooked_embedding", r"model\.embed_tokens.*forward hooks"),
    ("merged", r"model\.layers\.0\.self_attn\.q_proj.*merged"),
])
def test_patch_peft_refuses_what_it_cannot_fuse_naming_the_module(case, match):
    if case == "lora_bias":
        model = peft_model("llama", lora_bias=True)
    elif case == "hooked_embedding":
        model = _peft_with_hooked_embedding(["embed_tokens", "q_proj"])
    else:
        model = peft_model("llama")
        model.merge_adapter()
    with pytest.raises(ValueError, match=match):
        patch_peft(model)
    assert patched_modules(model) == [], "a refused patch_peft patched some modules"


def test_patch_peft_refuses_disabled_adapters():
    model = peft_model("llama")
    with model.disable_adapter():
        with pytest.raises(ValueError, match=r"q_proj.*disabled"):
            patch_peft(model)


def _peft_with_hooked_embedding(targets):
    """A PEFT model whose LoRA embedding cannot run fused: a forward hook on its base
    layer (as accelerate's offloading adds) would be bypassed by the fused call."""
    model = peft_model("llama", target_modules=targets)
    model.base_model.model.model.embed_tokens.base_layer.register_forward_hook(
        lambda module, args, out: None)
    return model


def test_patch_peft_not_strict_patches_the_rest_and_says_which_it_left():
    model = _peft_with_hooked_embedding(["embed_tokens", "q_proj", "v_proj"])
    expected = logits(model)
    with pytest.warns(RuntimeWarning, match=r"embed_tokens"):
        patch_peft(model, strict=False)
    assert len(patched_modules(model)) == 4
    assert_close(logits(model), expected, "logits, hooked embedding LoRA left on PEFT")


def test_patch_peft_refuses_a_model_without_lora_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        patch_peft(base_model("llama"))


def test_patched_peft_bf16_base_fp32_adapters_as_accurate_as_peft():
    """PEFT's default mixed setup: bf16 base, fp32 adapters (x cast to fp32 for the LoRA term).

    PEFT rounds x W^T to bf16, adds the fp32 LoRA term and rounds again. Against
    a float64 oracle the fused layer must do as well: mean error within 1.25x of
    PEFT's, largest error within 2x (the style guide's "twice PyTorch's own").
    """
    torch.manual_seed(3)
    base = nn.ModuleDict({"proj": nn.Linear(48, 40)}).to(DEVICE, torch.bfloat16)
    wrapper = get_peft_model(base, LoraConfig(r=5, lora_alpha=7, target_modules=["proj"]))
    module = wrapper.base_model.model.proj
    randomize_adapters(module)
    assert module.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    x = torch.randn(4, 9, 48).to(DEVICE, torch.bfloat16)

    with torch.no_grad():
        peft_out = module(x)
        patch_peft(wrapper)
        fused_out = module(x)
    assert fused_out.dtype == peft_out.dtype == torch.bfloat16
    with torch.no_grad():
        x64 = x.double()
        a, b = (module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double())
        w, bias = module.base_layer.weight.double(), module.base_layer.bias.double()
        oracle = x64 @ w.T + bias + 7 / 5 * (x64 @ a.T) @ b.T
    peft_err = (peft_out.double() - oracle).abs()
    fused_err = (fused_out.double() - oracle).abs()
    assert fused_err.mean() <= 1.25 * peft_err.mean(), (
        f"mean error: fused {fused_err.mean():.3e}, PEFT {peft_err.mean():.3e}")
    assert fused_err.max() <= 2 * peft_err.max(), (
        f"max error: fused {fused_err.max():.3e}, PEFT {peft_err.max():.3e}")


def test_a_patched_peft_model_pickles_and_loads_still_fused(tmp_path):
    model = peft_model("llama", target_modules=FEW_TARGETS)
    patch_peft(model)
    expected = logits(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)

    assert patched_modules(loaded) == patched_modules(model) != []
    launches = fused_forward_launches()
    assert_close(logits(loaded), expected, "logits of the loaded patched model")
    assert fused_forward_launches() - launches == len(patched_modules(model))
    # each loaded module's forward is bound to that module, not to the saved model's
    with torch.no_grad():
        for name, p in loaded.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert_close(logits(loaded), logits(base_model("llama")), "loaded, lora_B zeroed")
    assert_close(logits(model), expected, "the saved model, unchanged")


def test_patch_peft_logs_and_summarises_what_it_fused_and_what_it_left_to_peft(caplog):
    model = _peft_with_hooked_embedding(["embed_tokens", "q_proj", "v_proj"])
    with caplog.at_level(logging.INFO, logger="lorakern"), pytest.warns(RuntimeWarning):
        assert patch_peft(model, strict=False) is model
    summary = lorakern.patch_summary(model)
    assert summary.fused == patched_modules(model)
    assert len(summary.fused) == 4
    assert list(summary.left_to_peft) == ["base_model.model.model.embed_tokens"]
    assert "forward hooks" in summary.left_to_peft["base_model.model.model.embed_tokens"]
    records = [r for r in caplog.records if r.name == "lorakern" and "patch_peft" in r.message]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].getMessage() == f"lorakern: patch_peft: {summary}"
    assert str(summary).startswith("4 PEFT LoRA module(s) on the fused kernels, 1 left on "
                                   "PEFT's forward: 'base_model.model.model.embed_tokens' (")
    # the summary follows the model, not the last patch_peft call
    unpatch_peft(model)
    after = lorakern.patch_summary(model)
    assert after.fused == [] and len(after.left_to_peft) == 5
    assert "not patched" in after.left_to_peft["base_model.model.model.layers.0.self_attn.q_proj"]


def test_patch_peft_strict_refusal_points_to_strict_false():
    model = _peft_with_hooked_embedding(["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match=r"embed_tokens.*patch_peft\(model, strict=False\)"):
        patch_peft(model)


def test_load_adapter_reads_peft_embedding_adapters_and_their_saved_base_table(tmp_path):
    """PEFT saves an adapted embed_tokens' base table too (base_layer.weight): it lands in
    the model's own embedding, and the LoRA embedding computes what PEFT's does."""
    theirs = peft_model("llama", target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base_model("llama"), tmp_path)
    assert isinstance(ours.model.embed_tokens, lorakern.LoRAEmbedding)
    assert_close(logits(ours.eval()), logits(theirs), "logits with PEFT's embedding adapter")
