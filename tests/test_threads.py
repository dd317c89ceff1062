"""lorakern called from several threads at once.

Every thread's outputs and gradients must be bitwise those of the same call
made alone (same inputs, same dropout seed), forward and backward, in either
strategy and for the embedding; the tuner, switched on here with an injected
timer, must time each key once, answer cached keys while another key is being
timed, and leave every entry in its file; the messages said once are said once;
and threads that make a process's first call load the kernels once, leaving
the environment as it was.

Without CUDA the kernels run in Triton's interpreter, whose launches patch
process-wide state (triton/runtime/interpreter.py): these tests are where two
launches at once would meet.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import lorakern
import lorakern.functional.fused_linear
from lorakern import kernels
from lorakern.functional import autotune, dispatch, layouts

ROOT = Path(__file__).resolve().parents[1]
THREADS = 4
JOIN_TIMEOUT_S = 300


def run_in_threads(work, count=THREADS):
    """[work(0), ..., work(count - 1)], each in its own thread, all released at once;
    the first exception of any thread is raised here."""
    start = threading.Barrier(count)
    results, errors = [None] * count, [None] * count

    def body(index):
        start.wait()
        try:
            results[index] = work(index)
        except BaseException as error:  # handed to the test's thread
            errors[index] = error

    threads = [threading.Thread(target=body, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    for error in errors:
        if error is not None:
            raise error
    return results


# ---- the layers from several threads

_this_thread = threading.local()


@pytest.fixture
def seed_per_thread(monkeypatch):
    """Each thread's dropout seed is the one it set in ``_this_thread.seed``: torch's
    generator is shared, so the order the threads draw from it is not fixed."""
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed",
                        lambda: _this_thread.seed)


def _linear_inputs(index, dtype, device):
    generator = torch.Generator().manual_seed(100 + index)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    x = randn(2, 9, 40).requires_grad_()
    weight = randn(24, 40)
    lora_A = randn(5, 40, scale=40 ** -0.5).requires_grad_()
    lora_B = randn(24, 5).requires_grad_()
    bias = randn(24).requires_grad_()
    grad_y = randn(2, 9, 24)
    return x, weight, lora_A, lora_B, bias, grad_y


def _linear_step(index, device, dtype=torch.float32, dropout_p=0.25):
    """y and every gradient of thread ``index``'s forward and backward."""
    _this_thread.seed = 7000 + index
    x, weight, lora_A, lora_B, bias, grad_y = _linear_inputs(index, dtype, device)
    y = lorakern.lora_linear(x, weight, lora_A, lora_B, 0.5, bias, dropout_p)
    y.backward(grad_y)
    return [y.detach(), x.grad, lora_A.grad, lora_B.grad, bias.grad]


def _launches():
    return sum(kernels.launch_counts.values())


def _assert_bitwise_equal(got, alone, names, index):
    for name, actual, expected in zip(names, got, alone):
        assert torch.equal(actual, expected), (
            f"thread {index}: {name} differs from the same call made alone by up to "
            f"{(actual.double() - expected.double()).abs().max().item():.3e}")


LINEAR_RESULTS = ("y", "dx", "dA", "dB", "db")


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_threads_running_lora_linear_get_what_each_call_gets_alone(
        strategy, dtype, device, monkeypatch, seed_per_thread, cache_dir):
    """Forward and backward of lora_linear (dropout on) in four threads at once: each
    thread's y, dx, dA, dB and db are bitwise those of its call made alone, and
    every launch is counted. (On CUDA the threads share the default stream.)"""
    monkeypatch.setenv("LORAKERN_STRATEGY", strategy)  # set before the threads start
    before = _launches()
    alone = [_linear_step(index, device, dtype) for index in range(THREADS)]
    launches_alone = _launches() - before
    before = _launches()
    together = run_in_threads(lambda index: _linear_step(index, device, dtype))
    assert _launches() - before == launches_alone
    for index in range(THREADS):
        _assert_bitwise_equal(together[index], alone[index], LINEAR_RESULTS, index)


