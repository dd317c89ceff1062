"""The runtime tuner (lorakern.autotune): which candidate it picks, when it
times, what it keeps in memory and in the cache file, and how it survives bad
files, unwritable directories and concurrent writers.

No GPU is needed: a fake timer stands in for CUDA events. Each candidate is a
callable that records its calls, and the timer calls it once and returns the
time preset for that candidate.
"""
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lorakern.functional import autotune

ROOT = Path(__file__).resolve().parents[1]
KEY = {"direction": "forward", "device": "cpu", "torch": "2.13.0", "triton": "3.7.1",
       "x_dtype": "torch.bfloat16", "adapter_dtype": "torch.bfloat16", "m_bucket": 8192,
       "n": 4096, "k": 4096, "rank_block": 16, "dropout": False}
FUSED = "fused:128x128x64:w8:s4"
FUSED_SMALL = "fused:64x64x32:w4:s3"


class FakeTimer:
    """A timer that runs fn once and reports the preset time of the candidate."""

    def __init__(self, seconds_by_name):
        self.seconds_by_name = seconds_by_name
        self.timed = []

    def __call__(self, fn):
        fn()
        self.timed.append(fn.name)
        return self.seconds_by_name[fn.name]


class Candidate:
    def __init__(self, name, error=None):
        self.name = name
        self.error = error
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error


def make_candidates(*names, failing=()):
    return {name: Candidate(name, RuntimeError("out of resources") if name in failing else None)
            for name in names}


@pytest.fixture
def timer(cache_dir):
    fake = FakeTimer({"cublas": 0.000455, FUSED: 0.000412, FUSED_SMALL: 0.000600})
    previous = autotune.set_timer(fake)
    yield fake
    autotune.set_timer(previous)


def read_cache(cache_dir):
    return json.loads((cache_dir / "autotune.json").read_text())


def canonical(key):
    return json.dumps(key, sort_keys=True)


# ---- choosing

def test_picks_the_fastest_and_times_every_candidate_once(timer):
    candidates = make_candidates("cublas", FUSED, FUSED_SMALL)
    assert autotune.choose(KEY, candidates, heuristic="cublas") == FUSED
    assert sorted(timer.timed) == sorted(candidates)
    assert all(candidate.calls == 1 for candidate in candidates.values())


def test_equal_times_choose_the_earlier_candidate(cache_dir):
    autotune.set_timer(FakeTimer({"cublas": 0.001, FUSED: 0.001}))
    try:
        assert autotune.choose(KEY, make_candidates(FUSED, "cublas"), FUSED) == FUSED
        other_key = dict(KEY, m_bucket=16)
        assert autotune.choose(other_key, make_candidates("cublas", FUSED), FUSED) == "cublas"
    finally:
        autotune.set_timer(None)


def test_a_second_call_with_the_same_key_times_nothing(timer):
    autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")
    timer.timed.clear()
    again = make_candidates("cublas", FUSED)
    assert autotune.choose(dict(reversed(list(KEY.items()))), again, "cublas") == FUSED
    assert timer.timed == [] and all(c.calls == 0 for c in again.values())


def test_the_choice_survives_in_the_file(timer, cache_dir):
    autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")
    autotune.reset()
    timer.timed.clear()
    assert autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas") == FUSED
    assert timer.timed == []
    fresh = autotune.Tuner(cache_dir=cache_dir, timer=FakeTimer({}))
    assert fresh.choose(KEY, make_candidates("cublas", FUSED), "cublas") == FUSED


