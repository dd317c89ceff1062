"""Predicted H100 / A100 times of lorakern and its baselines, from the compiled code.

    python -m bench.static                         # quick preset, sm_90
    python -m bench.static --arch sm_80 --set llama-mlp --json out.json
    python -m bench.static --shapes 4096x4096 --tokens 8192 --ranks 16,64 --dropout 0.1

No GPU is needed. For every case, the forward and the training backward (W
frozen, bias trained: dX, dA, dB, db) run on meta tensors with every Triton
launch captured instead of run (``bench.capture``); each distinct launch is
compiled for the target (``bench.sass``: registers, spills, shared memory,
wgmma, TMA, the main loop's instruction mix) and priced by a roofline whose
constants are printed with the table (``bench.roofline``). nn.Linear (cuBLAS)
and eager PEFT are priced op by op with the same constants. Every time is a
*prediction*; ``python -m bench.run`` measures on a GPU.

This is the driver: each layer type's predictions are in its own module
(``static_linear.py``, ``static_embedding.py``), as its timed path is
(``linear.py``, ``embedding.py``) under ``bench.run``.

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .cases import PRESETS, make_cases

ARCHS = {"sm_90": 90, "sm_80": 80}
PROVIDERS = ("lorakern", "lorakern:fused", "lorakern:cublas", "nn.Linear", "peft")


def _list(kind=str):
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.static",
                                description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="sm_90")
    p.add_argument("--set", choices=sorted(PRESETS), default="quick")
    p.add_argument("--shapes", type=_list(), help="INxOUT,... e.g. 4096x4096,14336x4096")
    p.add_argument("--tokens", type=_list(int), help="token counts M, e.g. 16,2048,8192")
    p.add_argument("--ranks", type=_list(int), help="LoRA ranks, e.g. 16,64,128")
    p.add_argument("--dropout", type=_list(float), help="dropout probabilities, e.g. 0,0.1")
    p.add_argument("--adapters", type=int, help="also N adapters of rank r: a mixed batch "
                   "(rows split evenly, eval) and N stacked active adapters (bench.static_multi)")
    p.add_argument("--json", help="write the kernels and records to this JSON file")
    p.add_argument("--no-embedding", action="store_true",
                   help="leave out the LoRA embedding case (vocab 49152, dim 2048, 8192 tokens)")
    p.add_argument("--launches", action="store_true",
                   help="also print every lorakern launch with its roofline terms")
    p.add_argument("--launches-json", help="write every lorakern launch (what was compiled, "
                   "its trip count and roofline terms) to this JSON file")
    return p.parse_args(argv)


def selected_cases(args):
    grid = dict(PRESETS[args.set])
    for name in ("shapes", "tokens", "ranks", "dropout"):
        if getattr(args, name):
            grid[name] = tuple(getattr(args, name))
    if grid["dtypes"] != ("bf16",):
        grid["dtypes"] = ("bf16",)  # the roofline's constants are bf16 ones
    return make_cases(**grid)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def assumptions(arch, machine):
    import triton
    return {"figures": "predicted (roofline from compiled code; nothing was run on a GPU)",
            "arch": f"sm_{arch}", "machine": machine.as_json(),
            "triton": triton.__version__, "commit": git_commit(),
            "case": "W frozen, bias trained: dX, dA, dB, db; bf16; scale = 2",
            "model": "time per launch = max(tensor, issue, HBM, L2) + launch; see "
                     "bench/roofline.py and bench/NOTES.md"}


def run(args):
    from . import roofline, static_embedding, static_linear

    arch = ARCHS[args.arch]
    machine = roofline.MACHINES[arch]
    kernel_reports, launch_log = {}, []
    records = static_linear.run(arch, machine, kernel_reports, selected_cases(args), launch_log)
    if getattr(args, "adapters", None):
        from . import static_multi
        records += static_multi.run(arch, machine, kernel_reports, selected_cases(args),
                                    launch_log, args.adapters)
    if not getattr(args, "no_embedding", False):
        records += static_embedding.run(arch, machine, kernel_reports)
    result = {"assumptions": assumptions(arch, machine),
              "kernels": [r.as_json() for r in kernel_reports.values()],
              "records": records}
    return result, launch_log


def format_launches(launch_log):
    lines = ["", "lorakern launches (predicted us; terms in us):"]
    for case, strategy, phase, item, seconds, bound, d in launch_log:
        terms = " ".join(f"{k}={d[k] * 1e6:.1f}" for k in ("tensor", "issue", "hbm", "l2")
                         if k in d)
        extra = (f"grid={d['grid']} trips={d['trips']} ctas/SM={d['ctas_per_sm']} "
                 f"busiest={d['busiest_sm_ctas']}" if "grid" in d else f"bytes={d['bytes']}")
        lines.append(f"  {case} {strategy} {phase} {item.name}: {seconds * 1e6:.1f} ({bound}) "
                     f"{terms} {extra}")
    return "\n".join(lines)


def format_tables(result):
    a = result["assumptions"]
    lines = [f"PREDICTED times (no GPU was used) for {a['machine']['name']}, triton "
             f"{a['triton']}, commit {a['commit']}; {a['case']}", "",
             "Constants: " + ", ".join(f"{k}={v}" for k, v in a["machine"].items()
                                       if k not in ("sources", "name")),
             "Sources: " + a["machine"]["sources"], "",
             f"{'kernel':26} {'regs':>4} {'spill':>5} {'smem':>7} {'warps':>5} {'stages':>6} "
             f"{'wgmma':>5} {'tma':>4} {'loop':>5} {'mma':>4} {'IMAD.HI':>7}"]
    for k in result["kernels"]:
        loop = k["sass"]["main_loop"] or {}
        mma = loop.get("HGMMA", 0) + loop.get("HMMA", 0)
        lines.append(f"{k['name']:26} {k['regs']:>4} {k['spills']:>5} {k['shared_bytes']:>7} "
                     f"{k['num_warps']:>5} {k['num_stages']:>6} {str(k['wgmma']):>5} "
                     f"{str(k['tma']):>4} {loop.get('total', 0):>5} {mma:>4} "
                     f"{loop.get('imad_hi', 0):>7}")
    lines += ["", "(loop: main-loop SASS instructions; mma and IMAD.HI: in the main loop)", "",
              f"{'shape':>11} {'M':>6} {'r':>4} {'p':>4}  " + "  ".join(
                  f"{p:>28}" for p in PROVIDERS)]
    groups = {}
    for rec in result["records"]:
        if rec["provider"] not in PROVIDERS:
            continue
        key = (rec["K"], rec["N"], rec["M"], rec["r"], rec["dropout"])
        groups.setdefault(key, {})[(rec["provider"], rec["mode"])] = rec
    for (k, n, m, r, p), recs in groups.items():
        cells = []
        for provider in PROVIDERS:
            f, b, fb = (recs[(provider, mode)] for mode in ("fwd", "bwd", "fwd+bwd"))
            cells.append(f"{f['predicted_ms']:.3f}+{b['predicted_ms']:.3f}="
                         f"{fb['predicted_ms']:.3f} {fb['bound'][:5]:>5}")
        lines.append(f"{f'{k}x{n}':>11} {m:>6} {r:>4} {p:>4g}  " + "  ".join(
            f"{c:>28}" for c in cells))
    lines.append("(cells: fwd + bwd = fwd+bwd predicted ms, and the bound of the slowest launch)")
    from .static_embedding import PROVIDERS as EMBEDDING_PROVIDERS, format_table
    embedding_rows = [rec for rec in result["records"]
                      if rec["provider"] in EMBEDDING_PROVIDERS.values()]
    if embedding_rows:
        lines.append(format_table(embedding_rows))
    if any("adapters" in rec for rec in result["records"]):
        from .static_multi import format_table as format_multi
        lines.append(format_multi(result["records"]))
    return "\n".join(lines)


def _later_loop_instructions(report, details):
    """Per warp, the loops after the main loop times their trips (as priced)."""
    later, trips = report.later_loops, details["later_trips"]
    if len(trips) != len(later):
        trips = [1] * len(later)
    return sum(loop["instructions"] * (n if n is not None else 1)
               for loop, n in zip(later, trips))


def describe_launches(launch_log):
    """Every lorakern launch as JSON: the case, what was compiled and its roofline terms."""
    rows = []
    for case, strategy, phase, item, seconds, bound, d in launch_log:
        row = {"shape": case.shape, "M": case.tokens, "r": case.rank, "dropout": case.dropout,
               "strategy": strategy, "phase": phase, "name": item.name, "predicted_us": seconds * 1e6,
               "bound": bound}
        if "report" in d:
            report = d["report"]
            row.update(launcher=item.launcher, grid=list(item.grid), programs=item.programs,
                       trips=d["trips"], meta=item.meta, ints=item.ints,
                       kernel=report.as_json(), spill_instructions=report.spill_instructions,
                       main_loop_instructions=report.main_loop_instructions,
                       other_instructions=report.other_instructions,
                       loop_global_bytes=report.loop_global_bytes,
                       later_loop_instructions=_later_loop_instructions(report, d),
                       terms_us={k: d[k] * 1e6 for k in ("tensor", "issue", "hbm", "l2")},
                       ctas_per_sm=d["ctas_per_sm"])
        else:
            row["bytes"] = d["bytes"]
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench.static compiles the kernels for a GPU: run it with TRITON_INTERPRET "
                 "unset or 0")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default, said quietly
    result, launch_log = run(args)
    print(format_tables(result))
    if args.launches:
        print(format_launches(launch_log))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.launches_json:
        Path(args.launches_json).write_text(
            json.dumps(describe_launches(launch_log), indent=1, default=str) + "\n")
        print(f"wrote {args.launches_json}")


if __name__ == "__main__":
    main()
