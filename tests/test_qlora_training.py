"""A tiny QLoRA model patched onto the fused path trains as PEFT's does.

A one-layer Llama is saved, loaded back NF4 double-quant by bitsandbytes on the CPU and
prepared as PEFT prepares QLoRA (``prepare_model_for_kbit_training``, fp32 adapters,
"all-linear"). With gradient checkpointing on (recomputation runs the patched layers
a second time inside the backward) and through two steps of the HF ``Trainer``, the
patched model's losses and adapter gradients must agree with unpatched PEFT's to bf16
rounding (the oracle's bf16 tolerance over the largest value).
"""
import pytest
import torch

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lorakern  # noqa: E402

from tiny_llama import (NF4_DOUBLE_QUANT, TINY, assert_close_to_bf16,  # noqa: E402
                        assert_lora_grads_match)


def qlora_model(path, checkpointing, patched):
    config = transformers.BitsAndBytesConfig(**NF4_DOUBLE_QUANT)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    torch.manual_seed(3)  # lora_A's initialisation: the same adapters in both models
    model = peft.get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the LoRA term would vanish
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    if patched:
        lorakern.patch_peft(model)
        assert len(lorakern.patched_modules(model)) == 7  # q k v o gate up down
    return model.train()


def input_ids(batch=2, length=7, seed=2):
    return torch.randint(0, TINY["vocab_size"], (batch, length),
                         generator=torch.Generator().manual_seed(seed))


def loss_and_lora_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return loss.detach(), grads


def test_gradient_checkpointing_gives_peft_loss_and_adapter_gradients(tiny_checkpoint):
    ids = input_ids()
    loss, grads = loss_and_lora_grads(qlora_model(tiny_checkpoint, True, False), ids)
    model = qlora_model(tiny_checkpoint, True, True)
    assert model.base_model.model.is_gradient_checkpointing
    patched_loss, patched_grads = loss_and_lora_grads(model, ids)
    assert_close_to_bf16(patched_loss, loss, "loss")
    assert_lora_grads_match(patched_grads, grads)


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossLog(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def train_two_steps(path, patched, out_dir):
    model = qlora_model(path, True, patched)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=2, per_device_train_batch_size=2,
        # SGD: an update proportional to the gradient (Adam's sign-like first steps would
        # turn bf16 rounding of near-zero gradients into whole learning-rate steps)
        optim="sgd", learning_rate=1e-1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, gradient_checkpointing=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    log = LossLog()
    trainer = transformers.Trainer(model=model, args=args, callbacks=[log],
                                   train_dataset=TokenRows(input_ids(batch=4, length=7)))
    trainer.train()
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return log.losses, adapters


def test_two_trainer_steps_match_peft(tiny_checkpoint, tmp_path):
    losses, adapters = train_two_steps(tiny_checkpoint, False, tmp_path / "peft")
    patched_losses, patched_adapters = train_two_steps(tiny_checkpoint, True, tmp_path / "fused")
    assert len(losses) == len(patched_losses) == 2
    assert_close_to_bf16(patched_losses, losses, "losses")
    assert adapters and set(adapters) == set(patched_adapters)
    for name, weight in adapters.items():
        assert_close_to_bf16(patched_adapters[name], weight, name)
