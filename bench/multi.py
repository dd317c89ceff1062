"""Several adapters in ``python -m bench.run --adapters N``: measured on the device.

One PEFT LoRA Linear (the case's shape, with a bias) holding N adapters of the
case's rank (alpha = 2 r), adapters in the case's dtype, inputs as the layer
cases make them. Two things are timed per case, each for PEFT as it is and for
the same model after ``patch_peft``:

- ``mixed`` (eval forward, no_grad): a batch of M rows split evenly among the N
  adapters (row m uses adapter m * N // M), ``adapter_names`` per row: PEFT's
  ``_mixed_batch_forward`` loop against lorakern's segmented rank pass and one GEMM;
- ``stacked`` (train, fwd+bwd): all N adapters active at once
  (``set_adapter([...])``): PEFT's loop over adapters against one stacked term.

Records carry ``"adapters": N``, the provider (``peft`` / ``lorakern``), the
``scenario`` and, for lorakern, its error against PEFT's output.
"""
import copy

import torch
from torch import nn

from . import metrics
from .cases import make_inputs


class _Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x, **kwargs):
        return self.proj(x, **kwargs)


def adapter_names(tokens, adapters):
    return [f"a{m * adapters // tokens}" for m in range(tokens)]


def build_models(case, adapters, device):
    """(PEFT model, the same model patched): N adapters on one Linear, B nonzero."""
    from peft import LoraConfig, get_peft_model

    import lorakern

    base = nn.Linear(case.d_in, case.d_out, device=device, dtype=case.torch_dtype)
    config = LoraConfig(r=case.rank, lora_alpha=2 * case.rank, target_modules=["proj"])
    model = get_peft_model(_Holder(base), config, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * p.shape[-1] ** -0.5)
    model = model.to(case.torch_dtype)
    patched = lorakern.patch_peft(copy.deepcopy(model))
    return model, patched


def _mixed_run(model, x, names):
    def run(i):
        with torch.no_grad():
            return model(x, adapter_names=names)
    return run


def _stacked_run(model, x, grad_y):
    def run(i):
        model(x).backward(grad_y)
    return run


def _timed(run, device, timing):
    times = metrics.time_calls(run, lambda i: None, device, timing.warmup_ms, timing.rep_ms,
                               timing.min_reps, timing.max_reps)
    return metrics.summarize(times)


def _record(base, provider, scenario, run, device, timing):
    record = {**base, "provider": provider, "scenario": scenario,
              "mode": "forward" if scenario == "mixed" else "fwd+bwd"}
    try:
        record.update(_timed(run, device, timing), status="ok")
    except Exception as exc:  # recorded; the run's exit status says so
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    return record


def run_case(case, adapters, device, timing, env):
    """The mixed and stacked records of one case (``status`` ok or error)."""
    base = {**env, "kind": "adapters", "case": str(case), "d_in": case.d_in,
            "d_out": case.d_out, "tokens": case.tokens, "rank": case.rank,
            "dtype": case.dtype, "adapters": adapters}
    try:
        peft_model, patched = build_models(case, adapters, device)
        t = make_inputs(case, device)
        x = t.x.detach()
        names = adapter_names(case.tokens, adapters)
    except Exception as exc:  # recorded; the run's exit status says so
        return [{**base, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}]
    records = []
    for model in (peft_model, patched):
        provider = "lorakern" if model is patched else "peft"
        records.append(_record(base, provider, "mixed", _mixed_run(model.eval(), x, names),
                               device, timing))
        if case.dropout == 0.0:
            model.base_model.set_adapter([f"a{i}" for i in range(adapters)])
            records.append(_record(base, provider, "stacked",
                                   _stacked_run(model.train(), x, t.grad_y), device, timing))
            model.base_model.set_adapter("a0")
    with torch.no_grad():
        want = peft_model.eval()(x, adapter_names=names).float()
        got = patched.eval()(x, adapter_names=names).float()
    error = metrics.relative_error(got, want)
    for record in records:
        if record["provider"] == "lorakern" and record["scenario"] == "mixed":
            record["max_rel_err_vs_peft"] = error
    return records


def table(records):
    """Median ms per case and scenario, PEFT against lorakern, and the speed-up."""
    rows = {}
    for r in records:
        if r.get("status") == "ok":
            rows.setdefault((r["case"], r["adapters"], r["scenario"]), {})[r["provider"]] = r
    lines = [f"{'case':48} {'N':>3} {'scenario':>8} {'peft ms':>9} {'lorakern ms':>11} "
             f"{'speed-up':>8}"]
    for (case, adapters, scenario), by in rows.items():
        if "peft" in by and "lorakern" in by:
            peft, ours = by["peft"]["median_ms"], by["lorakern"]["median_ms"]
            lines.append(f"{case:48} {adapters:>3} {scenario:>8} {peft:>9.4f} {ours:>11.4f} "
                         f"{peft / ours:>8.2f}")
    return "\n".join(lines)
