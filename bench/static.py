"""Predicted H100 / A100 times of lorakern and its baselines, from the compiled code.

    python -m bench.static                         # quick preset, sm_90
    python -m bench.static --arch sm_80 --set llama-mlp --json out.json
    python -m bench.static --shapes 4096x4096 --tokens 8192 --ranks 16,64 --dropout 0.1
    python -m bench.static --adapter-dtype base    # adapters in the base dtype (bf16)
    python -m bench.static --base nf4 --tokens 16,8192 --dropout 0.1   # QLoRA bases

No GPU is needed. For every case, the forward and the training backward (W
frozen, bias trained: dX, dA, dB, db) run on meta tensors with every Triton
launch captured instead of run (``bench.capture``); each distinct launch is
compiled for the target (``bench.sass``: registers, spills, shared memory,
wgmma, TMA, the main loop's instruction mix) and priced by a roofline whose
constants are printed with the table (``bench.roofline``). nn.Linear (cuBLAS)
and eager PEFT are priced op by op with the same constants. Every time is a
*prediction*; ``python -m bench.run`` measures on a GPU.

This is the driver: each layer type's predictions are in its own module
(``static_linear.py``, ``static_embedding.py``, ``static_dora.py``,
``static_qlora.py`` for bitsandbytes bases), as its timed path is
(``linear.py``, ``embedding.py``) under ``bench.run``.

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .cases import ADAPTER_DTYPES, PRESETS, make_cases

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
    p.add_argument("--variant", choices=("lora", "dora"), default="lora",
                   help="dora: lorakern DoRA, lorakern LoRA, nn.Linear and PEFT DoRA, "
                   "fp32 adapters (bench/static_dora.py)")
    add_adapter_dtype_argument(p)
    add_base_argument(p)
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


def add_adapter_dtype_argument(parser):
    """--adapter-dtype fp32|base|fp32,base (bench.static and bench.run)."""
    parser.add_argument(
        "--adapter-dtype", dest="adapter_dtypes", type=_adapter_dtypes,
        help="fp32 (PEFT's default: fp32 adapters on the 16-bit base), base (adapters in "
             "the base dtype) or fp32,base; default: fp32 with a custom grid, the preset's "
             "(quick: both) with none")


BASES = ("bf16", "nf4", "fp4", "int8")


def add_base_argument(parser):
    """--base bf16|nf4|fp4|int8[,...] (bench.static and bench.run)."""
    parser.add_argument(
        "--base", dest="bases", type=_bases, default=("bf16",),
        help="the base weight: bf16, or a bitsandbytes base (nf4, fp4: 4-bit with double "
             "quantisation, QLoRA's default; int8: LLM.int8()), comma-separated; "
             "default bf16")


def _bases(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in BASES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of {', '.join(BASES)}, "
                                         f"comma-separated")
    return tuple(dict.fromkeys(values))


def _adapter_dtypes(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ADAPTER_DTYPES]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected {' or '.join(ADAPTER_DTYPES)}, or both comma-separated")
    return tuple(dict.fromkeys(values))


def grid_adapter_dtypes(args, preset):
    """The flag's adapter dtypes; without it, the preset's when no grid flag narrows
    the cases, else fp32 (PEFT's default)."""
    if getattr(args, "adapter_dtypes", None):
        return tuple(args.adapter_dtypes)
    custom = any(getattr(args, name, None) for name in ("shapes", "tokens", "ranks",
                                                         "dropout", "dtypes"))
    return ("fp32",) if custom else tuple(preset.get("adapter_dtypes", ("fp32",)))


def selected_cases(args):
    grid = dict(PRESETS[args.set])
    grid["adapter_dtypes"] = grid_adapter_dtypes(args, grid)
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
            "case": "W frozen, bias trained: dX, dA, dB, db; bf16 base; adapters per record "
                    "(adapter_dtype: fp32 is PEFT's default); scale = 2",
            "model": "time per launch = max(tensor, issue, HBM, L2) + launch; see "
                     "bench/roofline.py and bench/NOTES.md"}


