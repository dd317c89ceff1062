"""``python -m bench.run``: every LoRA-linear provider in one process, on the
same inputs; prints the tables and writes bench/results/<device>-<date>.{json,md,png}.

With CUDA the default is the ``quick`` layer set and a training step of a
4-layer Llama-3-8B-shaped decoder. Without CUDA it runs the ``cpu-smoke`` set:
lorakern's PyTorch reference path against PEFT and the others, timed with
time.perf_counter; those are not kernel timings.

Examples:
    python -m bench.run                              # quick set (GPU) / smoke (CPU)
    python -m bench.run --set full                   # the whole grid
    python -m bench.run --shapes 4096x14336 --tokens 2048,8192 --ranks 16,64 \\
        --dtypes bf16,fp16,fp32 --dropout 0,0.1 --providers peft,lorakern --modes fwd+bwd
    python -m bench.run --no-e2e                     # layers only
    python -m bench.run --adapter-dtype base --bias off   # bf16 adapters, no bias
    python -m bench.run --base nf4,int8 --no-e2e     # LoRA over bitsandbytes bases
    python -m bench.run --e2e-only --e2e-config llama3-8b-4layers
"""
import argparse
import dataclasses
import shlex
import sys
import time

import torch

from . import e2e, embedding, linear, metrics, report
from .cases import MODES, PRESETS, make_cases
from .dora_providers import PROVIDERS as DORA_PROVIDERS
from .providers import PROVIDERS, lorakern_path
from .qlora_providers import PROVIDER_NAMES as QLORA_PROVIDERS, providers as qlora_providers
from .static import add_adapter_dtype_argument, add_base_argument, grid_adapter_dtypes

CPU_PATHS = {"reference": "lorakern's PyTorch reference path (not its Triton kernels)",
             "triton-interpreter": "lorakern's Triton kernels in Triton's CPU interpreter"}


def cpu_label(path):
    return (f"CPU smoke run: {CPU_PATHS.get(path, path)} against PEFT and the other "
            "providers, timed with time.perf_counter. These are not kernel timings: "
            "kernel timings need CUDA.")


CPU_PROVIDERS = ("linear", "peft", "addmm", "merged", "lorakern")  # no compile: minutes on CPU
CPU_QLORA_PROVIDERS = ("linear", "peft-qlora", "dequant-addmm", "lorakern")
METHOD_CUDA = ("Timing: per-call CUDA events, calls back to back after a warm-up, median "
               "(p20–p80) in ms; inputs (x, W, A, B, dY) rotated over enough sets to "
               "overflow the L2 cache. TFLOP/s from the median and the FLOPs the math "
               "needs (see bench/metrics.py). `A vs B` = B's median / A's median (>1: A "
               "faster). Adapters as each record's adapter_dtype says (fp32: PEFT's "
               "default on a 16-bit base, PEFT built with autocast_adapter_dtype=True), "
               "scale = 2 (alpha = 2r), W frozen, bias trained unless the record's bias is "
               "false; forward runs under no_grad in training mode (dropout applies); "
               "backward times backward alone. Peak memory: max_memory_allocated above "
               "the inputs (backward: above the inputs and the forward's saved state). "
               "Saved: bytes autograd keeps for the backward, inputs excluded.")
METHOD_CPU = METHOD_CUDA.replace("per-call CUDA events", "time.perf_counter per call, one "
                                 "CPU thread").replace("overflow the L2 cache",
                                                       "cover twice a nominal 32 MiB cache")