def _embedding_inputs(index, device):
    generator = torch.Generator().manual_seed(200 + index)
    ids = torch.randint(0, 13, (3, 7), generator=generator).to(device)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    weight = randn(13, 20).requires_grad_()
    lora_A = randn(3, 13).requires_grad_()
    lora_B = randn(20, 3).requires_grad_()
    return ids, weight, lora_A, lora_B, randn(3, 7, 20)


def _embedding_step(index, device):
    ids, weight, lora_A, lora_B, grad_y = _embedding_inputs(index, device)
    y = lorakern.lora_embedding(ids, weight, lora_A, lora_B, 2.0, padding_idx=1)
    y.backward(grad_y)
    return [y.detach(), weight.grad, lora_A.grad, lora_B.grad]


EMBEDDING_RESULTS = ("y", "dE", "dA", "dB")


def test_threads_running_lora_embedding_get_what_each_call_gets_alone(device):
    before = _launches()
    alone = [_embedding_step(index, device) for index in range(THREADS)]
    launches_alone = _launches() - before
    before = _launches()
    together = run_in_threads(lambda index: _embedding_step(index, device))
    assert _launches() - before == launches_alone
    for index in range(THREADS):
        _assert_bitwise_equal(together[index], alone[index], EMBEDDING_RESULTS, index)


def test_linear_and_embedding_layers_in_threads_at_once(device, monkeypatch, seed_per_thread,
                                                        cache_dir):
    """Even threads run the linear layer, odd ones the embedding, at the same time."""
    monkeypatch.setenv("LORAKERN_STRATEGY", "fused")

    def step(index):
        return (_linear_step(index, device) if index % 2 == 0
                else _embedding_step(index, device))

    alone = [step(index) for index in range(THREADS)]
    together = run_in_threads(step)
    for index in range(THREADS):
        names = LINEAR_RESULTS if index % 2 == 0 else EMBEDDING_RESULTS
        _assert_bitwise_equal(together[index], alone[index], names, index)


def _split_sums(index, device):
    """dB-like rank-wide products whose row slices are summed by the last program
    to arrive, counted on the kept arrival counters."""
    generator = torch.Generator().manual_seed(300 + index)
    lhs = torch.randn(96, 20, generator=generator).to(device)
    rhs = torch.randn(96, 16, generator=generator).to(device)
    out = kernels.empty((20, 16), torch.float32, device)
    kernels.tn_matmul(lhs, rhs, out, 0.5, rank_block=16)
    return [out]


def test_threads_summing_split_rows_share_the_arrival_counters_and_leave_them_zero(
        device, monkeypatch):
    """Row slices summed in the launch: four threads at once (on CUDA on one stream,
    so on one counter buffer) get the sums they get alone, and the kept counters
    are all zero after."""
    from lorakern.kernels import _common, lora_grad_weights
    monkeypatch.setattr(lora_grad_weights, "target_programs", lambda device: 64)
    alone = [_split_sums(index, device) for index in range(THREADS)]
    for _ in range(2):
        together = run_in_threads(lambda index: _split_sums(index, device))
        for index in range(THREADS):
            _assert_bitwise_equal(together[index], alone[index], ["out"], index)
    counters = list(_common._ARRIVAL_COUNTERS.values())
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)


# ---- the tuner from several threads

class CountingTimer:
    """Runs the candidate once, counts (key, candidate) pairs timed and how many
    timings ran at the same time, and reports a preset time; ``pause`` widens
    the window in which another thread could start timing too."""

    def __init__(self, seconds_by_name, pause=0.002):
        self.seconds_by_name = seconds_by_name
        self.pause = pause
        self.timed = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, fn):
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.pause)
            fn()
            with self._lock:
                self.timed.append((fn.key, fn.name))
            return self.seconds_by_name[fn.name]
        finally:
            with self._lock:
                self.running -= 1


class Candidate:
    def __init__(self, key, name):
        self.key, self.name = key, name

    def __call__(self):
        pass