def run(args):
    from . import roofline, static_dora, static_embedding, static_linear, static_qlora

    arch = ARCHS[args.arch]
    machine = roofline.MACHINES[arch]
    kernel_reports, launch_log = {}, []
    variant = getattr(args, "variant", "lora")
    layer = static_dora if variant == "dora" else static_linear
    bases = tuple(getattr(args, "bases", None) or ("bf16",))
    quantised = [base for base in bases if base != "bf16"]
    if quantised and variant != "lora":
        raise SystemExit(f"--base {','.join(quantised)} prices LoRA over a quantised base; "
                         f"--variant {variant} has no quantised form")
    records = []
    if "bf16" in bases:
        records += layer.run(arch, machine, kernel_reports, selected_cases(args), launch_log)
    if quantised:
        records += static_qlora.run(arch, machine, kernel_reports, selected_cases(args),
                                    launch_log, quantised)
    if getattr(args, "adapters", None):
        from . import static_multi
        records += static_multi.run(arch, machine, kernel_reports, selected_cases(args),
                                    launch_log, args.adapters)
    if not getattr(args, "no_embedding", False) and variant == "lora" and "bf16" in bases:
        records += static_embedding.run(arch, machine, kernel_reports)
    for record in records:
        record.setdefault("variant", variant)
        record.setdefault("base", "bf16")
    result = {"assumptions": {**assumptions(arch, machine), "variant": variant},
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


def _providers(result):
    from .static_dora import PROVIDERS as DORA_PROVIDERS
    return DORA_PROVIDERS if result["assumptions"].get("variant") == "dora" else PROVIDERS


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
    lines += ["", "(loop: main-loop SASS instructions; mma and IMAD.HI: in the main loop)"]
    dense = [rec for rec in result["records"] if rec.get("base", "bf16") == "bf16"]
    if any(rec["provider"] in _providers(result) for rec in dense):
        lines += _provider_table(dense, _providers(result))
        lines += format_ratios(dense, _providers(result))
    quantised = [rec for rec in result["records"] if rec.get("base", "bf16") != "bf16"]
    if quantised:
        from .static_qlora import PROVIDERS as QLORA_PROVIDERS, format_targets
        for base in dict.fromkeys(rec["base"] for rec in quantised):
            lines += ["", f"base {base} (bitsandbytes):"]
            lines += _provider_table([rec for rec in quantised if rec["base"] == base],
                                     QLORA_PROVIDERS + ("lorakern QLoRA:fused",
                                                        "lorakern QLoRA:cublas"))
        lines += format_targets(quantised)
    from .static_embedding import PROVIDERS as EMBEDDING_PROVIDERS, format_table
    embedding_rows = [rec for rec in result["records"]
                      if rec["provider"] in EMBEDDING_PROVIDERS.values()]
    if embedding_rows:
        lines.append(format_table(embedding_rows))
    if any("adapters" in rec for rec in result["records"]):
        from .static_multi import format_table as format_multi
        lines.append(format_multi(result["records"]))
    return "\n".join(lines)


def _provider_table(records, providers):
    """One row per case, one cell per provider: fwd + bwd = fwd+bwd and the bound."""
    lines = ["", f"{'shape':>11} {'M':>6} {'r':>4} {'p':>4} {'adapt':>5}  " + "  ".join(
        f"{p:>28}" for p in providers)]
    groups = {}
    for rec in records:
        if rec["provider"] not in providers:
            continue
        key = (rec["K"], rec["N"], rec["M"], rec["r"], rec["dropout"], rec["adapter_dtype"])
        groups.setdefault(key, {})[(rec["provider"], rec["mode"])] = rec
    for (k, n, m, r, p, adapters), recs in groups.items():
        cells = []
        for provider in providers:
            f, b, fb = (recs[(provider, mode)] for mode in ("fwd", "bwd", "fwd+bwd"))
            cells.append(f"{f['predicted_ms']:.3f}+{b['predicted_ms']:.3f}="
                         f"{fb['predicted_ms']:.3f} {fb['bound'][:5]:>5}")
        lines.append(f"{f'{k}x{n}':>11} {m:>6} {r:>4} {p:>4g} {adapters:>5}  " + "  ".join(
            f"{c:>28}" for c in cells))
    lines.append("(cells: fwd + bwd = fwd+bwd predicted ms, and the bound of the slowest launch;"
                 " adapt: the adapters' dtype, fp32 = PEFT's default on a bf16 base)")
    return lines


RATIOS = {  # per variant: (ours, the floor, PEFT as built by default)
    "lorakern": ("lorakern", "nn.Linear", "peft"),
    "lorakern DoRA": ("lorakern DoRA", "lorakern LoRA", "peft DoRA"),
}


def format_ratios(records, providers=PROVIDERS):
    """fwd+bwd of lorakern against its floor (nn.Linear; lorakern's LoRA for DoRA) and
    PEFT as built by default, per case."""
    ours, floor, peft = RATIOS[providers[0]]
    by = {}
    for rec in records:
        if rec["provider"] in providers and rec["mode"] == "fwd+bwd":
            key = (rec["K"], rec["N"], rec["M"], rec["r"], rec["dropout"], rec["adapter_dtype"])
            by.setdefault(key, {})[rec["provider"]] = rec["predicted_ms"]
    lines = ["", f"fwd+bwd ratios (predicted): {ours} / {floor}, {peft} / {ours}"]
    for (k, n, m, r, p, adapters), ms in by.items():
        lines.append(f"  {k}x{n} M={m} r={r} p={p:g} adapters={adapters}: "
                     f"{ms[ours] / ms[floor]:.3f}x {floor}, "
                     f"{ms[peft] / ms[ours]:.2f}x faster than {peft}")
    return lines


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
               "adapter_dtype": case.adapter_label, "strategy": strategy, "phase": phase, "name": item.name, "predicted_us": seconds * 1e6,
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