def _list(kind=str):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=sorted(PRESETS),
                   help="layer preset (default: quick with CUDA, cpu-smoke without)")
    p.add_argument("--shapes", type=_list(), help="INxOUT,... e.g. 4096x4096,14336x4096")
    p.add_argument("--tokens", type=_list(int), help="token counts M, e.g. 1,16,2048")
    p.add_argument("--ranks", type=_list(int), help="LoRA ranks, e.g. 8,16,64,128")
    p.add_argument("--dtypes", type=_list(), help="bf16,fp16,fp32")
    p.add_argument("--dropout", type=_list(float), help="dropout probabilities, e.g. 0,0.1")
    add_adapter_dtype_argument(p)
    add_base_argument(p)
    p.add_argument("--bias", choices=("on", "off"), default="on",
                   help="the layer cases' trained bias, as the headline case has (default on)")
    p.add_argument("--providers", type=_list(), help=f"subset of {','.join(PROVIDERS)} "
                   f"(--variant dora: of {','.join(DORA_PROVIDERS)}; a bitsandbytes --base: "
                   f"of {','.join(QLORA_PROVIDERS)})")
    p.add_argument("--variant", choices=("lora", "dora"), default="lora",
                   help="dora: PEFT DoRA, lorakern DoRA, lorakern LoRA and nn.Linear "
                   "(bench/dora_providers.py); layers only")
    p.add_argument("--modes", type=_list(), help=f"subset of {','.join(MODES)}")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    p.add_argument("--adapters", type=int, help="also N adapters per case: a mixed batch "
                   "(rows split evenly) and N stacked active adapters, PEFT against "
                   "lorakern (bench/multi.py)")
    p.add_argument("--no-layers", action="store_true", help="skip the layer benchmarks")
    p.add_argument("--no-e2e", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--no-embedding", action="store_true",
                   help="skip the LoRA embedding benchmark (vocab 49152, dim 2048, 8192 tokens "
                        "with CUDA; a tiny case without)")
    p.add_argument("--e2e-only", action="store_true", help="= --no-layers")
    p.add_argument("--e2e-config", choices=sorted(e2e.CONFIGS),
                   help="default: llama3-8b-4layers with CUDA, cpu-tiny without")
    p.add_argument("--e2e-providers", type=_list(), help=f"subset of {','.join(e2e.PROVIDERS)}")
    p.add_argument("--e2e-steps", type=int, help="timed steps (default 10 CUDA, 5 CPU)")
    for field, kind in (("layers", int), ("batch", int), ("seq", int), ("rank", int),
                        ("alpha", int), ("dropout", float)):
        p.add_argument(f"--e2e-{field}", type=kind, help=f"override the config's {field}")
    p.add_argument("--e2e-adapter-dtype", choices=("fp32", "base"),
                   help="adapters in fp32 (PEFT's default, the default here) or the base dtype")
    p.add_argument("--warmup-ms", type=float, help="layer warm-up (default 25 CUDA, 5 CPU)")
    p.add_argument("--rep-ms", type=float, help="layer timing budget per provider and mode "
                                                "(default 100 CUDA, 30 CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out", default="bench/results", help="output folder")
    return p.parse_args(argv)


def _check(names, known, what):
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (expected {', '.join(known)})")
    return names


def _e2e_config(args, cuda):
    cfg = e2e.CONFIGS[args.e2e_config or ("llama3-8b-4layers" if cuda else "cpu-tiny")]
    fields = ("layers", "batch", "seq", "rank", "alpha", "dropout", "adapter_dtype")
    changes = {f: getattr(args, f"e2e_{f}") for f in fields
               if getattr(args, f"e2e_{f}") is not None}
    return dataclasses.replace(cfg, **changes)


