"""Results out: the console table, JSON, a markdown table and a PNG plot.

``python -m bench.report RESULTS.json`` rebuilds the markdown and the PNG from
a JSON file (e.g. on another machine, where matplotlib is installed).
"""
import json
import re
import sys
import textwrap
from pathlib import Path

from .metrics import REL_ERR_LIMIT

STATUS_CELL = {"skipped": "skipped", "oom": "OOM", "error": "error"}


# ------------------------------------------------------------------ tables
def _render(header, rows):
    """An aligned markdown table (readable as plain text too)."""
    cells = [header] + rows
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def _ms(r):
    if r is None:
        return "—"
    if r["status"] != "ok":
        return STATUS_CELL.get(r["status"], r["status"])
    return f"{r['median_ms']:.4g} ({r['p20_ms']:.4g}–{r['p80_ms']:.4g})"


def _size(value):
    """Bytes, readably: 0, 512 B, 2.0 KiB, 1.01 MiB, 3.2 GiB; n/a for None."""
    if value is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value} B"


def _providers(records):
    return list(dict.fromkeys(r["provider"] for r in records))


def _by(records, *keys):
    out = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), {})[r["provider"]] = r
    return out


def _memory_cell(r, parts):
    if r is None or r["status"] != "ok":
        return _ms(r)
    return " / ".join(_size(r.get(k)) for k in parts)


def layer_tables(records, focus="lorakern"):
    """{mode: (timing table, memory table or None)} for the layer records."""
    tables = {}
    for mode in dict.fromkeys(r["mode"] for r in records):
        rows_in = [r for r in records if r["mode"] == mode]
        providers = _providers(rows_in)
        has_focus = focus in providers
        others = [p for p in providers if p != focus] if has_focus else []
        header = (["case"] + [f"{p} ms" for p in providers]
                  + [f"{focus} TFLOP/s"] * has_focus + [f"{focus} vs {p}" for p in others])
        # memory columns that hold a number: peak needs CUDA; saved bytes are shown
        # with fwd+bwd (the backward mode's records repeat them)
        parts = [k for k in ("peak_mem_bytes", "saved_bytes")
                 if any(r.get(k) is not None for r in rows_in)
                 and not (k == "saved_bytes" and mode == "backward")]
        names = {"peak_mem_bytes": "peak", "saved_bytes": "saved"}
        mem_header = ["case"] + [f"{p} {' / '.join(names[k] for k in parts)}"
                                 for p in providers]
        rows, mem_rows = [], []
        for (case,), group in _by(rows_in, "case").items():
            mine = group.get(focus, {})
            speed = mine.get("speedup_vs", {}) if mine.get("status") == "ok" else {}
            tf = f"{mine['tflops']:.3g}" if mine.get("status") == "ok" else "—"
            rows.append([case] + [_ms(group.get(p)) for p in providers] + [tf] * has_focus
                        + [f"{speed[p]:.2f}x" if p in speed else "—" for p in others])
            mem_rows.append([case] + [_memory_cell(group.get(p), parts) for p in providers])
        memory = (names, parts, _render(mem_header, mem_rows)) if parts else None
        tables[mode] = (_render(header, rows), memory)
    return tables


def e2e_table(records):
    """One row per provider; each row's speedup over every baseline (not lorakern)."""
    providers = _providers(records)
    baselines = [p for p in providers if not p.startswith("lorakern")]
    header = (["config", "provider", "path", "step ms", "tokens/s", "peak memory",
               "first loss"] + [f"speedup vs {p}" for p in baselines])
    rows = []
    for (config,), group in _by(records, "config").items():
        for p in providers:
            r = group.get(p)
            if r is None:
                continue
            ok = r["status"] == "ok"
            speed = r.get("speedup_vs", {}) if ok else {}
            rows.append([config, p, r["path"], _ms(r),
                         f"{r['tokens_per_s']:.4g}" if ok else "—",
                         _size(r.get("peak_mem_bytes")) if ok else "—",
                         f"{r['first_loss']:.5g}" if ok else "—"]
                        + [f"{speed[b]:.2f}x" if b in speed else "—" for b in baselines])
    return _render(header, rows)


def _problem(r):
    """Why a record needs a reader's attention, or None."""
    if r["status"] != "ok":
        return r["status"] + (f": {r['reason']}" if r.get("reason") else "")
    err, limit = r.get("max_rel_err"), REL_ERR_LIMIT.get(r.get("dtype"))
    if err is not None and limit is not None and err > limit:
        return f"WRONG OUTPUT: forward off the fp32 reference by {err:.2g} (limit {limit:g})"
    if r.get("lorakern_calls_per_forward") not in (None, r.get("lora_linears")):
        return (f"lorakern.lora_linear ran {r['lorakern_calls_per_forward']} times in a "
                f"forward of {r['lora_linears']} LoRA linears: the fused path is not (only) "
                "what ran")
    return None


def problems(doc):
    """One line per record that was not timed (skipped, OOM, error) or looks
    wrong (output off the reference, lorakern not running every LoRA linear)."""
    seen, lines = set(), []
    for r in doc["layer"] + doc["e2e"]:
        why = _problem(r)
        if why is None:
            continue
        where = r.get("case") or r.get("config")
        line = f"- {r['provider']} ({r['kind']}, {where}): {why}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


