"""``python -m bench.verify``: the GPU check for a machine at hand for minutes only.

    python -m bench.verify              # on a GPU: about 5-8 minutes on one H100 / H200
    python -m bench.verify --dry-run    # anywhere: what it would run; exits 0

It runs, each step with its own time limit (the sum stays under 8 minutes):

1. the CUDA-marked tests (``pytest -m gpu``);
2. ``bench.static`` for the quick preset at both adapter dtypes (fp32, PEFT's default,
   and the base dtype), compiled for the GPU's arch: the *predicted* times. It needs no
   GPU and runs in a subprocess beside steps 1 and 3;
3. ``bench.run`` on the same cases (layers only, with the trained bias): the measured
   times of nn.Linear, PEFT as ``get_peft_model`` builds it by default, and lorakern
   (tuned and each strategy). peft-compile is left out (inductor compiles each case
   anew, minutes in all);
4. QLoRA: ``bench.static`` (beside the others) and ``bench.run`` with ``--base nf4``
   (NF4 double quantisation, fp32 adapters, dropout 0.1) at 4096 x 4096, r = 16,
   decode (M = 16) and M = 8192: nn.Linear, PEFT QLoRA, the dequantise-then-cuBLAS
   composition and lorakern over the same bitsandbytes base;

and writes ``bench/results/verify-<device>-<date>.{json,md}``: every case with measured
beside predicted and measured / predicted, plus device, versions and commit. The
predictions use the constants of ``bench/roofline.py`` for the arch (sm_90: H100 SXM; an
H200 has more HBM bandwidth, so memory-bound launches should measure faster than
predicted there). bench.run's forward runs under no_grad; the prediction is the training
forward (which also stores h): the forward ratio is a little optimistic for that.

Without CUDA it only prints the plan (as ``--dry-run``) and exits 0.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# tests, run and run-qlora in sequence (450 s); the two static steps beside them
STEP_LIMITS_S = {"tests": 150, "static": 420, "static-qlora": 420, "run": 240,
                 "run-qlora": 60}
SEQUENTIAL_STEPS = ("tests", "run", "run-qlora")
BACKGROUND_STEPS = ("static", "static-qlora")
RUN_PROVIDERS = ("linear", "peft", "lorakern", "lorakern:fused", "lorakern:cublas")
QLORA_PROVIDERS = ("linear", "peft-qlora", "dequant-addmm", "lorakern", "lorakern:fused",
                   "lorakern:cublas")
QLORA_CASE = ["--shapes", "4096x4096", "--tokens", "16,8192", "--ranks", "16",
              "--dropout", "0.1", "--adapter-dtype", "fp32"]
# bench.run's provider and mode names -> bench.static's, per base
PREDICTED_PROVIDER = {"linear": "nn.Linear", "peft": "peft", "lorakern": "lorakern",
                      "lorakern:fused": "lorakern:fused", "lorakern:cublas": "lorakern:cublas"}
PREDICTED_QLORA_PROVIDER = {"linear": "nn.Linear", "peft-qlora": "peft QLoRA",
                            "dequant-addmm": "dequant+cuBLAS", "lorakern": "lorakern QLoRA",
                            "lorakern:fused": "lorakern QLoRA:fused",
                            "lorakern:cublas": "lorakern QLoRA:cublas"}
PREDICTED_MODE = {"forward": "fwd", "backward": "bwd", "fwd+bwd": "fwd+bwd"}
ARCHS = {9: "sm_90", 8: "sm_80"}  # compute capability major -> bench.static --arch


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.verify",
                                description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run and exit 0 (the default without CUDA)")
    p.add_argument("--out", default="bench/results", help="output folder")
    p.add_argument("--arch", choices=sorted(ARCHS.values()),
                   help="bench.static's target (default: the GPU's; sm_90 without one)")
    return p.parse_args(argv)


def commands(work, arch):
    """The steps' commands (argument lists), by step name."""
    python = sys.executable
    return {
        "tests": [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                  "tests"],
        "static": [python, "-m", "bench.static", "--arch", arch, "--set", "quick",
                   "--adapter-dtype", "fp32,base", "--no-embedding",
                   "--json", str(work / "predicted.json")],
        "run": [python, "-m", "bench.run", "--set", "quick", "--adapter-dtype", "fp32,base",
                "--bias", "on", "--providers", ",".join(RUN_PROVIDERS), "--no-e2e",
                "--no-embedding", "--warmup-ms", "10", "--rep-ms", "40",
                "--out", str(work / "measured")],
        "static-qlora": [python, "-m", "bench.static", "--arch", arch, "--base", "nf4",
                         *QLORA_CASE, "--json", str(work / "predicted-qlora.json")],
        "run-qlora": [python, "-m", "bench.run", "--base", "nf4", *QLORA_CASE, "--dtypes", "bf16",
                      "--bias", "on",
                      "--providers", ",".join(QLORA_PROVIDERS), "--no-e2e", "--no-embedding",
                      "--warmup-ms", "10", "--rep-ms", "40",
                      "--out", str(work / "measured-qlora")],
    }


def _static_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def plan_lines(cmds, stem):
    lines = [f"bench.verify would run (limits in seconds; {' and '.join(BACKGROUND_STEPS)} "
             f"beside {', '.join(SEQUENTIAL_STEPS)}):"]
    for name, cmd in cmds.items():
        lines.append(f"  [{name}, {STEP_LIMITS_S[name]} s] " + " ".join(cmd))
    lines.append(f"  then write {stem}.json and {stem}.md: measured beside predicted, "
                 "measured / predicted, device, versions, commit")
    return lines


