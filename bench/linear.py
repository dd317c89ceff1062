"""One case, every provider, every mode: the layer microbenchmark records."""
import gc
import traceback
from dataclasses import dataclass

import torch

from lorakern import reference

from . import metrics
from .cases import SHAPES, make_inputs

CPU_NOTE = ("CPU smoke: perf_counter timings of PyTorch code, not kernel timings "
            "(those need CUDA)")


@dataclass
class Timing:
    """How long to measure: see ``metrics.time_calls``; ``max_sets`` caps the
    input sets rotated through to keep operands out of cache."""
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 1000
    max_sets: int = 32


def mode_calls(mode, layers, sets):
    """(prepare, run) for one mode; call i uses input set i mod len(sets).

    forward: the layer under no_grad (training mode, so dropout applies).
    fwd+bwd: forward then backward with the case's grad_y; grads reset untimed.
    backward: the forward runs in ``prepare`` (untimed), only backward is timed.
    """
    k, pending = len(sets), []

    def reset(i):
        for t in layers[i % k].trainable + [sets[i % k].x]:
            t.grad = None

    def forward(i):
        return layers[i % k].forward(sets[i % k].x)

    if mode == "forward":
        def run(i):
            with torch.no_grad():
                forward(i)
        return (lambda i: None), run
    if mode == "fwd+bwd":
        def run(i):
            forward(i).backward(sets[i % k].grad_y)
        return reset, run
    if mode == "backward":
        def prepare(i):
            reset(i)
            pending.append((forward(i), sets[i % k].grad_y))

        def run(i):
            y, grad_y = pending.pop()
            y.backward(grad_y)
        return prepare, run
    raise ValueError(f"mode {mode!r}")


def _relative_error(layer, t, case):
    """max |y - y_ref| / max |y_ref| of the forward against lorakern's
    reference in fp32 (dropout 0 only: masks differ between providers)."""
    if case.dropout > 0:
        return None
    with torch.no_grad():
        f32 = [v.detach().float() for v in (t.x, t.weight, t.lora_A, t.lora_B)]
        bias = None if t.bias is None else t.bias.detach().float()
        want = (layer.reference() if layer.reference is not None
                else reference.lora_linear(*f32, scale=case.scale, bias=bias))
        return metrics.relative_error(layer.forward(t.x), want)


def _case_fields(case):
    return {"kind": "layer", "case": str(case), "shape": case.shape,
            "shape_role": SHAPES.get(case.shape), "d_in": case.d_in, "d_out": case.d_out,
            "tokens": case.tokens, "rank": case.rank, "dtype": case.dtype,
            "adapter_dtype": case.adapter_label, "dropout": case.dropout, "scale": case.scale}


def _measure_mode(layers, sets, case, mode, adapter, device, timing):
    """Timing statistics, FLOPs and peak memory of one mode."""
    prepare, run = mode_calls(mode, layers, sets)
    times = metrics.time_calls(run, prepare, device, timing.warmup_ms, timing.rep_ms,
                               timing.min_reps, timing.max_reps,
                               warmup_calls=max(3, len(sets)))
    stats = metrics.summarize(times)
    flops = metrics.layer_flops(case, mode, adapter)
    return {**stats, "flops": flops, "tflops": metrics.tflops(flops, stats["median_ms"]),
            "peak_mem_bytes": metrics.peak_memory(run, prepare, device)}


def _failures(base, modes, exc):
    """One record per mode that could not be timed: 'oom' or 'error'."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return [{**base, "mode": m, "status": "oom"} for m in modes]
    traceback.print_exception(exc)
    return [{**base, "mode": m, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            for m in modes]


def _compile_counts():
    from torch._dynamo.utils import counters
    return (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))


def _provider_records(provider, sets, case, modes, device, timing, base):
    """Build the provider's layers once per input set, then time each mode."""
    try:
        if provider.compiled:
            torch._dynamo.reset()  # fresh cache: no stale guards, no recompile limit
            graphs, breaks = _compile_counts()
        layers = [provider.build(t, case) for t in sets]
        error = _relative_error(layers[0], sets[0], case) if provider.adapter else None
        t = sets[0]
        saved = None if modes == ["forward"] else metrics.saved_bytes(
            lambda: layers[0].forward(t.x),
            [t.x, t.weight, t.lora_A, t.lora_B] + layers[0].inputs)
    except Exception as exc:  # recorded; the run's exit status says so
        return _failures(base, modes, exc)
    records = []
    for mode in modes:
        try:
            timed = _measure_mode(layers, sets, case, mode, provider.adapter, device, timing)
        except Exception as exc:
            records += _failures(base, [mode], exc)
            continue
        records.append({**base, "mode": mode, **timed, "status": "ok", "max_rel_err": error,
                        "saved_bytes": None if mode == "forward" else saved})
    if provider.compiled:  # a graph break or a recompile is worth seeing next to a time
        now_graphs, now_breaks = _compile_counts()
        for r in records:
            r.update(compiled_graphs=now_graphs - graphs, graph_breaks=now_breaks - breaks)
    return records


def run_case(case, providers, modes, device, timing, env, bias=True):
    """Every provider on one case, on the same inputs (with a trained bias unless
    ``bias`` is False): records that are timed, skipped, oom or error (a failing
    provider never stops the others)."""
    from .providers import compute_path
    first = make_inputs(case, device, seed=0, bias=bias)
    n_sets = metrics.rotation_count(first.nbytes(), device, timing.max_sets)
    sets = [first] + [make_inputs(case, device, seed=i, bias=bias) for i in range(1, n_sets)]
    records = []
    for provider in providers:
        runs = [m for m in modes if provider.runs(case, m)]
        if not runs:
            continue
        base = {**env, **_case_fields(case), "bias": bias, "provider": provider.name,
                "path": compute_path(provider, first), "rotation_sets": n_sets,
                "timer": "cuda-events" if device.type == "cuda" else "cpu-perf_counter"}
        if device.type != "cuda":
            base["note"] = CPU_NOTE
        reason = provider.unavailable()
        if reason:
            records += [{**base, "mode": m, "status": "skipped", "reason": reason}
                        for m in runs]
        else:
            with provider.environment():
                records += _provider_records(provider, sets, case, runs, device, timing, base)
        _release(device)
    del sets, first
    _release(device)
    return metrics.add_speedups(records)


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