def _key(index):
    return {"direction": "forward", "device": "cpu", "n": 64, "k": 32, "m_bucket": 1 << index}


def _candidates(index):
    return {name: Candidate(index, name) for name in ("cublas", "fused:a", "fused:b")}


def test_threads_tuning_the_same_keys_time_each_once_and_file_every_entry(cache_dir):
    """Eight threads ask for the same twelve keys, each in its own order: every
    (key, candidate) is timed exactly once, one timing at a time, every thread
    gets the fastest, and the file holds all twelve entries."""
    keys, threads = 12, 8
    timer = CountingTimer({"cublas": 3e-3, "fused:a": 1e-3, "fused:b": 2e-3})
    previous = autotune.set_timer(timer)
    try:
        def ask_every_key(thread):
            order = [(thread * 5 + step) % keys for step in range(keys)]
            return {index: autotune.choose(_key(index), _candidates(index), "cublas")
                    for index in order}

        chosen = run_in_threads(ask_every_key, threads)
    finally:
        autotune.set_timer(previous)
    assert sorted(timer.timed) == sorted((index, name) for index in range(keys)
                                         for name in ("cublas", "fused:a", "fused:b"))
    assert timer.most_at_once == 1
    assert all(answers == {index: "fused:a" for index in range(keys)} for answers in chosen)
    entries = json.loads((cache_dir / autotune.FILE_NAME).read_text())["entries"]
    assert set(entries) == {autotune.canonical_key(_key(index)) for index in range(keys)}
    assert {entry["choice"] for entry in entries.values()} == {"fused:a"}


def test_a_cached_key_is_answered_while_another_key_is_being_timed(cache_dir):
    """A thread whose key is tuned already gets its answer at once, while another
    thread's timing (on CUDA: kernels running) is still going on."""
    release = threading.Event()
    timing_started = threading.Event()

    def blocking_timer(fn):
        if fn.key == 1:
            timing_started.set()
            assert release.wait(JOIN_TIMEOUT_S), "never released"
        return {"cublas": 2e-3, "fused:a": 1e-3, "fused:b": 3e-3}[fn.name]

    previous = autotune.set_timer(blocking_timer)
    try:
        assert autotune.choose(_key(0), _candidates(0), "cublas") == "fused:a"
        tuning = threading.Thread(
            target=lambda: autotune.choose(_key(1), _candidates(1), "cublas"))
        tuning.start()
        assert timing_started.wait(JOIN_TIMEOUT_S)
        answered = []
        lookup = threading.Thread(
            target=lambda: answered.append(autotune.choose(_key(0), _candidates(0), "cublas")))
        lookup.start()
        lookup.join(5)
        waited = lookup.is_alive()
        release.set()
        lookup.join(JOIN_TIMEOUT_S)
        tuning.join(JOIN_TIMEOUT_S)
    finally:
        release.set()
        autotune.set_timer(previous)
    assert not waited, "the cached key waited for another key's timing"
    assert answered == ["fused:a"]


def test_threads_tuning_one_layer_time_it_once_and_get_what_it_gets_alone(
        cache_dir, device, monkeypatch, seed_per_thread):
    """The tuner switched on for CPU tensors (an injected timer): four threads
    running the same layer shape time its forward and grad-input candidates once,
    and each thread's results are bitwise those of its call made alone."""
    if device.type != "cpu":
        pytest.skip("one fused plan per direction is the interpreter's table; on CUDA there "
                    "are several, and test_autotune counts the timings")
    monkeypatch.setattr(dispatch, "tunes_on", lambda device: True)
    timed = []
    timed_lock = threading.Lock()
    # The process-wide launch counts also see the other threads' launches while
    # one thread times a candidate, so each thread counts its own.
    own_launches = threading.local()
    count_launch = kernels._common.count_launch

    def count_launch_per_thread(*names):
        own_launches.names = getattr(own_launches, "names", []) + list(names)
        count_launch(*names)

    monkeypatch.setattr(kernels._common, "count_launch", count_launch_per_thread)

    def timer(fn):
        own_launches.names = []
        fn()
        name = "fused" if "lora_gemm" in own_launches.names else "cublas"
        with timed_lock:
            timed.append(name)
        return 1e-3 if name == "cublas" else 2e-3

    previous = autotune.set_timer(timer)
    try:
        together = run_in_threads(lambda index: _linear_step(index, device))
        assert sorted(timed) == ["cublas", "cublas", "fused", "fused"]  # per direction
        alone = [_linear_step(index, device) for index in range(THREADS)]  # cached: cublas
    finally:
        autotune.set_timer(previous)
    assert len(timed) == 4
    for index in range(THREADS):
        _assert_bitwise_equal(together[index], alone[index], LINEAR_RESULTS, index)