def _device_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _run_step(cmd, limit, env=None):
    """(return code or 'timeout', seconds, last lines of the output)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code = "timeout"
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
    return code, round(time.perf_counter() - start, 1), "\n".join(text.splitlines()[-30:])


def join(measured, predicted):
    """One row per measured layer record that bench.static predicts: measured median,
    predicted, and measured / predicted (records without a base are bf16's)."""
    by = {(r["K"], r["N"], r["M"], r["r"], r["dropout"], r["adapter_dtype"],
           r.get("base", "bf16"), r["provider"], r["mode"]): r for r in predicted}
    rows = []
    for m in measured:
        base = m.get("base", "bf16")
        names = PREDICTED_PROVIDER if base == "bf16" else PREDICTED_QLORA_PROVIDER
        if m.get("status") != "ok" or m["provider"] not in names:
            continue
        key = (m["d_in"], m["d_out"], m["tokens"], m["rank"], m["dropout"], m["adapter_dtype"],
               base, names[m["provider"]], PREDICTED_MODE[m["mode"]])
        p = by.get(key)
        rows.append({"case": m["case"], "adapter_dtype": m["adapter_dtype"], "base": base,
                     "provider": m["provider"], "mode": m["mode"],
                     "measured_ms": m["median_ms"],
                     "predicted_ms": p["predicted_ms"] if p else None,
                     "predicted_bound": p["bound"] if p else None,
                     "measured_over_predicted":
                         round(m["median_ms"] / p["predicted_ms"], 3) if p else None})
    return rows


def markdown(doc):
    env = doc["environment"]
    lines = [f"# bench.verify on {env.get('device')} ({doc['date']})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"peft {env.get('peft')}, commit {env.get('git_commit')}"
             f"{' (dirty)' if env.get('git_dirty') else ''}; predictions for "
             f"{doc['arch']} ({doc['machine']}).", "",
             "## Steps", "", "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['exit']} | {s['seconds']} |" for name, s in doc["steps"].items()]
    lines += ["", "## Measured beside predicted (ms; ratio = measured / predicted)", "",
              "| case | provider | mode | measured | predicted | ratio | predicted bound |",
              "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        predicted = "" if r["predicted_ms"] is None else f"{r['predicted_ms']:.3f}"
        ratio = "" if r["measured_over_predicted"] is None else f"{r['measured_over_predicted']:.2f}"
        lines.append(f"| {r['case']} | {r['provider']} | {r['mode']} | {r['measured_ms']:.3f} "
                     f"| {predicted} | {ratio} | {r['predicted_bound'] or ''} |")
    return "\n".join(lines) + "\n"


def verify(args, arch):
    """Run the three steps on this GPU and write the files; returns the exit status."""
    import torch

    from . import metrics

    env = metrics.environment(torch.device("cuda"))
    date = datetime.date.today().isoformat()
    stem = Path(args.out) / f"verify-{_device_slug(env['device'])}-{date}"
    work = Path(tempfile.mkdtemp(prefix="lorakern-verify-"))
    cmds = commands(work, arch)
    print("\n".join(plan_lines(cmds, stem)), flush=True)
    background = {name: subprocess.Popen(cmds[name], cwd=ROOT, env=_static_env(),
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
                  for name in BACKGROUND_STEPS}
    start, steps = time.perf_counter(), {}
    for name in SEQUENTIAL_STEPS:
        code, seconds, tail = _run_step(cmds[name], STEP_LIMITS_S[name])
        steps[name] = {"exit": code, "seconds": seconds, "tail": tail}
        print(f"[{name}] exit {code} in {seconds} s\n{tail}", flush=True)
    for name, process in background.items():
        try:
            out, _ = process.communicate(timeout=max(1.0, STEP_LIMITS_S[name]
                                                     - (time.perf_counter() - start)))
            code = process.returncode
        except subprocess.TimeoutExpired:
            process.kill()
            out, code = process.communicate()[0], "timeout"
        steps[name] = {"exit": code, "seconds": round(time.perf_counter() - start, 1),
                       "tail": "\n".join((out or "").splitlines()[-30:])}
        print(f"[{name}] exit {code}", flush=True)
    predicted = {"records": [], "assumptions": None}
    for path in (work / "predicted.json", work / "predicted-qlora.json"):
        if path.exists():
            loaded = json.loads(path.read_text())
            predicted["records"] += loaded.get("records", [])
            predicted["assumptions"] = predicted["assumptions"] or loaded.get("assumptions")
    measured = []
    for folder in ("measured", "measured-qlora"):
        for path in sorted((work / folder).glob("*.json")):
            measured += json.loads(path.read_text()).get("layer", [])
    from .roofline import MACHINES
    doc = {"schema": "lorakern-verify/1", "date": date, "environment": env, "arch": arch,
           "machine": MACHINES[int(arch[3:])].name, "steps": steps,
           "rows": join(measured, predicted.get("records", [])),
           "predicted_assumptions": predicted.get("assumptions")}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {stem}.json, {stem}.md")
    return 0 if all(s["exit"] == 0 for s in steps.values()) else 1


def main(argv=None):
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    arch = args.arch or (ARCHS.get(torch.cuda.get_device_capability()[0], "sm_90")
                         if cuda else "sm_90")
    if args.dry_run or not cuda:
        date = datetime.date.today().isoformat()
        stem = Path(args.out) / f"verify-<device>-{date}"
        if not cuda:
            print("No CUDA device: a dry run.")
        work = Path(tempfile.gettempdir()) / "lorakern-verify-<id>"
        print("\n".join(plan_lines(commands(work, arch), stem)))
        return 0
    return verify(args, arch)


if __name__ == "__main__":
    sys.exit(main())
