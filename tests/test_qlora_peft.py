"""PEFT QLoRA models patched onto the fused path: parity with PEFT, and refusals by name.

A one-layer Llama from a tiny transformers config is saved, loaded back quantised
by bitsandbytes on the CPU (``BitsAndBytesConfig``, as users load a model), and
wrapped as PEFT builds QLoRA (``prepare_model_for_kbit_training``, fp32 adapters,
"all-linear"). The patched model's logits and every LoRA gradient must agree
with PEFT's to bf16 rounding (the oracle's bf16 tolerance over the largest value).
"""
import pytest
import torch

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lorakern  # noqa: E402

from tiny_llama import (NF4_DOUBLE_QUANT, TINY, assert_close_to_bf16,  # noqa: E402
                        assert_lora_grads_match)


def qlora_model(path, **quantization):
    config = transformers.BitsAndBytesConfig(**quantization)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the LoRA term would vanish
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.train()


def logits_and_lora_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return logits.detach(), grads


# 4-bit: to bf16 rounding; 8-bit: LLM.int8() rounds the activations to 8 bits where
# the fused path does not, a rounding of the same order (on this CPU backend
# bitsandbytes 0.50.2 agrees far closer, about 1e-7 relative)
@pytest.mark.parametrize("quantization", [NF4_DOUBLE_QUANT, dict(load_in_8bit=True)],
                         ids=["nf4-double-quant", "int8"])
def test_qlora_model_patched_matches_peft(tiny_checkpoint, quantization):
    model = qlora_model(tiny_checkpoint, **quantization)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(2))
    logits, grads = logits_and_lora_grads(model, ids)
    assert lorakern.count_parameters(model)[::-1] == model.get_nb_trainable_parameters()
    lorakern.patch_peft(model)
    assert len(lorakern.patched_modules(model)) == 7  # q k v o gate up down
    patched_logits, patched_grads = logits_and_lora_grads(model, ids)
    assert_close_to_bf16(patched_logits, logits, "logits")
    assert_lora_grads_match(patched_grads, grads)


def test_a_qlora_layer_with_a_broken_base_is_refused_by_name(tiny_checkpoint):
    model = qlora_model(tiny_checkpoint, load_in_4bit=True, bnb_4bit_quant_type="fp4",
                        bnb_4bit_compute_dtype=torch.bfloat16)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.get_base_layer().weight.quant_state = None
    with pytest.raises(ValueError, match="self_attn.q_proj': .*no quant state"):
        lorakern.patch_peft(model)
    assert not lorakern.patched_modules(model)  # nothing was patched


def quantised_base(path):
    config = transformers.BitsAndBytesConfig(**NF4_DOUBLE_QUANT)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.bfloat16)
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def test_inject_lora_all_linear_on_a_4bit_model_matches_peft(tiny_checkpoint, tmp_path):
    from lorakern.layers.quantized_linear import QuantizedLoRALinear

    peft_model = qlora_model(tiny_checkpoint, **NF4_DOUBLE_QUANT)
    model = quantised_base(tiny_checkpoint)
    lorakern.inject_lora(model, "all-linear", r=4, alpha=8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLoRALinear)}
    assert len(layers) == 7
    peft_layers = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            assert layer.lora_A.dtype == torch.float32 and layer.lora_A.requires_grad
            layer.lora_A.copy_(peft_layers[name].lora_A["default"].weight)
            layer.lora_B.copy_(peft_layers[name].lora_B["default"].weight)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(3))
    logits, grads = logits_and_lora_grads(peft_model, ids)
    ours, our_grads = logits_and_lora_grads(model.train(), ids)
    assert_close_to_bf16(ours, logits, "logits")
    for name, layer in layers.items():
        assert_close_to_bf16(our_grads[f"{name}.lora_B"],
                             grads[f"base_model.model.{name}.lora_B.default.weight"], name)
    assert lorakern.count_parameters(model)[1] == peft_model.get_nb_trainable_parameters()[0]
    with pytest.raises(ValueError, match="quantised base.*nothing was changed"):
        lorakern.merge_lora(model)

    # the adapter files alone, as PEFT writes them: PEFT and load_adapter rebuild the model
    lorakern.save_adapter(model, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(quantised_base(tiny_checkpoint), tmp_path)
    ours_again = lorakern.load_adapter(quantised_base(tiny_checkpoint), tmp_path)
    with torch.no_grad():
        # bitsandbytes runs other CPU kernels in eval mode without grad: bf16 rounding apart
        assert_close_to_bf16(reloaded(input_ids=ids).logits, logits, "PEFT reloaded")
        assert torch.equal(ours_again.eval()(input_ids=ids).logits,
                           model.eval()(input_ids=ids).logits)
