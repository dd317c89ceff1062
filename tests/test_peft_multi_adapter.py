"""Several adapters on patched PEFT modules: stacked active adapters (fused, one term
of rank r_1 + r_2 + ...), and every call the fused path does not reproduce running
PEFT's own forward (mixed-adapter batches, states changed after patching), with
PEFT's own errors.

The oracle is the same PEFT model unpatched, in float64; the patched model runs in
float32 on the reference path or the kernels (Triton's interpreter on CPU) and is
held to the float32 tolerance of tests/oracle.py (1e-5 of the largest value).
"""
import copy
import logging

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402

import lorakern  # noqa: E402
from conftest import DEVICE  # noqa: E402
from lorakern.functional import multi_adapter  # noqa: E402
from oracle import assert_matches_oracle  # noqa: E402

IN, OUT, VOCAB = 24, 20, 17
# (name, r, alpha, rslora): ranks below 16, not powers of two, scales all different
ADAPTERS = [("default", 3, 5, False), ("second", 5, 7, True), ("third", 2, 2, False)]


class Tiny(nn.Module):
    """An embedding feeding a biased linear: both PEFT layer kinds in one model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, IN)
        self.proj = nn.Linear(IN, OUT)

    def forward(self, ids, x):
        return self.proj(x + self.emb(ids))


def _peft_tiny(adapters=ADAPTERS, seed=0):
    torch.manual_seed(seed)
    model = None
    for name, r, alpha, rslora in adapters:
        config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                            target_modules=["emb", "proj"])
        if model is None:
            model = get_peft_model(Tiny(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # nonzero B: every adapter contributes
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.to(DEVICE).eval()


def _inputs(seed=1, batch=3, seq=4):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (batch, seq), generator=gen).to(DEVICE)
    # strided 3-D input: every other feature of a wider tensor
    x = torch.randn(batch, seq, 2 * IN, generator=gen)[..., ::2].to(DEVICE)
    return ids, x


def _twins(active, **kwargs):
    """(patched float32 model, unpatched float64 copy), ``active`` adapters active."""
    model = _peft_tiny(**kwargs)
    model.base_model.set_adapter(active)
    oracle = copy.deepcopy(model).double()
    lorakern.patch_peft(model)
    return model, oracle


def _outputs_and_grads(model, ids, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = model(ids, x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    (y * probe).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _assert_matches_peft(model, oracle, ids, x):
    y, dx, grads = _outputs_and_grads(model, ids, x)
    y64, dx64, grads64 = _outputs_and_grads(oracle, ids, x.double())
    assert_matches_oracle(y, y64, torch.float32, "y")
    assert_matches_oracle(dx, dx64, torch.float32, "dx")
    assert sorted(grads) == sorted(grads64)
    for name in grads64:
        assert_matches_oracle(grads[name], grads64[name], torch.float32, name)
    return grads


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("active", [["default", "second"], ["third", "default", "second"]])
def test_stacked_adapters_match_peft_outputs_and_every_gradient(backend, active, caplog):
    model, oracle = _twins(active)
    ids, x = _inputs()
    launches = lorakern.kernels.launch_counts["lora_forward"]
    with caplog.at_level(logging.WARNING, logger="lorakern"):
        grads = _assert_matches_peft(model, oracle, ids, x)
    assert not caplog.records, "a stacked call fell back to PEFT's forward"
    if backend == "triton":
        assert lorakern.kernels.launch_counts["lora_forward"] == launches + 1
    for adapter in active:  # each adapter's gradients land in its own parameters
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            assert any(f"{part}.{adapter}" in n and g.abs().max() > 0 for n, g in grads.items())
    idle = {a for a, *_ in ADAPTERS} - set(active)
    assert not any(n.endswith(f".{a}.weight") or n.endswith(f".{a}") for n in grads for a in idle)
    assert lorakern.patch_summary(model).fell_back == {}


def test_equal_scales_stack_unscaled_and_the_stack_follows_parameter_updates():
    adapters = [("default", 3, 6, False), ("second", 4, 8, False)]  # both s = 2
    model, oracle = _twins(["default", "second"], adapters=adapters)
    proj = model.base_model.model.proj
    lora_A, lora_B, scale = multi_adapter.stack_adapters(
        [proj.lora_A[a].weight for a in ("default", "second")],
        [proj.lora_B[a].weight for a in ("default", "second")], [2.0, 2.0])
    assert scale == 2.0 and torch.equal(lora_B[:, 3:], proj.lora_B["second"].weight)
    ids, x = _inputs()
    builds = []
    real = multi_adapter.stack_adapters
    try:
        multi_adapter.stack_adapters = lambda *a: builds.append(1) or real(*a)
        with torch.no_grad():
            model(ids, x), model(ids, x)
            assert len(builds) == 2, "no-grad calls rebuilt the stacks (one per layer)"
            for m in (model, oracle):  # an optimizer step: in place, version bumped
                m.base_model.model.proj.lora_B["second"].weight.mul_(-3.0)
            y = model(ids, x)
        assert len(builds) == 3, "a parameter update did not rebuild the stack"
        model(ids, x).sum().backward()  # with grad: the same cached stacks, as views
        assert len(builds) == 3, "a call with grad rebuilt an unchanged stack"
    finally:
        multi_adapter.stack_adapters = real
    with torch.no_grad():
        assert_matches_oracle(y, oracle(ids, x.double()), torch.float32, "y after update")


def test_dropout_on_stacked_adapters_runs_peft_forward_with_its_masks(caplog):
    model = _peft_tiny()
    proj = model.base_model.model.proj
    proj.lora_dropout["default"] = nn.Dropout(0.3)
    proj.lora_dropout["second"] = nn.Dropout(0.5)
    model.base_model.set_adapter(["default", "second"])
    oracle = copy.deepcopy(model)
    lorakern.patch_peft(model)
    model.train(), oracle.train()
    ids, x = _inputs()
    with caplog.at_level(logging.WARNING, logger="lorakern"):
        torch.manual_seed(3)
        y = model(ids, x)
        model(ids, x)
    torch.manual_seed(3)
    # PEFT's own masks: the same draws from the same seed (the embedding stays fused)
    assert_matches_oracle(y, oracle(ids, x).detach().double(), torch.float32, "y")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "proj" in lines[0] and "one per adapter" in lines[0], lines
    assert list(lorakern.patch_summary(model).fell_back) == ["base_model.model.proj"]


def test_mixed_adapter_batch_matches_peft(backend, caplog):
    model = _peft_tiny()
    model.add_adapter("emb_only", LoraConfig(r=2, lora_alpha=3, target_modules=["emb"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "emb_only" in name:
                p.normal_()
    oracle = copy.deepcopy(model.eval()).double()
    lorakern.patch_peft(model)
    ids, x = _inputs(batch=6)
    # "emb_only" is not on proj: those rows get proj's base layer alone, as in PEFT
    names = ["second", "__base__", "default", "second", "emb_only", "third"]
    launches = lorakern.kernels.launch_counts["segmented_rank_product"]
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lorakern"):
        y = model(ids, x, adapter_names=names)
        model(ids, x, adapter_names=names)
        assert_matches_oracle(y, oracle(ids, x.double(), adapter_names=names), torch.float32,
                              "mixed batch")
    if backend == "triton":
        assert lorakern.kernels.launch_counts["segmented_rank_product"] == launches + 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "emb" in lines[0] and "embeddings" in lines[0], lines
    summary = lorakern.patch_summary(model)
    assert list(summary.fell_back) == ["base_model.model.emb"]
    assert "ran PEFT's forward on some calls" in str(summary)
    lorakern.unpatch_peft(model)
    assert lorakern.patch_summary(model).fell_back == {}


def test_mixed_adapter_batch_with_grad_enabled_runs_peft_forward(caplog):
    model, _ = _twins("default")
    oracle = copy.deepcopy(model)
    lorakern.unpatch_peft(oracle)
    ids, x = _inputs(batch=3)
    names = ["second", "__base__", "default"]
    with caplog.at_level(logging.WARNING, logger="lorakern"):
        y = model(ids, x, adapter_names=names)
        model(ids, x, adapter_names=names)
    torch.testing.assert_close(y, oracle(ids, x, adapter_names=names), rtol=0, atol=0)
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]  # one per module
    reasons = lorakern.patch_summary(model).fell_back["base_model.model.proj"]
    assert list(reasons.values()) == [2] and "inference only" in list(reasons)[0]


def _peft_error(model, call):
    with pytest.raises(Exception) as caught:
        call(model)
    return caught.type, str(caught.value)


@pytest.mark.parametrize("case", ["length", "merged", "unknown", "training"])
def test_mixed_batch_errors_are_peft_errors(case):
    model, _ = _twins("default")
    unpatched = copy.deepcopy(model)
    lorakern.unpatch_peft(unpatched)
    ids, x = _inputs(batch=2)
    names = {"length": ["default"], "unknown": ["default", "nope"]}.get(case,
                                                                        ["default", "second"])
    for m in (model, unpatched):
        if case == "merged":
            m.merge_adapter()
        if case == "training":
            m.train()

    def call(m):
        with torch.no_grad():
            return m(ids, x, adapter_names=names)

    expected = _peft_error(unpatched, call)
    assert _peft_error(model, call) == expected


def test_state_changed_after_patching_runs_peft_forward(caplog):
    model, _ = _twins("default")
    reference = copy.deepcopy(model)
    lorakern.unpatch_peft(reference)
    ids, x = _inputs()
    seen = []
    for m in (model, reference):  # a hook the fused call would bypass
        m.base_model.model.proj.base_layer.register_forward_hook(
            lambda mod, args, out: seen.append(1))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lorakern"):
        torch.testing.assert_close(model(ids, x), reference(ids, x), rtol=0, atol=0)
    assert len(seen) == 2, "the hook did not run on the patched model"
    assert "forward hooks" in caplog.records[0].getMessage()


def _stack(ranks, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lora_As = [torch.randn(r, k, generator=gen).to(dtype) for r in ranks]
    lora_Bs = [torch.randn(n, r, generator=gen).to(dtype) for r in ranks]
    return lora_As, lora_Bs


@pytest.mark.parametrize("x_dtype, adapter_dtype", [(torch.float32, torch.float32),
                                                    (torch.bfloat16, torch.float32)])
def test_mixed_batch_lora_linear_matches_float64_per_row(backend, x_dtype, adapter_dtype):
    k, n, ranks, scales = 40, 36, [3, 7, 2], [0.5, 2.0, 1.25]
    lora_As, lora_Bs = _stack(ranks, k, n, adapter_dtype)
    gen = torch.Generator().manual_seed(3)
    # 3-D, strided; adapter 0 owns 18 rows: two tiles of the segmented pass
    x = torch.randn(4, 9, 2 * k, generator=gen)[..., ::2].to(x_dtype)
    weight, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    weight, bias = weight.to(x_dtype), bias.to(x_dtype)
    row_adapters = [0, 0, -1, 1]  # adapter 2 stacked but unused
    lora_A, lora_B, scale = multi_adapter.stack_adapters(lora_As, lora_Bs, scales)
    args = [t.to(DEVICE) for t in (x, weight, lora_A, lora_B)]
    with torch.no_grad():
        y = multi_adapter.mixed_batch_lora_linear(*args, scale, ranks, row_adapters,
                                                  bias.to(DEVICE))
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    for item, adapter in enumerate(row_adapters):
        if adapter >= 0:
            term = x[item].double() @ lora_As[adapter].double().T @ lora_Bs[adapter].double().T
            expected[item] += scales[adapter] * term
    assert y.dtype == x_dtype
    assert_matches_oracle(y, expected, x_dtype, "mixed batch y")


def test_mixed_batch_rank_limit_is_the_kernels():
    from lorakern.kernels.segmented_lora import MAX_SEGMENT_RANK
    assert multi_adapter.MAX_MIXED_RANK == MAX_SEGMENT_RANK


def test_mixed_batch_lora_linear_refuses_bad_calls_before_any_kernel():
    lora_As, lora_Bs = _stack([3, 2], 8, 6, torch.float32)
    lora_A, lora_B, scale = multi_adapter.stack_adapters(lora_As, lora_Bs, [1.0, 2.0])
    x, weight = torch.randn(2, 8), torch.randn(6, 8)
    call = multi_adapter.mixed_batch_lora_linear
    launches = dict(lorakern.kernels.launch_counts)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"3 adapter indices for an x of shape \(2, 8\)"):
            call(x, weight, lora_A, lora_B, scale, [3, 2], [0, 1, 0])
        with pytest.raises(ValueError, match=r"adapter indices \[2\] outside -1 \.\. 1"):
            call(x, weight, lora_A, lora_B, scale, [3, 2], [0, 2])
        with pytest.raises(ValueError, match=r"ranks \[3, 3\] sum to 6, lora_A has 5 rows"):
            call(x, weight, lora_A, lora_B, scale, [3, 3], [0, 1])
    with pytest.raises(ValueError, match="for inference"):
        call(x.requires_grad_(), weight, lora_A, lora_B, scale, [3, 2], [0, 1])
    assert dict(lorakern.kernels.launch_counts) == launches
