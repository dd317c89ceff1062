"""The LoRA embedding benchmark: lorakern's ``LoRAEmbedding`` against PEFT's LoRA
``Embedding`` and the bare ``nn.Embedding`` (the floor), forward and forward+backward.

The case with CUDA is a StarCoder-sized input embedding (the GPTBigCode tutorial's
``wte``): vocab 49152, dim 2048, 8192 tokens, r = 16, a bf16 table with fp32
adapters (PEFT's default). Without CUDA a tiny case runs as a smoke test.
"""
import traceback
from dataclasses import asdict, dataclass

import torch

from lorakern import LoRAEmbedding

from . import metrics


@dataclass(frozen=True)
class EmbeddingCase:
    vocab: int
    dim: int
    tokens: int
    rank: int
    dtype: str = "bf16"
    alpha: int = 8

    def __str__(self):
        return f"embedding {self.vocab}x{self.dim} T={self.tokens} r={self.rank} {self.dtype}"


CUDA_CASE = EmbeddingCase(vocab=49152, dim=2048, tokens=8192, rank=16)
CPU_CASE = EmbeddingCase(vocab=1000, dim=64, tokens=256, rank=8, dtype="fp32")
PROVIDERS = ("embedding", "peft", "lorakern")
MODES = ("forward", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _layers(case, device):
    """{provider: (module, trainable tensors)} sharing one table and one adapter."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(case.vocab, case.dim, device=device,
                               dtype=DTYPES[case.dtype]).requires_grad_(False)
    ours = LoRAEmbedding.from_embedding(table, r=case.rank, alpha=case.alpha)
    with torch.no_grad():
        ours.lora_A.normal_()
    built = {"embedding": (table, []), "lorakern": (ours, [ours.lora_A, ours.lora_B])}
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Embedding as PeftEmbedding
    except ImportError:
        return built
    config = LoraConfig(r=case.rank, lora_alpha=case.alpha, target_modules=["x"])
    theirs = PeftEmbedding(table, "default", config, r=case.rank, lora_alpha=case.alpha)
    with torch.no_grad():
        theirs.lora_embedding_A["default"].copy_(ours.lora_A)
        theirs.lora_embedding_B["default"].copy_(ours.lora_B)
    built["peft"] = (theirs, [theirs.lora_embedding_A["default"],
                              theirs.lora_embedding_B["default"]])
    return built


def _calls(module, trainable, ids, grad_y, mode):
    def reset(_):
        for t in trainable:
            t.grad = None

    if mode == "forward":
        def run(_):
            with torch.no_grad():
                module(ids)
        return (lambda _: None), run

    def run(_):
        out = module(ids)
        if out.requires_grad:
            out.backward(grad_y)
    return reset, run


def run_embedding(case, device, env, timing):
    """One record per provider and mode: median and p20/p80 ms, peak memory, status."""
    ids = torch.randint(0, case.vocab, (case.tokens,), device=device)
    grad_y = torch.randn(case.tokens, case.dim, device=device, dtype=DTYPES[case.dtype])
    records = []
    layers = _layers(case, device)
    for provider in PROVIDERS:
        for mode in MODES:
            record = {"case": str(case), **asdict(case), "provider": provider, "mode": mode,
                      "device": env.get("device"), "environment": env}
            if provider not in layers:
                records.append({**record, "status": "unavailable (peft not installed)"})
                continue
            try:
                prepare, run = _calls(*layers[provider], ids, grad_y, mode)
                times = metrics.time_calls(run, prepare, device, warmup_ms=timing.warmup_ms,
                                           rep_ms=timing.rep_ms, min_reps=timing.min_reps,
                                           max_reps=timing.max_reps)
                record.update(metrics.summarize(times), status="ok",
                              peak_bytes=metrics.peak_memory(run, prepare, device))
            except Exception:  # a failing provider is recorded, the others still run
                record.update(status="error", error=traceback.format_exc(limit=3))
            records.append(record)
    _add_ratios(records)
    return records


def _add_ratios(records):
    """lorakern's speedup over each other provider, per mode (>1: lorakern faster)."""
    for mode in MODES:
        ok = {r["provider"]: r for r in records if r["mode"] == mode and r["status"] == "ok"}
        if "lorakern" in ok:
            ok["lorakern"]["speedup_over"] = {
                name: round(r["median_ms"] / ok["lorakern"]["median_ms"], 3)
                for name, r in ok.items() if name != "lorakern"}


def table(records):
    """A markdown table of the records."""
    lines = ["| provider | mode | median ms (p20-p80) | vs lorakern |", "|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {r['mode']} | {r['status']} | |")
            continue
        speed = ", ".join(f"{k} {v}x" for k, v in r.get("speedup_over", {}).items())
        lines.append(f"| {r['provider']} | {r['mode']} | {r['median_ms']:.3f} "
                     f"({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | {speed} |")
    return "\n".join(lines)