def test_the_file_has_the_documented_format(timer, cache_dir):
    autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")
    document = read_cache(cache_dir)
    assert document["format"] == "lorakern-autotune" and document["version"] == 1
    assert list(document["entries"]) == [canonical(KEY)]
    entry = document["entries"][canonical(KEY)]
    assert entry["choice"] == FUSED
    assert entry["times_ms"] == pytest.approx({"cublas": 0.455, FUSED: 0.412})
    assert not [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")]


def test_cache_dir_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKERN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autotune.Tuner().cache_path == tmp_path / ".cache" / "lorakern" / "autotune.json"


@pytest.mark.parametrize("change", [{"m_bucket": 16}, {"torch": "9.9.9"}])
def test_a_different_key_tunes_again_and_both_are_kept(timer, cache_dir, change):
    autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")
    timer.timed.clear()
    timer.seconds_by_name["cublas"] = 0.0001
    other_key = dict(KEY, **change)
    assert autotune.choose(other_key, make_candidates("cublas", FUSED), FUSED) == "cublas"
    assert sorted(timer.timed) == ["cublas", FUSED]
    entries = read_cache(cache_dir)["entries"]
    assert {name: entry["choice"] for name, entry in entries.items()} == {
        canonical(KEY): FUSED, canonical(other_key): "cublas"}


def test_a_cached_choice_no_longer_offered_is_retuned(timer, cache_dir):
    autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")
    autotune.reset()
    timer.timed.clear()
    assert autotune.choose(KEY, make_candidates("cublas", FUSED_SMALL), "cublas") == "cublas"
    assert sorted(timer.timed) == ["cublas", FUSED_SMALL]
    assert read_cache(cache_dir)["entries"][canonical(KEY)]["choice"] == "cublas"


# ---- when it does not tune

def test_autotune_off_uses_the_heuristic_and_writes_nothing(timer, cache_dir, monkeypatch):
    monkeypatch.setenv("LORAKERN_AUTOTUNE", "0")
    candidates = make_candidates("cublas", FUSED)
    assert autotune.choose(KEY, candidates, "cublas") == "cublas"
    assert timer.timed == [] and all(c.calls == 0 for c in candidates.values())
    assert list(cache_dir.iterdir()) == []


@pytest.mark.parametrize("value", ["", "1"])
def test_autotune_on_values(timer, monkeypatch, value):
    monkeypatch.setenv("LORAKERN_AUTOTUNE", value)
    assert autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas") == FUSED


def test_a_bad_autotune_value_names_the_variable(timer, monkeypatch):
    monkeypatch.setenv("LORAKERN_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="LORAKERN_AUTOTUNE.*yes"):
        autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")


def test_a_heuristic_outside_the_candidates_is_an_error(timer):
    with pytest.raises(ValueError, match="not among the candidates"):
        autotune.choose(KEY, make_candidates("cublas", FUSED), FUSED_SMALL)


def test_a_single_candidate_is_returned_untimed(timer, cache_dir):
    candidates = make_candidates(FUSED)
    assert autotune.choose(KEY, candidates, FUSED) == FUSED
    assert timer.timed == [] and candidates[FUSED].calls == 0
    assert list(cache_dir.iterdir()) == []


def test_no_timing_while_torch_compile_traces(timer, cache_dir, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas") == "cublas"
    assert timer.timed == []
    assert list(cache_dir.iterdir()) == []


def test_no_timing_while_a_cuda_graph_is_captured(timer, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas") == "cublas"
    assert timer.timed == []


def test_tuning_draws_no_random_numbers(timer):
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")
    assert torch.equal(torch.rand(4), expected)


# ---- failing candidates

def test_a_failing_candidate_is_skipped(timer, cache_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="lorakern")
    candidates = make_candidates("cublas", FUSED, failing=(FUSED,))
    assert autotune.choose(KEY, candidates, FUSED) == "cublas"
    assert any(r.levelno == logging.DEBUG and FUSED in r.getMessage() and "failed" in
               r.getMessage() for r in caplog.records)
    assert set(read_cache(cache_dir)["entries"][canonical(KEY)]["times_ms"]) == {"cublas"}


def test_all_failing_falls_back_to_the_heuristic_with_a_warning(timer):
    candidates = make_candidates("cublas", FUSED, failing=("cublas", FUSED))
    with pytest.warns(RuntimeWarning, match="every candidate failed"):
        assert autotune.choose(KEY, candidates, FUSED) == FUSED
    assert all(c.calls == 1 for c in candidates.values())
    assert autotune.choose(KEY, candidates, FUSED) == FUSED  # remembered: not timed again
    assert all(c.calls == 1 for c in candidates.values())


# ---- bad files and directories

CORRUPT_FILES = {
    "not json": "{not json",
    "a list": "[]",
    "foreign format": json.dumps({"format": "other", "version": 1, "entries": {}}),
    "wrong version": json.dumps({"format": "lorakern-autotune", "version": 2, "entries": {}}),
    "entries a list": json.dumps({"format": "lorakern-autotune", "version": 1, "entries": []}),
    "non-str choice": json.dumps({"format": "lorakern-autotune", "version": 1,
                                  "entries": {canonical(KEY): {"choice": 3}}}),
}


@pytest.mark.parametrize("content", CORRUPT_FILES.values(), ids=CORRUPT_FILES.keys())
def test_a_corrupt_file_is_ignored_with_a_warning_and_rewritten(timer, cache_dir, content):
    path = cache_dir / "autotune.json"
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="ignored") as caught:
        assert autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas") == FUSED
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    document = read_cache(cache_dir)
    assert document["format"] == "lorakern-autotune" and document["version"] == 1
    assert document["entries"][canonical(KEY)]["choice"] == FUSED


def test_entries_of_other_versions_are_kept(timer, cache_dir):
    old_key = dict(KEY, torch="2.0.0")
    old_entry = {"choice": "cublas", "times_ms": {"cublas": 1.0}}
    (cache_dir / "autotune.json").write_text(json.dumps(
        {"format": "lorakern-autotune", "version": 1, "entries": {canonical(old_key): old_entry}}))
    assert autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas") == FUSED
    assert read_cache(cache_dir)["entries"][canonical(old_key)] == old_entry


def test_an_unwritable_cache_dir_warns_and_keeps_the_choice_in_memory(timer, tmp_path,
                                                                       monkeypatch):
    regular_file = tmp_path / "a-file"
    regular_file.write_text("")
    monkeypatch.setenv("LORAKERN_CACHE_DIR", str(regular_file / "lorakern"))
    autotune.reset()
    with pytest.warns(RuntimeWarning) as caught:
        assert autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas") == FUSED
    assert len(caught) == 1 and "cannot write the autotune cache" in str(caught[0].message)
    timer.timed.clear()
    assert autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas") == FUSED
    assert timer.timed == []


def test_concurrent_writers_keep_every_entry(cache_dir):
    processes, keys_per_process = 4, 6
    script = textwrap.dedent("""
        import sys
        from lorakern.functional import autotune
        worker, keys, cache_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        def slow():
            pass
        def fast():
            pass
        def timer(fn):
            fn()
            return 0.001 if fn is fast else 0.002
        # one tuner per key, so that every key is its own read-merge-write of the file
        for index in range(keys):
            tuner = autotune.Tuner(cache_dir=cache_dir, timer=timer)
            tuner.choose({"worker": worker, "index": index}, {"cublas": slow, "fused": fast},
                         "cublas")
    """)
    running = [subprocess.Popen([sys.executable, "-c", script, str(worker),
                                 str(keys_per_process), str(cache_dir)],
                                cwd=ROOT, stderr=subprocess.PIPE, text=True)
               for worker in range(processes)]
    for process in running:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-2000:]
    entries = read_cache(cache_dir)["entries"]
    assert set(entries) == {canonical({"worker": w, "index": i})
                            for w in range(processes) for i in range(keys_per_process)}
    assert {entry["choice"] for entry in entries.values()} == {"fused"}


# ---- logging

def test_the_choice_is_logged_once_at_info(timer, caplog):
    caplog.set_level(logging.INFO, logger="lorakern")
    autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")
    autotune.choose(KEY, make_candidates("cublas", FUSED), "cublas")
    tuned = [r for r in caplog.records if r.name == "lorakern" and "tuned" in r.getMessage()]
    assert len(tuned) == 1 and tuned[0].levelno == logging.INFO
    message = tuned[0].getMessage()
    assert f"chose {FUSED} (0.412 ms; cublas 0.455 ms)" in message
    assert "m_bucket=8192" in message


# ---- the key

def tensors(x_shape=(100, 64), out_features=32, rank=3, x_dtype=torch.float32,
            a_dtype=torch.float32, b_dtype=torch.float32):
    in_features = x_shape[-1]
    return (torch.empty(x_shape, dtype=x_dtype), torch.empty(out_features, in_features),
            torch.empty(rank, in_features, dtype=a_dtype),
            torch.empty(out_features, rank, dtype=b_dtype))


def test_fp32_keys_say_whether_the_products_run_in_tf32():
    """TF32 or IEEE changes every candidate's speed and the GEMM's tiles: two keys."""
    args = tensors()
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        ieee = autotune.tuning_key("forward", *args, 0.0)
        matmul.allow_tf32 = True
        tf32 = autotune.tuning_key("forward", *args, 0.0)
    finally:
        matmul.allow_tf32 = previous
    assert (ieee["tf32"], tf32["tf32"]) == (False, True)
    assert autotune.canonical_key(ieee) != autotune.canonical_key(tf32)


def test_tuning_key_for_cpu_tensors():
    key = autotune.tuning_key("forward", *tensors(x_dtype=torch.bfloat16), 0.0)
    assert key == {"direction": "forward", "device": "cpu", "torch": torch.__version__,
                   "triton": key["triton"], "x_dtype": "torch.bfloat16",
                   "adapter_dtype": "torch.float32", "m_bucket": 128, "n": 32, "k": 64,
                   "rank_block": 16, "dropout": False, "tma": False, "base": "dense",
                   "tf32": False}
    assert isinstance(key["triton"], str) and key["triton"]
    json.dumps(key)  # every value is JSON


def test_tuning_key_names_a_quantised_base():
    from lorakern.kernels import QuantizedOperand

    x, weight, lora_A, lora_B = tensors()
    operand = QuantizedOperand("nf4", (weight,), tuple(weight.shape), torch.bfloat16,
                               torch.bfloat16, blocksize=64)
    key = autotune.tuning_key("forward", x, operand, lora_A, lora_B, 0.0)
    assert key["base"] == "nf4" and (key["n"], key["k"]) == tuple(weight.shape)


def test_tuning_key_swaps_n_and_k_for_grad_input():
    key = autotune.tuning_key("grad_input", *tensors(), 0.0)
    assert (key["direction"], key["n"], key["k"]) == ("grad_input", 64, 32)


@pytest.mark.parametrize("x_shape, bucket", [((100, 64), 128), ((0, 64), 1), ((1, 64), 1),
                                             ((128, 64), 128), ((3, 5, 64), 16)])
def test_tuning_key_rounds_the_token_count_up_to_a_power_of_two(x_shape, bucket):
    assert autotune.tuning_key("forward", *tensors(x_shape=x_shape), 0.0)["m_bucket"] == bucket


@pytest.mark.parametrize("rank, block", [(3, 16), (16, 16), (20, 32), (64, 64)])
def test_tuning_key_rank_block(rank, block):
    assert autotune.tuning_key("forward", *tensors(rank=rank), 0.0)["rank_block"] == block


def test_tuning_key_takes_an_explicit_rank_block():
    assert autotune.tuning_key("forward", *tensors(), 0.0, rank_block=64)["rank_block"] == 64


def test_tuning_key_dropout_flag_and_adapter_dtype_promotion():
    key = autotune.tuning_key("forward", *tensors(a_dtype=torch.float32, b_dtype=torch.bfloat16),
                              0.1)
    assert key["dropout"] is True and key["adapter_dtype"] == "torch.float32"
    bf16 = autotune.tuning_key("forward", *tensors(a_dtype=torch.bfloat16,
                                                   b_dtype=torch.bfloat16), 0.0)
    assert bf16["dropout"] is False and bf16["adapter_dtype"] == "torch.bfloat16"


def test_tuning_key_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        autotune.tuning_key("backward", *tensors(), 0.0)


def test_tuning_key_does_not_query_a_gpu_for_cpu_tensors(monkeypatch):
    def no_gpu(*args, **kwargs):
        raise AssertionError("queried the GPU")
    monkeypatch.setattr(torch.cuda, "get_device_name", no_gpu)
    assert autotune.tuning_key("forward", *tensors(), 0.0)["device"] == "cpu"
