"""Several adapters in ``python -m bench.static --adapters N``: *predicted* times.

Per linear case (M tokens, K x N, rank r), with N adapters of rank r:

- ``lorakern:mixed`` (eval forward): a mixed-adapter batch, its M rows split
  evenly among the N adapters (row m uses adapter m * N // M), as
  ``mixed_batch_lora_linear`` runs it: the segments' one host-to-device copy,
  the segmented rank pass (kernels/segmented_lora.py) and the LoRA GEMM with the
  stack of the N adapters (rank N r) in its epilogue; launches captured on meta
  tensors, compiled for the target and priced as ``static_linear`` prices them.
- ``peft:adapter_names`` (eval forward): PEFT's ``_mixed_batch_forward`` priced
  op by op (``peft_mixed_ops``).
- ``lorakern:stacked`` (fwd and bwd, training): N adapters active at once, one
  term of rank N r: the layer at rank N r. The stack is cached (built again only
  after a parameter changes, once per optimizer step: 2 R (K + N) elements moved,
  left out here) and enters autograd as views; with equal scales (as here) its
  backward only slices the stack's gradients.
- ``lorakern:rank-Nr``: one adapter of rank N r, the stacked target's reference.

Every record carries ``"adapters": N``; the single-adapter ``lorakern`` rows of the
same case are the mixed batch's reference.
"""
from . import predicted


def _fields(case, adapters, rank=None):
    return {"M": case.tokens, "K": case.d_in, "N": case.d_out, "r": rank or case.rank,
            "dtype": case.dtype, "dropout": case.dropout, "adapters": adapters}


def _forward_record(fields, provider, seconds_bound):
    seconds, bound = seconds_bound
    return {**fields, "provider": provider, "mode": "fwd",
            "predicted_ms": round(seconds * 1e3, 4), "bound": bound}


def even_split(tokens, adapters):
    """Row m's adapter: the rows split into N contiguous, (nearly) equal groups."""
    return [m * adapters // tokens for m in range(tokens)]


def capture_mixed(case, adapters, arch):
    """The launches and torch ops of one mixed-batch forward, on meta tensors."""
    import torch

    from lorakern.functional import multi_adapter

    from . import capture

    t = capture.layer_tensors(case)
    rank = case.rank * adapters
    lora_A = torch.empty(rank, case.d_in, dtype=t["x"].dtype, device="meta")
    lora_B = torch.empty(case.d_out, rank, dtype=t["x"].dtype, device="meta")
    with torch.no_grad(), capture.recording(arch) as items:
        multi_adapter.mixed_batch_kernels(t["x"], t["weight"], lora_A, lora_B, case.scale,
                                    [case.rank] * adapters, even_split(case.tokens, adapters),
                                    t["bias"])
    return items


def peft_mixed_ops(case, adapters):
    """PEFT's ``_mixed_batch_forward`` (adapters in the layer's dtype, eval): the base
    layer once, then per adapter (m_i = M / N rows): x[rows] gathered, lora_A and
    lora_B, the scaling, and ``result[rows] += term`` (a gather, an in-place add,
    an index_put); each list index is a host-to-device copy of the row list."""
    from . import roofline

    m, k, n, r, e = case.tokens, case.d_in, case.d_out, case.rank, 2
    ops = list(roofline.linear_ops(case)["fwd"])
    for adapter in range(adapters):
        m_i = len([row for row in even_split(m, adapters) if row == adapter])
        mk, mn = m_i * k * e, m_i * n * e
        ops += [("row list to GPU (x[rows])", "elementwise", (m_i * 8,)),
                ("index x[rows]", "elementwise", (2 * mk,)),
                ("mm lora_A", "gemm", (m_i, r, k, 0)),
                ("mm lora_B", "gemm", (m_i, n, r, 0)),
                ("mul scaling", "elementwise", (2 * mn,)),
                ("row list to GPU (result[rows])", "elementwise", (m_i * 8,)),
                ("index result[rows]", "elementwise", (2 * mn,)),
                ("add_", "elementwise", (3 * mn,)),
                ("row list to GPU (index_put_)", "elementwise", (m_i * 8,)),
                ("index_put_", "elementwise", (2 * mn,))]
    return ops


def run(arch, machine, kernel_reports, cases, launch_log, adapters):
    """The several-adapter records of the static report."""
    from dataclasses import replace

    from . import roofline
    from .static_linear import fastest, predict_lorakern, price_items

    records = []
    for case in cases:
        if case.dropout > 0:  # the mixed batch is eval; stacked dropout runs PEFT's forward
            continue
        fields = _fields(case, adapters)
        mixed = price_items(capture_mixed(case, adapters, arch), case, "mixed", "fwd", arch,
                            machine, kernel_reports, launch_log)
        records.append(_forward_record(fields, "lorakern:mixed", mixed))
        peft = [roofline.predict_op(machine, kind, args)
                for _, kind, args in peft_mixed_ops(case, adapters)]
        records.append(_forward_record(fields, "peft:adapter_names",
                                       (sum(t for t, _ in peft), max(peft)[1])))
        wide = replace(case, rank=case.rank * adapters)
        by_strategy = [predict_lorakern(wide, arch, machine, kernel_reports, launch_log, s)
                       for s in ("fused", "cublas")]
        one_term = fastest(*by_strategy)
        records += predicted.records(_fields(case, adapters, wide.rank), "lorakern:rank-Nr",
                                     one_term)
        records += predicted.records(fields, "lorakern:stacked", one_term)
    return records


def format_table(records):
    """One line per case: the mixed batch against PEFT's loop and the single adapter,
    stacked against one adapter of rank N r."""
    by_case = {}
    for rec in records:
        key = (rec["K"], rec["N"], rec["M"], rec["dropout"], rec["r"])
        by_case.setdefault(key, {})[(rec["provider"], rec["mode"])] = rec
    lines = ["", "Several adapters (PREDICTED ms; mixed: eval forward, rows split evenly; "
             "stacked: training, N adapters of rank r active):",
             f"{'shape':>11} {'M':>6} {'N':>3} {'r':>4} {'mixed':>8} {'peft loop':>9} "
             f"{'single':>8} {'peft/mixed':>10} {'mixed/single':>12} {'stacked f+b':>11} "
             f"{'rank-Nr f+b':>11}"]
    for (k, n, m, p, r), recs in by_case.items():
        mixed = recs.get(("lorakern:mixed", "fwd"))
        if mixed is None:
            continue
        wide_recs = by_case[(k, n, m, p, r * mixed["adapters"])]
        peft = recs[("peft:adapter_names", "fwd")]["predicted_ms"]
        single = recs.get(("lorakern", "fwd"))
        single_ms = single["predicted_ms"] if single else float("nan")
        stacked = recs[("lorakern:stacked", "fwd+bwd")]["predicted_ms"]
        wide = wide_recs[("lorakern:rank-Nr", "fwd+bwd")]["predicted_ms"]
        lines.append(f"{f'{k}x{n}':>11} {m:>6} {mixed['adapters']:>3} {mixed['r']:>4} "
                     f"{mixed['predicted_ms']:>8.4f} {peft:>9.4f} {single_ms:>8.4f} "
                     f"{peft / mixed['predicted_ms']:>10.2f} "
                     f"{mixed['predicted_ms'] / single_ms:>12.3f} {stacked:>11.4f} {wide:>11.4f}")
    return "\n".join(lines)
