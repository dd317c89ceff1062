"""The layer's two strategies and how a call gets one.

``fused`` runs the Triton GEMMs with the LoRA term inside; ``cublas`` runs
torch's matmul with the LoRA term (a Triton kernel) as its C operand. Both
share the rank passes, the saved tensors and the dropout mask. The oracle
tests of test_fused_kernels.py run every case in both; here: which kernels
each launches, that one seed drops the same elements in both, the
``LORAKERN_STRATEGY`` switch, the table's choice, and the tuner's wiring (on
CUDA it times the plans; here it is switched on with an injected timer).
"""
import json

import pytest
import torch

import lorakern
import lorakern.functional.fused_linear
from lorakern import kernels
from lorakern.functional import autotune, dispatch
from oracle import assert_matches_oracle, oracle

SEED = 4242


def _layer(m, k, n, r, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(m, k, dtype=dtype, device=device).requires_grad_()
    weight = torch.randn(n, k, dtype=dtype, device=device)
    lora_A = (torch.randn(r, k, device=device) / k**0.5).to(dtype).requires_grad_()
    lora_B = torch.randn(n, r, device=device).to(dtype).requires_grad_()
    bias = torch.randn(n, dtype=dtype, device=device).requires_grad_()
    return x, weight, lora_A, lora_B, bias


def _step(layer, dropout_p, monkeypatch, seed=SEED):
    """y and every gradient of one forward + backward with a fixed dropout seed."""
    x, weight, lora_A, lora_B, bias = layer
    for t in (x, lora_A, lora_B, bias):
        t.grad = None
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: seed)
    y = lorakern.lora_linear(x, weight, lora_A, lora_B, 0.5, bias, dropout_p)
    y.backward(torch.ones_like(y))
    return [y.detach().clone()] + [t.grad.clone() for t in (x, lora_A, lora_B, bias)]


def _launched(names, before):
    return {name: kernels.launch_counts[name] - before.get(name, 0) for name in names}