def plan(args):
    """What to run, resolved from the flags and the device."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    preset = dict(PRESETS[args.set or ("quick" if cuda else "cpu-smoke")])
    preset["adapter_dtypes"] = grid_adapter_dtypes(args, preset)
    for key in (k for k in preset if k != "adapter_dtypes"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    known = DORA_PROVIDERS if getattr(args, "variant", "lora") == "dora" else PROVIDERS
    providers = args.providers or (list(known) if cuda or known is DORA_PROVIDERS
                                   else list(CPU_PROVIDERS))
    bases = tuple(getattr(args, "bases", None) or ("bf16",))
    quantised = [base for base in bases if base != "bf16"]
    if quantised and known is DORA_PROVIDERS:
        raise SystemExit(f"--variant dora with --base {','.join(quantised)}: DoRA over a "
                         f"quantised base is not benchmarked")
    e2e_providers = args.e2e_providers or [p for p in e2e.PROVIDERS
                                           if cuda or p != "peft-compile"]
    try:
        cases = make_cases(**preset)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    provider_sets = []  # (base, providers) in the order of --base
    for base in bases:
        if base == "bf16":
            provider_sets.append((base, [known[n] for n in
                                         _check(providers, list(known), "provider")]))
        else:
            table = qlora_providers(base)
            names = args.providers or (list(table) if cuda else list(CPU_QLORA_PROVIDERS))
            provider_sets.append((base, [table[n] for n in
                                         _check(names, list(table), f"--base {base} provider")]))
    return dict(
        device=torch.device("cuda" if cuda else "cpu"),
        cases=cases,
        providers=dict(provider_sets).get("bf16", []),
        provider_sets=provider_sets,
        modes=_check(args.modes or list(MODES), list(MODES), "mode"),
        timing=linear.Timing(warmup_ms=args.warmup_ms or (25.0 if cuda else 5.0),
                             rep_ms=args.rep_ms or (100.0 if cuda else 30.0),
                             max_sets=32 if cuda else 2),
        layers=not (args.no_layers or args.e2e_only),
        bias=args.bias == "on",
        e2e=None if args.no_e2e or known is DORA_PROVIDERS else _e2e_config(args, cuda),
        embedding=None if (args.no_embedding or args.e2e_only
                           or known is DORA_PROVIDERS) else (
            embedding.CUDA_CASE if cuda else embedding.CPU_CASE),
        e2e_providers=_check(e2e_providers, list(e2e.PROVIDERS), "e2e provider"),
        e2e_steps=args.e2e_steps or (10 if cuda else 5),
        adapters=args.adapters,
    )


def _environment(device):
    env = metrics.environment(device)
    env["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cpu":
        env["cpu_threads"] = torch.get_num_threads()
    return env


def measure(todo, env):
    """(layer records, e2e records, embedding records) for the plan."""
    device, layer_records, e2e_records, embedding_records = todo["device"], [], [], []
    if todo["layers"]:
        provider_sets = todo.get("provider_sets") or [("bf16", todo["providers"])]
        for base, providers in provider_sets:
            for i, case in enumerate(todo["cases"], 1):
                print(f"[{i}/{len(todo['cases'])}] {case} base={base}", flush=True)
                records = linear.run_case(case, providers, todo["modes"], device,
                                          todo["timing"], {**env, "base": base},
                                          bias=todo["bias"])
                if base != "bf16":  # its own rows in the tables
                    for record in records:
                        record["case"] += f" base={base}"
                layer_records += records
    if todo["e2e"] is not None:
        print(f"[e2e] {todo['e2e']}", flush=True)
        e2e_records = e2e.run_e2e(todo["e2e"], todo["e2e_providers"], device, env,
                                  steps=todo["e2e_steps"],
                                  warmup=3 if device.type == "cuda" else 1)
    if todo["embedding"] is not None:
        print(f"[embedding] {todo['embedding']}", flush=True)
        embedding_records = embedding.run_embedding(todo["embedding"], device, env,
                                                    todo["timing"])
    if todo.get("adapters"):
        from . import multi
        for case in todo["cases"]:
            print(f"[adapters={todo['adapters']}] {case}", flush=True)
            todo["adapter_records"] = todo.get("adapter_records", []) + multi.run_case(
                case, todo["adapters"], device, todo["timing"], env)
    return layer_records, e2e_records, embedding_records


def _print_tables(doc):
    print()
    for mode, (timing, _) in report.layer_tables(doc["layer"]).items():
        print(f"== layer, {mode} ==\n{timing}\n")
    if doc["e2e"]:
        print(f"== training step ==\n{report.e2e_table(doc['e2e'])}\n")
    if doc["embedding"]:
        print(f"== LoRA embedding ==\n{embedding.table(doc['embedding'])}\n")
    for line in report.problems(doc):
        print(line)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    todo = plan(args)
    device = todo["device"]
    label = "CUDA kernel timings"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        label = cpu_label(lorakern_path(device, torch.float32))
        print(("No CUDA device: " if not torch.cuda.is_available() else "") + label)
        if not args.providers:
            print("(peft-compile is left out on CPU: inductor takes minutes there; "
                  "--providers adds it back)")
    env = {**_environment(device), "variant": args.variant}
    start = time.perf_counter()
    layer_records, e2e_records, embedding_records = measure(todo, env)
    doc = {
        "schema": "lorakern-bench/1", "environment": env, "label": label,
        "command": " ".join(["python -m bench.run"] + [shlex.quote(a) for a in argv]),
        "providers": {p.name if base == "bf16" else f"{p.name} (--base {base})":
                      p.description for base, providers in todo["provider_sets"]
                      for p in providers},
        "method": METHOD_CUDA if device.type == "cuda" else METHOD_CPU,
        "seconds": round(time.perf_counter() - start, 1),
        "layer": layer_records, "e2e": e2e_records, "embedding": embedding_records,
    }
    if todo.get("adapter_records"):
        doc["adapters"] = todo["adapter_records"]
        from .multi import table
        print(f"== several adapters (N={todo['adapters']}) ==\n{table(doc['adapters'])}\n")
    _print_tables(doc)
    paths, why = report.write(doc, report.output_stem(args.out, env))
    print("wrote " + ", ".join(map(str, paths)))
    if why:
        print(why)
    if device.type != "cuda":
        print("Reminder: " + label)
    records = layer_records + e2e_records + embedding_records + doc.get("adapters", [])
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
