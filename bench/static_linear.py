"""The LoRA linear layer in ``python -m bench.static``: *predicted* times of lorakern
(each strategy, and the faster per phase, as the tuner picks), nn.Linear and eager PEFT.

lorakern's forward and training backward run on meta tensors with every launch
captured (``capture.py``); each launch is compiled for the target (``sass.py``)
and priced by the roofline (``roofline.py``), each torch op by the bytes it
moves. nn.Linear (cuBLAS) and PEFT are priced op by op with the same constants
(``roofline.linear_ops`` / ``peft_default_ops``: PEFT as ``get_peft_model``
builds it by default for the case's adapter dtype).
"""
from . import predicted

STRATEGIES = ("fused", "cublas")
PHASES = ("fwd", "bwd")


def predict_lorakern(case, arch, machine, kernel_reports, launch_log=None, strategy=None):
    """{'fwd': (seconds, bound), 'bwd': ...} from the captured launches of
    ``strategy``; each launch's terms are appended to ``launch_log`` when given."""
    from . import capture

    return {phase: price_items(items, case, strategy, phase, arch, machine, kernel_reports,
                               launch_log)
            for phase, items in capture.capture_case(case, arch, strategy).items()}


def price_items(items, case, strategy, phase, arch, machine, kernel_reports, launch_log=None):
    """(seconds, bound of the slowest) of captured launches and torch ops, in order."""
    from . import capture, roofline, sass

    total, slowest = 0.0, (0.0, "none")
    for item in items:
        if isinstance(item, capture.KernelLaunch):
            report = sass.compile_launch(item, arch)
            kernel_reports.setdefault(item.compile_key(), report)
            all_trips = sass.loop_trips(report.ttir, item.ints)
            trips = all_trips[0] if all_trips else None
            work = roofline.kernel_work(report, item, trips, all_trips[1:])
            seconds, bound, details = roofline.predict_kernel(machine, work)
            details.update(grid=item.grid, trips=trips, later_trips=all_trips[1:],
                           report=report)
        else:
            seconds, bound = roofline.torch_op(machine, item.name, item.shapes,
                                               item.read_bytes, item.write_bytes)
            details = {"bytes": item.read_bytes + item.write_bytes}
        if launch_log is not None:
            launch_log.append((case, strategy, phase, item, seconds, bound, details))
        total += seconds
        slowest = max(slowest, (seconds, bound))
    return total, slowest[1]


def predict_ops(ops, machine):
    from . import roofline

    result = {}
    for phase, phase_ops in ops.items():
        timed = [roofline.predict_op(machine, kind, args) for _, kind, args in phase_ops]
        result[phase] = (sum(t for t, _ in timed), max(timed)[1])
    return result


def fastest(*strategies):
    """Per phase, the faster strategy's prediction: what the tuner picks (it
    times the forward and the grad-input separately)."""
    return {phase: min(s[phase] for s in strategies) for phase in PHASES}


def records_for(case, provider, phases):
    fields = {"M": case.tokens, "K": case.d_in, "N": case.d_out, "r": case.rank,
              "dtype": case.dtype, "adapter_dtype": case.adapter_label, "dropout": case.dropout}
    return predicted.records(fields, provider, phases)


def run(arch, machine, kernel_reports, cases, launch_log):
    """The linear records of the static report (kernels added to ``kernel_reports``,
    every lorakern launch to ``launch_log``)."""
    from . import roofline

    records = []
    for case in cases:
        by_strategy = {strategy: predict_lorakern(case, arch, machine, kernel_reports,
                                                  launch_log, strategy)
                       for strategy in STRATEGIES}
        records += records_for(case, "lorakern", fastest(*by_strategy.values()))
        for strategy, phases in by_strategy.items():
            records += records_for(case, f"lorakern:{strategy}", phases)
        records += records_for(case, "nn.Linear", predict_ops(roofline.linear_ops(case), machine))
        records += records_for(case, "peft", predict_ops(roofline.peft_default_ops(case),
                                                          machine))
    return records