@pytest.mark.parametrize("strategy,gemms,terms", [("fused", 2, 0), ("cublas", 0, 1)])
def test_each_strategy_launches_its_own_kernels(strategy, gemms, terms, device, monkeypatch):
    """Forward and grad-input: the fused GEMM twice, or (torch's matmul doing the big
    products) the LoRA term kernel in the forward and dA's tn_matmul writing dX's
    term; in both, the rank pass in the forward, one pass over dY (G, dB, db) and
    one tn_matmul in the backward."""
    monkeypatch.setenv("LORAKERN_STRATEGY", strategy)
    layer = _layer(24, 40, 36, 5, device)
    before = dict(kernels.launch_counts)
    _step(layer, 0.3, monkeypatch)
    assert _launched(("lora_gemm", "lora_term", "rank_product", "grad_output", "tn_matmul"),
                     before) == {"lora_gemm": gemms, "lora_term": terms, "rank_product": 1,
                                 "grad_output": 1, "tn_matmul": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_seed_drops_the_same_elements_in_both_strategies(dtype, device, monkeypatch):
    """The two strategies agree to rounding for one seed, and both differ from
    another seed's step: they draw one mask, the documented one."""
    layer = _layer(33, 48, 40, 6, device, dtype)
    results = {}
    for strategy in ("fused", "cublas"):
        monkeypatch.setenv("LORAKERN_STRATEGY", strategy)
        results[strategy] = _step(layer, 0.5, monkeypatch)
    other_seed = _step(layer, 0.5, monkeypatch, seed=SEED + 1)
    keep = kernels.dropout_keep_mask(33, 48, 0.5, SEED, device)
    x, weight, lora_A, lora_B, bias = layer
    y_ref, grads = oracle(x, weight, lora_A, lora_B, 0.5, bias, keep,
                          kernels.effective_dropout_p(0.5), torch.ones(33, 40))
    names = ["y", "dx", "dA", "dB", "db"]
    expected = [y_ref] + [grads[k] for k in ("x", "lora_A", "lora_B", "bias")]
    for strategy, got in results.items():
        for name, actual, want in zip(names, got, expected):
            assert_matches_oracle(actual.cpu(), want, dtype, f"{name} ({strategy})")
    assert not torch.allclose(other_seed[2].float(), results["cublas"][2].float())


@pytest.mark.parametrize("backend", ["", "reference"])
def test_an_unknown_strategy_is_refused_naming_the_variable(backend, device, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", backend)
    monkeypatch.setenv("LORAKERN_STRATEGY", "fastest")
    x, weight, lora_A, lora_B, bias = _layer(4, 8, 6, 2, device)
    before = sum(kernels.launch_counts.values())
    with pytest.raises(ValueError, match="LORAKERN_STRATEGY='fastest'"):
        lorakern.lora_linear(x, weight, lora_A, lora_B, 1.0, bias)
    assert sum(kernels.launch_counts.values()) == before


def test_the_table_takes_fused_for_few_tokens_and_cublas_for_many(device):
    x = torch.empty(1, 64, device=device)
    adapters = torch.empty(8, 64, device=device), torch.empty(64, 8, device=device)
    few = kernels.layer_plans(kernels.lora_layer.CUBLAS_FROM_M - 1, x, *adapters)
    many = kernels.layer_plans(kernels.lora_layer.CUBLAS_FROM_M, x, *adapters)
    assert few[0].strategy == "fused" and many[0].strategy == "cublas"
    assert {p.name for p in few} == {p.name for p in many}
    assert all(p.name.startswith("fused:") for p in few if p.strategy == "fused")


def test_unset_strategy_runs_the_tables_choice_without_tuning_off_cuda(device, monkeypatch):
    monkeypatch.delenv("LORAKERN_STRATEGY", raising=False)
    monkeypatch.setattr(autotune, "choose", _must_not_be_called)
    layer = _layer(9, 16, 12, 3, device)
    before = dict(kernels.launch_counts)
    _step(layer, 0.0, monkeypatch)
    assert _launched(("lora_gemm", "lora_term"), before) == {"lora_gemm": 2, "lora_term": 0}


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("tuned off CUDA")


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """The tuner switched on for these (CPU) tensors, with a fake timer that
    makes ``cublas`` fastest; yields the list of timed candidates' names."""
    monkeypatch.setenv("LORAKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LORAKERN_AUTOTUNE", raising=False)
    monkeypatch.setattr(dispatch, "tunes_on", lambda device: True)
    autotune.reset()
    timed = []

    def fake_timer(fn):
        before = kernels.launch_counts["lora_gemm"]
        fn()
        timed.append("fused" if kernels.launch_counts["lora_gemm"] > before else "cublas")
        return 1e-3 if timed[-1] == "cublas" else 2e-3

    previous = autotune.set_timer(fake_timer)
    yield timed
    autotune.set_timer(previous)
    autotune.reset()


def test_the_tuner_times_both_strategies_once_and_the_choice_runs(tuning, tmp_path, device,
                                                                   monkeypatch):
    """Each direction is timed once per key (one fused config under the
    interpreter, and cublas); the faster runs, is kept in the cache file, and a
    second step times nothing. Tuning changes no result."""
    monkeypatch.delenv("LORAKERN_STRATEGY", raising=False)
    layer = _layer(20, 32, 24, 4, device)
    before = dict(kernels.launch_counts)
    tuned = _step(layer, 0.25, monkeypatch)
    assert sorted(tuning) == ["cublas", "cublas", "fused", "fused"]  # forward, grad-input
    launched = _launched(("lora_term", "lora_gemm", "tn_matmul"), before)
    # the timed runs (one of each per direction) plus the chosen cublas runs; cublas
    # launches lora_term in the forward, and dA's tn_matmul writes its dX term
    assert launched == {"lora_term": 2, "lora_gemm": 2, "tn_matmul": 3}
    document = json.loads((tmp_path / "autotune.json").read_text())
    entries = [json.loads(key) | value for key, value in document["entries"].items()]
    assert sorted(e["direction"] for e in entries) == ["forward", "grad_input"]
    assert {e["choice"] for e in entries} == {"cublas"}
    assert all(e["device"] == "cpu" and e["dropout"] for e in entries)

    again = _step(layer, 0.25, monkeypatch)
    assert len(tuning) == 4
    monkeypatch.setenv("LORAKERN_AUTOTUNE", "0")
    untuned = _step(layer, 0.25, monkeypatch)
    for a, b, c in zip(tuned, again, untuned):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_a_forced_strategy_limits_what_the_tuner_may_pick(tuning, device, monkeypatch):
    monkeypatch.setenv("LORAKERN_STRATEGY", "fused")
    layer = _layer(20, 32, 24, 4, device)
    before = dict(kernels.launch_counts)
    _step(layer, 0.0, monkeypatch)
    assert tuning == []  # one fused config under the interpreter: nothing to time
    assert _launched(("lora_term", "lora_gemm"), before) == {"lora_term": 0, "lora_gemm": 2}


def test_tuning_draws_no_random_numbers(tuning, device, monkeypatch):
    """The dropout seed comes from torch's generator; tuning between two draws
    leaves the next draw as it would have been."""
    monkeypatch.delenv("LORAKERN_STRATEGY", raising=False)
    x, weight, lora_A, lora_B, bias = _layer(20, 32, 24, 4, device)
    torch.manual_seed(7)
    lorakern.lora_linear(x, weight, lora_A, lora_B, 0.5, bias, 0.5)  # tunes
    tuned_next = torch.rand(3)
    assert tuning
    torch.manual_seed(7)
    lorakern.lora_linear(x, weight, lora_A, lora_B, 0.5, bias, 0.5)  # cached: no tuning
    assert torch.equal(torch.rand(3), tuned_next)


@pytest.mark.gpu
def test_on_cuda_the_tuner_times_every_plan_and_the_choice_matches_the_oracle(
        tmp_path, device, monkeypatch):
    """Real CUDA-event timings at a shape where both strategies are in the
    running: each direction's entry in the cache file times cublas and the
    fused configs; the tuned step matches the float64 oracle."""
    monkeypatch.setenv("LORAKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LORAKERN_AUTOTUNE", raising=False)
    monkeypatch.delenv("LORAKERN_STRATEGY", raising=False)
    autotune.reset()
    try:
        layer = _layer(2048, 1024, 1536, 16, device, torch.bfloat16)
        got = _step(layer, 0.1, monkeypatch)
    finally:
        autotune.reset()
    document = json.loads((tmp_path / "autotune.json").read_text())
    entries = {json.loads(key)["direction"]: value for key, value in document["entries"].items()}
    assert set(entries) == {"forward", "grad_input"}
    for entry in entries.values():
        names = set(entry["times_ms"])
        assert "cublas" in names and sum(n.startswith("fused:") for n in names) >= 2, names
        assert entry["choice"] in names and all(t > 0 for t in entry["times_ms"].values())
    x, weight, lora_A, lora_B, bias = layer
    keep = kernels.dropout_keep_mask(2048, 1024, 0.1, SEED, device)
    y_ref, grads = oracle(x, weight, lora_A, lora_B, 0.5, bias, keep,
                          kernels.effective_dropout_p(0.1), torch.ones(2048, 1536))
    expected = [y_ref] + [grads[k] for k in ("x", "lora_A", "lora_B", "bias")]
    for name, actual, want in zip(["y", "dx", "dA", "dB", "db"], got, expected):
        assert_matches_oracle(actual.cpu(), want, torch.bfloat16, f"{name} (tuned)")
