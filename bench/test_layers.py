"""pytest-benchmark microbenchmarks of one LoRA linear, per case, provider and
mode: ``pytest bench/ --benchmark-json bench/results/pytest-<device>-<date>.json``.

pytest-benchmark times each call on the wall clock, ending in a device
synchronize; ``python -m bench.run`` gives the CUDA-event timings, memory and
speedups. Without CUDA these are CPU timings of PyTorch code (lorakern's
reference path), not kernel timings.
"""
import itertools

import pytest
import torch

from . import metrics
from .cases import make_inputs
from .linear import CPU_NOTE, mode_calls
from .providers import compute_path

ROUNDS = {"cuda": (5, 50), "cpu": (2, 10)}  # (warm-up rounds, timed rounds)
ENV = {}


def _environment(device):
    if device.type not in ENV:
        ENV[device.type] = metrics.environment(device)
    return ENV[device.type]


def test_layer(benchmark, lk_case, lk_provider, lk_mode, lk_device):
    case, provider, mode, device = lk_case, lk_provider, lk_mode, lk_device
    reason = provider.unavailable()
    if reason:
        pytest.skip(reason)
    if provider.compiled:
        torch._dynamo.reset()
    first = make_inputs(case, device, seed=0)
    n_sets = metrics.rotation_count(first.nbytes(), device, 32 if device.type == "cuda" else 2)
    sets = [first] + [make_inputs(case, device, seed=i) for i in range(1, n_sets)]
    layers = [provider.build(t, case) for t in sets]
    prepare, run = mode_calls(mode, layers, sets)
    calls = itertools.count()

    def setup():
        i = next(calls)
        prepare(i)
        return (i,), {}

    def target(i):
        run(i)
        if device.type == "cuda":
            torch.cuda.synchronize()

    warmup, rounds = ROUNDS[device.type]
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    flops = metrics.layer_flops(case, mode, provider.adapter)
    benchmark.extra_info.update({
        **_environment(device), "case": str(case), "provider": provider.name, "mode": mode,
        "path": compute_path(provider, first), "flops": flops, "rotation_sets": n_sets})
    if benchmark.stats is not None:  # None under --benchmark-disable
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["tflops_at_median"] = metrics.tflops(flops, median_ms)
    if device.type != "cuda":
        benchmark.extra_info["note"] = CPU_NOTE
