"""Every measurement in one place: timing, FLOPs, memory, saved bytes,
speedups and the environment stamped on each record.

Timing: on CUDA, a pair of CUDA events around each call, calls back to back
after a warm-up (so launch overhead a provider cannot hide is counted); on
CPU, ``time.perf_counter``. Each call ``i`` is given its own index so the
caller can rotate inputs (L2 cache) and do untimed preparation.
"""
import datetime
import importlib
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls_cuda(run, prepare, n):
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        prepare(i)
        starts[i].record()
        run(i)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _time_calls_cpu(run, prepare, n):
    times = []
    for i in range(n):
        prepare(i)
        start = time.perf_counter()
        run(i)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_calls(run, prepare, device, warmup_ms=25.0, rep_ms=100.0, min_reps=10,
               max_reps=1000, reps=None, warmup_calls=3):
    """Milliseconds of ``run(i)`` for i = 0, 1, ... after ``prepare(i)`` (untimed).

    Warm-up runs for ``warmup_ms`` and at least ``warmup_calls`` calls
    (compiles, autotuning, allocator; one call per rotated input set). The
    number of timed calls is ``reps`` if given, else ``rep_ms`` over an
    estimate of one call, clamped to [min_reps, max_reps].
    """
    timer = _time_calls_cuda if device.type == "cuda" else _time_calls_cpu
    calls, start = 0, time.perf_counter()
    while calls < warmup_calls or (time.perf_counter() - start) * 1e3 < warmup_ms:
        prepare(calls)
        run(calls)
        calls += 1
        _sync(device)
    if reps is None:
        estimate = statistics.median(timer(run, prepare, 5))
        reps = int(min(max(rep_ms / max(estimate, 1e-6), min_reps), max_reps))
    return timer(run, prepare, reps)


def summarize(times_ms):
    """Median, p20 and p80 (inclusive quantiles) of a list of milliseconds."""
    q = statistics.quantiles(times_ms, n=10, method="inclusive")
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[1], "p80_ms": q[7],
            "reps": len(times_ms)}


# ------------------------------------------------------------------ FLOPs
def layer_flops(case, mode, adapter=True):
    """Multiply-adds x 2 of the math a layer needs, W frozen.

    forward: x Wᵀ (2·M·in·out), plus for the adapter h = x Aᵀ and h Bᵀ
    (2·M·r·(in + out)). backward: dX = dY W (2·M·in·out), plus G = dY B,
    G A, dA = Gᵀ x, dB = dYᵀ h (4·M·r·(in + out)). The floor (no adapter)
    counts only the base products; a merged layer is a plain Linear.
    """
    m, k, n, r = case.tokens, case.d_in, case.d_out, case.rank
    base = 2 * m * k * n
    fwd = base + (2 * m * r * (k + n) if adapter else 0)
    bwd = base + (4 * m * r * (k + n) if adapter else 0)
    return {"forward": fwd, "fwd+bwd": fwd + bwd, "backward": bwd}[mode]


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12


# ------------------------------------------------------------ correctness
# max |y - y_ref| / max |y_ref| against the fp32 reference above which a
# provider's forward is reported as wrong (a few units of the dtype's rounding;
# fp32 leaves room for TF32)
REL_ERR_LIMIT = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 5e-3}


def relative_error(got, want):
    """max |got - want| / max |want|, in fp32."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max()).item()


# ----------------------------------------------------------------- memory
def peak_memory(run, prepare, device):
    """Peak bytes allocated by one ``run(0)`` above what is allocated after
    ``prepare(0)`` (the inputs, and for the backward mode the forward's state).
    None on CPU, where torch keeps no such counter."""
    if device.type != "cuda":
        return None
    prepare(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def saved_bytes(forward, inputs):
    """Bytes autograd keeps for the backward of ``forward()``, counted once per
    storage, excluding the storages of ``inputs`` (x, W, A, B: alive anyway)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    exclude = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(n for ptr, n in storages.items() if ptr not in exclude)


# --------------------------------------------------------------- speedups
def add_speedups(records, key=("case", "mode")):
    """Give each timed record ``speedup_vs[other] = other median / its median``
    for every other provider timed on the same case and mode (>1: faster)."""
    groups = {}
    for r in records:
        if r.get("median_ms"):
            groups.setdefault(tuple(r[k] for k in key), []).append(r)
    for group in groups.values():
        for r in group:
            r["speedup_vs"] = {o["provider"]: o["median_ms"] / r["median_ms"]
                               for o in group if o is not r}
    return records


# ------------------------------------------------------------ environment
def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception:  # not installed, or broken: say so rather than fail
        return None


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def environment(device):
    """Device, versions, commit and time: stamped on every record."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cache_bytes(device):
    """The last-level cache inputs must overflow: the GPU's L2; 32 MiB on CPU."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return 32 << 20


def rotation_count(set_bytes, device, max_sets):
    """Input sets to rotate through so that consecutive calls find none of
    their operands in cache: enough sets to cover twice the cache."""
    return max(1, min(max_sets, math.ceil(2 * cache_bytes(device) / max(set_bytes, 1))))