# ---- what is said once

class SlowSet(set):
    """A set whose membership test takes a while: the window between "not said
    yet" and "now said" is wide enough for every thread to look."""

    def __contains__(self, element):
        found = super().__contains__(element)
        time.sleep(0.02)
        return found


def test_a_warning_said_once_is_said_once_by_threads_at_once(monkeypatch):
    monkeypatch.setattr(dispatch, "_said", SlowSet())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_in_threads(lambda index: dispatch.say_once("lorakern: a slower path"))
    assert [str(w.message) for w in caught] == ["lorakern: a slower path"]


def test_a_copy_said_once_is_said_once_by_threads_at_once(monkeypatch, caplog):
    monkeypatch.setattr(layouts, "_copied", SlowSet())
    caplog.set_level(logging.INFO, logger="lorakern")
    strided = torch.randn(6, 4).t()
    copies = run_in_threads(lambda index: layouts.unit_rows(strided, "x"))
    assert all(torch.equal(copy, strided) and copy.stride(-1) == 1 for copy in copies)
    said = [record for record in caplog.records if "copied to contiguous rows" in
            record.getMessage()]
    assert len(said) == 1, [record.getMessage() for record in said]


# ---- the first call of a process, from several threads

FIRST_CALLS = textwrap.dedent("""
    import os, sys, threading, time
    import torch
    import lorakern
    from lorakern.functional import dispatch

    # every thread reads the environment at once and then looks for the kernels, thread
    # i 0.01 * i s later: thread 0 is importing them (about 0.1 s) while the others look
    interpreting, this_thread = dispatch._interpreting, threading.local()
    def slowly_interpreting():
        answer = interpreting()
        time.sleep(0.01 * getattr(this_thread, "index", 0))
        return answer
    dispatch._interpreting = slowly_interpreting

    threads, start, errors = 6, threading.Barrier(6), []
    def first_call(index):
        generator = torch.Generator().manual_seed(index)
        def randn(*shape):
            return torch.randn(*shape, generator=generator)
        x, weight, lora_A, lora_B = randn(4, 8), randn(6, 8), randn(2, 8), randn(6, 2)
        this_thread.index = index
        start.wait()
        try:
            y = lorakern.lora_linear(x, weight, lora_A, lora_B, 0.5)
            expected = lorakern.reference.lora_linear(x, weight, lora_A, lora_B, 0.5)
            assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5), (y - expected).abs().max()
        except BaseException as error:
            errors.append(f"thread {index}: {error!r}")
    running = [threading.Thread(target=first_call, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    assert not errors, errors
    assert "TRITON_INTERPRET" not in os.environ, os.environ["TRITON_INTERPRET"]
    assert sys.modules["lorakern.kernels"]._common.INTERPRET
""")


def test_threads_making_the_first_call_load_the_kernels_once():
    """LORAKERN_BACKEND=triton in a fresh process (TRITON_INTERPRET unset): six
    threads make its first call at once; each gets the kernels fully imported in
    interpreter mode, and the environment is left without TRITON_INTERPRET."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update(LORAKERN_BACKEND="triton", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    done = subprocess.run([sys.executable, "-c", FIRST_CALLS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