# ---------------------------------------------------------------- markdown
def markdown(doc):
    env = doc["environment"]
    out = [f"# lorakern benchmark: {env['device']}, {env['date'][:10]}", ""]
    if env["device_type"] != "cuda":
        out += [f"> **{doc['label']}**", ""]
    out += [_render(["device", "torch", "triton", "CUDA", "peft", "transformers", "commit"],
                    [[env["device"], env["torch"], env["triton"], env["cuda"], env["peft"],
                      env["transformers"],
                      f"{(env['git_commit'] or 'unknown')[:12]}"
                      f"{' (dirty)' if env['git_dirty'] else ''}"]]), "",
            f"Command: `{doc['command']}`", "", "Providers:", ""]
    out += [f"- `{name}`: {text}" for name, text in doc["providers"].items()]
    out += ["", doc["method"], ""]
    if env["device_type"] != "cuda":
        out += ["Peak memory is measured on CUDA only (torch keeps no CPU counter).", ""]
    for mode, (timing, memory) in layer_tables(doc["layer"]).items():
        out += [f"## Layer, {mode}", "", timing, ""]
        if memory:
            names, parts, table = memory
            what = {"peak_mem_bytes": "peak allocated above the inputs",
                    "saved_bytes": "bytes saved for backward"}
            out += [f"Memory, {mode}: {' / '.join(what[k] for k in parts)}", "",
                    table, ""]

    if doc["e2e"]:
        r = doc["e2e"][0]
        out += ["## Training step, Llama-style decoder", "",
                f"One step (forward, backward, AdamW) of `{r['config']}`: {r['layers']} "
                f"Llama blocks, hidden {r['hidden']}, MLP {r['intermediate']}, vocabulary "
                f"{r['vocab']}, {r['batch']} x {r['seq']} tokens, {r['dtype']}; LoRA r="
                f"{r['rank']}, alpha={r['alpha']}, dropout={r['dropout']} on "
                f"{', '.join(r['targets'])}; adapters {r['adapter_dtype_requested']}. "
                "Random weights from a transformers config. `peft`: get_peft_model; "
                "`peft-compile`: torch.compile of it; `lorakern`: the same PEFT model "
                "after lorakern.patch_peft; `lorakern-inject`: "
                "lorakern.inject_lora on the base model (lorakern's modules and "
                "adapter initialisation, hence another first loss). Peak memory: all "
                "allocated memory, weights and optimizer state included.", "",
                e2e_table(doc["e2e"]), ""]
    if doc.get("embedding"):
        from .embedding import table as embedding_table
        r = doc["embedding"][0]
        out += ["## LoRA embedding", "",
                f"`{r['case']}`: one table, adapters of the table's dtype promoted to fp32 "
                "as PEFT's default; `embedding`: nn.Embedding alone (the floor); `peft`: "
                "PEFT's LoRA Embedding; `lorakern`: LoRAEmbedding. Forward under no_grad; "
                "fwd+bwd with the adapters trained, the table frozen.", "",
                embedding_table(doc["embedding"]), ""]
    lines = problems(doc)
    if lines:
        out += ["## Not timed, or worth a look", ""] + lines + [""]
    return "\n".join(out)


# --------------------------------------------------------------------- plot
def plot(doc, path, focus="lorakern"):
    """Speedup of ``focus`` over each provider, per case, one panel per mode.
    Returns None, or why no PNG was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed: no PNG written (pip install matplotlib, "
                f"then python -m bench.report {path.with_suffix('.json')})")
    modes = list(dict.fromkeys(r["mode"] for r in doc["layer"]))
    panels = len(modes) + bool(doc["e2e"])
    if panels == 0:
        return "nothing to plot"
    fig, axes = plt.subplots(panels, 1, figsize=(12, 3.6 * panels), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        groups = _by([r for r in doc["layer"] if r["mode"] == mode], "case")
        cases = list(groups)
        for p in _providers(doc["layer"]):
            if p == focus:
                continue
            xs, ys = [], []
            for i, key in enumerate(cases):
                speed = groups[key].get(focus, {}).get("speedup_vs", {})
                if p in speed:
                    xs.append(i)
                    ys.append(speed[p])
            if xs:
                ax.plot(xs, ys, "o-", label=f"vs {p}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([k[0] for k in cases], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{focus} speedup (x)")
        ax.set_title(f"layer, {mode}")
        ax.legend(fontsize=7)
    if doc["e2e"]:
        ax = axes[-1, 0]
        ok = [r for r in doc["e2e"] if r["status"] == "ok"]
        ax.bar([r["provider"] for r in ok],
               [r["tokens_per_s"] for r in ok])
        ax.set_ylabel("tokens/s")
        ax.set_title("training step, Llama-style decoder"
                     + (f" ({ok[0]['config']})" if ok else ""))
    env = doc["environment"]
    commit = (env["git_commit"] or "unknown")[:12]
    title = f"lorakern: {env['device']}, {commit}, {env['date'][:10]}"
    if env["device_type"] != "cuda":
        title += "\n" + "\n".join(textwrap.wrap(doc["label"], 110))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------- files
def output_stem(out_dir, env):
    """bench/results/<device>-<date>, with -2, -3... rather than overwrite."""
    device = "cpu-smoke" if env["device_type"] != "cuda" else env["device"]
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    stem = Path(out_dir) / f"{slug}-{env['date'][:10]}"
    n = 1
    while any(Path(f"{stem}{'' if n == 1 else f'-{n}'}{ext}").exists()
              for ext in (".json", ".md", ".png")):
        n += 1
    return Path(f"{stem}{'' if n == 1 else f'-{n}'}")


def write(doc, stem):
    """JSON, markdown, PNG; returns the paths written and a note on the PNG."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (stem.with_suffix(s) for s in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown(doc))
    why = plot(doc, png_path)
    return [json_path, md_path] + ([] if why else [png_path]), why


def main(argv=None):
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        doc = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(doc))
        png = path.with_suffix(".png")
        why = plot(doc, png)
        print(f"wrote {path.with_suffix('.md')}" + (f"; {why}" if why else f" and {png}"))


if __name__ == "__main__":
    main()
