"""A patched PEFT model goes through what PEFT users do with several adapters, step by
step beside the same model unpatched: adding, switching, stacking, deleting,
disabling, merging and unmerging adapters, mixed-adapter batches, and training
steps with an optimizer. After every step both give the same outputs (and, where
the step trains, the same gradients and parameters). Both sides compute in float32
and differ in their accumulation order only, and the training steps carry those
differences into the parameters, so each tensor is held to the float32 tolerance
of tests/oracle.py: 1e-5 of its largest value.
"""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402

import lorakern  # noqa: E402
from conftest import DEVICE  # noqa: E402
from oracle import TOLERANCE  # noqa: E402

IN, HIDDEN, VOCAB = 20, 28, 13
FP32_TOLERANCE = TOLERANCE[torch.float32]


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, IN)
        self.up = nn.Linear(IN, HIDDEN)
        self.down = nn.Linear(HIDDEN, IN, bias=False)

    def forward(self, ids):
        return self.down(torch.nn.functional.gelu(self.up(self.emb(ids))))


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and p.abs().max() == 0:  # B starts at zero: nonzero B
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def _close(actual, expected, what):
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0.0, atol=FP32_TOLERANCE,
                               msg=lambda m: f"{what}: {m}")


class Twins:
    """The patched model and its unpatched copy, driven by the same calls."""

    def __init__(self, model):
        self.peft = model
        self.ours = lorakern.patch_peft(copy.deepcopy(model), strict=False)

    def both(self, step):
        step(self.ours)
        step(self.peft)

    def add(self, name, seed, **config):
        config = {"r": 4, "lora_alpha": 8, "target_modules": ["emb", "up", "down"], **config}
        for model in (self.peft, self.ours):
            torch.manual_seed(seed)  # the same initial A in both
            model.add_adapter(name, LoraConfig(**config))
            _randomize(model, seed)
        lorakern.patch_peft(self.ours, strict=False)  # the new adapter's modules too

    def compare(self, what, ids, **kwargs):
        with torch.no_grad():
            _close(self.ours(ids, **kwargs), self.peft(ids, **kwargs), what)

    def compare_training(self, what, ids, steps=1, lr=1e-3):
        for model in (self.peft, self.ours):
            model.train()
        optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
                      for m in (self.ours, self.peft)]
        probe = torch.randn(ids.shape + (IN,), generator=torch.Generator().manual_seed(9))
        for step in range(steps):
            outs = []
            for model, opt in zip((self.ours, self.peft), optimizers):
                opt.zero_grad(set_to_none=True)
                y = model(ids)
                (y * probe.to(y)).sum().backward()
                outs.append(y.detach())
            _close(outs[0], outs[1], f"{what}: output of step {step}")
            grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None}
                     for m in (self.ours, self.peft)]
            assert sorted(grads[0]) == sorted(grads[1]), f"{what}: different gradients"
            for name in grads[1]:
                _close(grads[0][name], grads[1][name], f"{what}: {name} at step {step}")
            for opt in optimizers:
                opt.step()
        for model in (self.peft, self.ours):
            model.eval()


def test_adapter_switching_stacking_merging_and_mixed_batches_match_unpatched_peft():
    torch.manual_seed(0)
    base = TwoLayer()
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6,
                                            target_modules=["emb", "up", "down"]))
    _randomize(model, 1)
    twins = Twins(model.to(DEVICE).eval())
    ids = torch.randint(VOCAB, (4, 5), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    twins.compare("one adapter", ids)

    # a second adapter (another rank, rsLoRA), then a third only on "up"
    twins.add("second", 3, r=5, lora_alpha=7, use_rslora=True)
    twins.add("third", 4, r=2, lora_alpha=2, target_modules=["up"])
    twins.both(lambda m: m.set_adapter("second"))
    twins.compare("switched to 'second'", ids)

    # several active: stacked where fused, trained for two SGD steps (the stack
    # follows the updated parameters), then evaluated under no_grad (its cache)
    twins.both(lambda m: m.base_model.set_adapter(["default", "second", "third"]))
    twins.compare("three active", ids)
    twins.compare_training("three active, trained", ids, steps=2)
    twins.compare("three active after training", ids)
    twins.compare("three active, again (cached stack)", ids)

    # mixed batches, eval: every adapter, the base, and one "down" lacks
    names = ["third", "__base__", "default", "second"]
    twins.compare("mixed batch", ids, adapter_names=names)

    # disabled, then merged (several) and unmerged
    with twins.ours.disable_adapter(), twins.peft.disable_adapter():
        twins.compare("adapters disabled", ids)
    twins.both(lambda m: m.base_model.set_adapter(["default", "second"]))
    twins.both(lambda m: m.merge_adapter())
    twins.compare("two merged", ids)
    twins.both(lambda m: m.unmerge_adapter())
    twins.compare("unmerged, two active", ids)

    # an adapter deleted while active elsewhere; back to one, trained
    # (PeftModel.set_adapter first: its own active_adapter must not name the deleted one)
    twins.both(lambda m: (m.set_adapter("default"), m.base_model.set_adapter(["default", "third"])))
    twins.both(lambda m: m.delete_adapter("second"))
    twins.compare("'second' deleted", ids)
    twins.both(lambda m: m.set_adapter("default"))
    twins.compare_training("one adapter, trained", ids)

    summary = lorakern.patch_summary(twins.ours)
    assert len(summary.fused) == 3 and not summary.left_to_peft
    # only the embedding's mixed batch ran PEFT's forward
    assert summary.fell_back == {"base_model.model.emb": {
        "mixed-adapter batches (adapter_names) on embeddings are not fused": 1}}

    # last: a mixed batch on a merged model raises PEFT's own error on both. (PEFT
    # removes its adapter_names hooks only when the forward returns, so after this
    # error they stay on the modules: a PEFT behaviour, the same on both.)
    twins.both(lambda m: m.merge_adapter())
    errors = []
    for model in (twins.ours, twins.peft):
        with pytest.raises(ValueError) as caught, torch.no_grad():
            model(ids, adapter_names=["third", "__base__", "default", "default"])
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "merged adapters" in errors[0]
