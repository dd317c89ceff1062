"""The benchmark harness's pieces, on CPU, fast: the cuBLAS-composition
baseline's gradients, the providers' agreement, the saved-bytes counter, the
records' provenance fields, and the CPU smoke run's files."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root holds bench/

from bench import e2e, linear, metrics, run  # noqa: E402
from bench.cases import Case, make_inputs  # noqa: E402
from bench.composition import AddmmLoRA, keep_mask  # noqa: E402
from bench.providers import PROVIDERS, installed  # noqa: E402
from lorakern import reference  # noqa: E402
from oracle import assert_matches_oracle, oracle  # noqa: E402

TINY = Case(d_in=24, d_out=20, tokens=12, rank=3, dtype="fp32", dropout=0.0)
CPU = torch.device("cpu")
HAVE_PEFT = installed("peft")  # pip install peft transformers: the baselines' packages


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_addmm_lora_gradients_match_the_reference_in_float64(dropout_p):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64)  # 3-D: leading dims flattened
    weight = torch.randn(12, 16, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)
    lora_A = torch.randn(4, 16, dtype=torch.float64)
    lora_B = torch.randn(12, 4, dtype=torch.float64)
    grad_y = torch.randn(2, 5, 12, dtype=torch.float64)
    ours = _leaves(x, weight, lora_A, lora_B, bias)
    torch.manual_seed(7)
    y = AddmmLoRA.apply(ours[0], ours[1], ours[2], ours[3], ours[4], 1.5, dropout_p)
    y.backward(grad_y)
    torch.manual_seed(7)  # the same keep-mask, drawn the same way
    mask = keep_mask((10, 16), dropout_p, CPU).reshape(2, 5, 16) if dropout_p else None
    theirs = _leaves(x, weight, lora_A, lora_B, bias)
    y_ref = reference.lora_linear_masked(theirs[0], theirs[1], theirs[2], theirs[3], 1.5,
                                         theirs[4], mask, dropout_p)
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("dx", "dW", "dA", "dB", "db"), ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_addmm_lora_gradcheck():
    torch.manual_seed(1)
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
            for s in ((6, 5), (4, 5), (2, 5), (4, 2), (4,))]
    assert torch.autograd.gradcheck(lambda *a: AddmmLoRA.apply(*a, 0.7, 0.0), args)


def test_providers_agree_on_a_tiny_shape():
    """Forward and every gradient of each LoRA provider against the fp64
    reference (peft-compile is left out: inductor is slow on CPU)."""
    inputs = make_inputs(TINY, CPU)
    f64 = _leaves(*(t.double() for t in (inputs.x, inputs.lora_A, inputs.lora_B)))
    want = reference.lora_linear(f64[0], inputs.weight.double(), f64[1], f64[2], TINY.scale)
    want.backward(inputs.grad_y.double())
    names = [n for n, p in PROVIDERS.items()
             if p.adapter and not p.compiled and p.unavailable() is None]
    assert {"addmm", "merged", "lorakern"} | ({"peft"} if HAVE_PEFT else set()) <= set(names)
    for name in names:
        provider = PROVIDERS[name]
        with provider.environment():
            _check_provider(provider, inputs, want, f64)
    floor = PROVIDERS["linear"].build(inputs, TINY).forward(inputs.x)
    torch.testing.assert_close(floor, inputs.x @ inputs.weight.t())


def _check_provider(provider, inputs, want, f64):
    name = provider.name
    layer = provider.build(inputs, TINY)
    y = layer.forward(inputs.x)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, msg=name)
    if "fwd+bwd" not in provider.modes:
        return
    inputs.x.grad = None
    for t in layer.trainable:
        t.grad = None
    y.backward(inputs.grad_y)
    grads = [inputs.x.grad] + [t.grad for t in layer.trainable]
    for label, got, ref in zip(("dx", "dA", "dB"), grads, f64):
        torch.testing.assert_close(got.double(), ref.grad, rtol=1e-5, atol=1e-5,
                                   msg=f"{name} {label}")


def test_fp32_adapters_on_a_bf16_base_with_a_trained_bias_as_peft_builds_them(monkeypatch):
    """PEFT's default (fp32 adapters on a 16-bit base) with the headline's trained
    bias: every LoRA provider's forward and dX, dA, dB, db against the float64 oracle
    (the fp32-adapter products of lorakern's reference path and PEFT run in fp32, the
    base in bf16: bf16's tolerance)."""
    monkeypatch.setenv("LORAKERN_BACKEND", "reference")  # not the interpreter: fast
    case = Case(d_in=24, d_out=20, tokens=12, rank=3, dtype="bf16", dropout=0.0,
                adapter_dtype="fp32")
    t = make_inputs(case, CPU, bias=True)
    assert (t.x.dtype, t.lora_A.dtype, t.lora_B.dtype, t.bias.dtype) == (
        torch.bfloat16, torch.float32, torch.float32, torch.bfloat16)
    assert case.adapter_label == "fp32" and t.bias.requires_grad
    want, grads = oracle(t.x, t.weight, t.lora_A, t.lora_B, case.scale, t.bias,
                         grad_y=t.grad_y)
    names = ["addmm", "lorakern"] + (["peft"] if HAVE_PEFT else [])
    for name in names:
        layer = PROVIDERS[name].build(t, case)
        if name == "peft":
            assert layer.forward.lora_A["default"].weight.dtype == torch.float32
            assert layer.forward.base_layer.bias is t.bias
        assert any(v is t.bias for v in layer.trainable), name
        t.x.grad = None
        for v in layer.trainable:
            v.grad = None
        y = layer.forward(t.x)
        y.backward(t.grad_y)
        assert_matches_oracle(y, want, torch.bfloat16, f"{name} y")
        for label, got in (("x", t.x.grad), ("lora_A", t.lora_A.grad),
                           ("lora_B", t.lora_B.grad), ("bias", t.bias.grad)):
            assert_matches_oracle(got, grads[label], torch.bfloat16, f"{name} d{label}")


def test_cases_carry_the_adapter_dtype_the_records_name():
    from bench.cases import PRESETS, make_cases
    quick = make_cases(**PRESETS["quick"])
    assert {c.adapter_label for c in quick} == {"fp32", "bf16"}
    assert quick[0].adapter_label == "fp32"  # PEFT's default first
    both = make_cases(("24x20",), (12,), (3,), ("fp32", "fp16"), (0.0,), ("fp32", "base"))
    assert [c.adapter_label for c in both] == ["fp32-base", "fp32", "fp16"]
    with pytest.raises(ValueError, match="adapter dtype 'fp64'"):
        make_cases(("24x20",), (12,), (3,), ("bf16",), (0.0,), ("fp64",))
    args = run.parse_args(["--adapter-dtype", "base", "--bias", "off"])
    assert args.adapter_dtypes == ("base",) and args.bias == "off"
    assert run.plan(run.parse_args(["--device", "cpu", "--dtypes", "bf16"]))["cases"][0] \
        .adapter_dtype == "fp32"  # a custom grid: PEFT's default
    with pytest.raises(SystemExit):
        run.parse_args(["--adapter-dtype", "fp64"])


def test_lorakern_strategy_providers_force_their_strategy(monkeypatch):
    """lorakern:fused and lorakern:cublas set LORAKERN_STRATEGY while they run,
    and put back what the caller had."""
    monkeypatch.setenv("LORAKERN_STRATEGY", "cublas")
    for name, strategy in [("lorakern:fused", "fused"), ("lorakern:cublas", "cublas"),
                           ("lorakern", "auto")]:
        with PROVIDERS[name].environment():
            assert os.environ["LORAKERN_STRATEGY"] == strategy
        assert os.environ["LORAKERN_STRATEGY"] == "cublas"


def test_saved_bytes_counts_what_autograd_keeps():
    inputs = make_inputs(TINY, CPU)
    operands = [inputs.x, inputs.weight, inputs.lora_A, inputs.lora_B]
    h_bytes = TINY.tokens * TINY.rank * 4
    addmm = PROVIDERS["addmm"].build(inputs, TINY)
    assert metrics.saved_bytes(lambda: addmm.forward(inputs.x), operands) == h_bytes
    dropped = Case(**{**TINY.__dict__, "dropout": 0.5})
    addmm = PROVIDERS["addmm"].build(inputs, dropped)
    mask_bytes = TINY.tokens * TINY.d_in  # one byte per element of x
    assert metrics.saved_bytes(lambda: addmm.forward(inputs.x), operands) == h_bytes + mask_bytes
    with torch.no_grad():
        assert metrics.saved_bytes(lambda: addmm.forward(inputs.x), operands) == 0


def test_saved_bytes_sees_the_dropped_copy_of_x_that_peft_keeps():
    pytest.importorskip("peft")
    inputs = make_inputs(TINY, CPU)
    operands = [inputs.x, inputs.weight, inputs.lora_A, inputs.lora_B]
    peft = PROVIDERS["peft"].build(inputs, Case(**{**TINY.__dict__, "dropout": 0.5}))
    saved = metrics.saved_bytes(lambda: peft.forward(inputs.x), operands)
    assert saved >= inputs.x.numel() * 4


def test_every_record_names_device_versions_and_commit():
    timing = linear.Timing(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2, max_sets=2)
    providers = [PROVIDERS["linear"], PROVIDERS["addmm"], PROVIDERS["merged"]]
    records = linear.run_case(TINY, providers, ["forward", "fwd+bwd"], CPU, timing,
                              metrics.environment(CPU))
    assert {(r["provider"], r["mode"]) for r in records} == {
        ("linear", "forward"), ("linear", "fwd+bwd"), ("addmm", "forward"),
        ("addmm", "fwd+bwd"), ("merged", "forward")}
    for r in records:
        assert r["status"] == "ok", r
        assert r["adapter_dtype"] == "fp32-base" and r["bias"] is True
        assert r["device"].startswith("CPU") and r["timer"] == "cpu-perf_counter"
        assert "not kernel timings" in r["note"]
        assert r["torch"] == torch.__version__ and r["triton"]
        if (REPO / ".git").exists():
            assert len(r["git_commit"]) == 40, r["git_commit"]
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["tflops"] > 0 and r["rotation_sets"] == 2
    addmm = next(r for r in records if r["provider"] == "addmm" and r["mode"] == "fwd+bwd")
    assert set(addmm["speedup_vs"]) == {"linear"}
    assert addmm["saved_bytes"] == TINY.tokens * TINY.rank * 4


def test_cpu_smoke_run_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "reference")  # not the interpreter: fast
    threads = torch.get_num_threads()
    try:
        status = run.main(["--device", "cpu", "--shapes", "32x40", "--tokens", "8",
                           "--ranks", "4", "--dtypes", "fp32", "--dropout", "0,0.1",
                           "--warmup-ms", "0", "--rep-ms", "1", "--e2e-steps", "2",
                           "--e2e-layers", "1", "--e2e-seq", "16", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    (json_path,) = tmp_path.glob("cpu-smoke-*.json")
    (md_path,) = tmp_path.glob("cpu-smoke-*.md")
    doc = json.loads(json_path.read_text())
    assert "not kernel timings" in doc["label"] and "reference" in doc["label"]
    assert doc["layer"] and doc["e2e"]
    for r in doc["layer"] + doc["e2e"]:
        assert r["timer"] == "cpu-perf_counter" and "not kernel timings" in r["note"]
        assert "git_commit" in r and r["torch"] and r["device"].startswith("CPU")
    assert {r["path"] for r in doc["layer"] if r["provider"] == "lorakern"} == {"reference"}
    status = {(r["provider"], r["mode"]): r["status"] for r in doc["layer"]}
    assert status["lorakern", "backward"] == status["addmm", "fwd+bwd"] == "ok"
    assert status["peft", "fwd+bwd"] == ("ok" if HAVE_PEFT else "skipped")
    e2e_status = {r["provider"]: r["status"] for r in doc["e2e"]}
    have_e2e = HAVE_PEFT and installed("transformers")
    assert e2e_status["peft"] == ("ok" if have_e2e else "skipped")
    for provider in ("lorakern", "lorakern-inject"):
        if all(map(installed, e2e.PROVIDERS[provider][1])):  # lorakern ran every LoRA linear
            (fused,) = [r for r in doc["e2e"] if r["provider"] == provider]
            assert fused["status"] == "ok", fused
            assert fused["lorakern_calls_per_forward"] == fused["lora_linears"] == 7
    text = md_path.read_text()
    assert "not kernel timings" in text and "## Layer, fwd+bwd" in text


def test_verify_dry_run_says_what_it_would_run_and_exits_0(capsys):
    from bench import static, verify
    assert verify.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pytest -m gpu" in out and "bench.static" in out and "bench.run" in out
    assert "verify-<device>-" in out and "--adapter-dtype fp32,base" in out
    assert "--base nf4" in out
    cmds = verify.commands(Path("/tmp/verify"), "sm_90")
    assert set(cmds) == set(verify.SEQUENTIAL_STEPS) | set(verify.BACKGROUND_STEPS)
    assert sum(verify.STEP_LIMITS_S[s] for s in verify.SEQUENTIAL_STEPS) <= 8 * 60
    assert all(verify.STEP_LIMITS_S[s] <= 8 * 60 for s in verify.BACKGROUND_STEPS)
    # the steps' flags parse as their commands will read them
    static_args = static.parse_args(cmds["static"][3:])
    assert static_args.adapter_dtypes == ("fp32", "base") and static_args.set == "quick"
    run_args = run.parse_args(cmds["run"][3:] + ["--device", "cpu"])
    todo = run.plan(run_args)
    assert [p.name for p in todo["providers"]] == list(verify.RUN_PROVIDERS)
    assert todo["e2e"] is None and todo["embedding"] is None and todo["bias"]
    assert {c.adapter_dtype for c in todo["cases"]} == {"fp32", "base"}
    qlora_static = static.parse_args(cmds["static-qlora"][3:])
    assert qlora_static.bases == ("nf4",) and qlora_static.dropout == [0.1]
    qlora_todo = run.plan(run.parse_args(cmds["run-qlora"][3:] + ["--device", "cpu"]))
    ((base, providers),) = qlora_todo["provider_sets"]
    assert base == "nf4" and [p.name for p in providers] == list(verify.QLORA_PROVIDERS)
    assert [c.tokens for c in qlora_todo["cases"]] == [16, 8192]


def test_verify_puts_measured_beside_predicted():
    from bench import verify
    measured = [{"status": "ok", "provider": "lorakern", "mode": "fwd+bwd", "case": "c",
                 "d_in": 64, "d_out": 32, "tokens": 16, "rank": 4, "dropout": 0.0,
                 "adapter_dtype": "fp32", "median_ms": 0.3},
                {"status": "ok", "provider": "linear", "mode": "forward", "case": "c",
                 "d_in": 64, "d_out": 32, "tokens": 16, "rank": 4, "dropout": 0.0,
                 "adapter_dtype": "bf16", "median_ms": 0.1},
                {"status": "skipped", "provider": "peft", "mode": "forward"}]
    predicted = [{"K": 64, "N": 32, "M": 16, "r": 4, "dropout": 0.0, "adapter_dtype": "fp32",
                  "provider": "lorakern", "mode": "fwd+bwd", "predicted_ms": 0.2,
                  "bound": "issue"}]
    # a quantised base's records are joined by base and by bench.static's QLoRA names
    measured.append({**measured[0], "provider": "peft-qlora", "base": "nf4", "median_ms": 0.8,
                     "case": "c base=nf4"})
    predicted += [{**predicted[0], "provider": "peft QLoRA", "base": "nf4",
                   "predicted_ms": 0.4},
                  {**predicted[0], "provider": "lorakern", "base": "nf4", "predicted_ms": 9.0}]
    rows = verify.join(measured, predicted)
    assert [(r["provider"], r["measured_over_predicted"]) for r in rows] == [
        ("lorakern", 1.5), ("linear", None), ("peft-qlora", 2.0)]
    doc = {"environment": {"device": "GPU", "git_commit": "abc"}, "date": "2026-12-03",
           "arch": "sm_90", "machine": "H100", "steps": {"tests": {"exit": 0, "seconds": 1}},
           "rows": rows}
    text = verify.markdown(doc)
    assert "| c | lorakern | fwd+bwd | 0.300 | 0.200 | 1.50 | issue |" in text
