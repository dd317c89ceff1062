"""End to end: one training step (forward, backward, AdamW) of a Llama-style
decoder built from a ``transformers`` config with random weights (nothing is
downloaded), LoRA on every linear of every block.

Providers: PEFT eager, PEFT under torch.compile, lorakern through PEFT (the
same PEFT model switched to the fused path by ``patch_peft``) and lorakern
alone (``inject_lora`` on the base model: lorakern's own modules and adapter
initialisation). All start from the same base weights; the PEFT-built ones
from the same adapters too (each record keeps ``first_loss``, the loss before
any update, as a coarse check).
"""
import gc
import traceback
from dataclasses import dataclass

import torch

from . import metrics
from .cases import DTYPES
from .linear import CPU_NOTE
from .providers import installed, lorakern_path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class E2EConfig:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    batch: int
    seq: int
    dtype: str
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    adapter_dtype: str = "fp32"  # PEFT's default on a bf16/fp16 base; "base": the base dtype

    @property
    def tokens(self):
        return self.batch * self.seq


CONFIGS = {c.name: c for c in [
    # Llama-3-8B blocks (GQA 32/8 heads, 14336 MLP), 4 of them; a 32k vocabulary so
    # the frozen head does not dwarf four blocks; 4 x 2048 tokens a step
    E2EConfig("llama3-8b-4layers", 4096, 14336, 32, 8, 4, 32000, 4, 2048, "bf16"),
    # the same architecture at CPU size, for smoke runs
    E2EConfig("cpu-tiny", 256, 688, 4, 2, 2, 1024, 2, 64, "fp32", rank=8, alpha=16),
]}


def build_base(cfg, device):
    """LlamaForCausalLM with random weights, seeded: identical for every provider."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         num_hidden_layers=cfg.layers, vocab_size=cfg.vocab,
                         max_position_embeddings=max(cfg.seq, 128), use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(DTYPES[cfg.dtype])


def build_peft(cfg, device):
    """PEFT as a user gets it: adapters in fp32 on a bf16/fp16 base unless
    ``cfg.adapter_dtype == "base"``. B is random (init_lora_weights=False), not
    zero, so the adapters take part in the loss from the first step."""
    import peft
    model = build_base(cfg, device)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(TARGETS), init_lora_weights=False)
    return peft.get_peft_model(model, config,
                               autocast_adapter_dtype=cfg.adapter_dtype == "fp32")


def build_patched(cfg, device):
    from lorakern.peft import patch_peft
    return patch_peft(build_peft(cfg, device))


def build_injected(cfg, device):
    """lorakern's own LoRALinear modules, adapters in the dtype PEFT would use."""
    from lorakern.models import inject_lora
    model = build_base(cfg, device)
    torch.manual_seed(1)
    base = DTYPES[cfg.dtype]
    return inject_lora(model, list(TARGETS), r=cfg.rank, alpha=cfg.alpha,
                       dropout=cfg.dropout,
                       adapter_dtype=torch.float32 if cfg.adapter_dtype == "fp32" else base)


def build_compiled(cfg, device):
    return torch.compile(build_peft(cfg, device), dynamic=False)


# name: (builder, modules it needs, how lorakern is applied)
PROVIDERS = {
    "peft": (build_peft, ("transformers", "peft"), None),
    "peft-compile": (build_compiled, ("transformers", "peft"), None),
    "lorakern": (build_patched, ("transformers", "peft", "lorakern.peft"),
                 "patch_peft"),
    "lorakern-inject": (build_injected, ("transformers", "lorakern.models"), "inject_lora"),
}


def _unavailable(provider):
    """Why this provider cannot run here, or None."""
    missing = [m for m in PROVIDERS[provider][1] if not installed(m)]
    return f"needs {', '.join(missing)} (not installed)" if missing else None


def _config_fields(cfg):
    return {"kind": "e2e", "config": cfg.name, "layers": cfg.layers, "hidden": cfg.hidden,
            "intermediate": cfg.intermediate, "vocab": cfg.vocab, "batch": cfg.batch,
            "seq": cfg.seq, "tokens": cfg.tokens, "dtype": cfg.dtype, "rank": cfg.rank,
            "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": list(TARGETS),
            "adapter_dtype_requested": cfg.adapter_dtype}


def _lorakern_calls(call, batch):
    """Calls that reach lorakern.lora_linear's dispatch point in one forward:
    one per LoRA linear if the fused path is really in use."""
    from lorakern.functional import linear
    original, count = linear.select_backend, [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    linear.select_backend = counting
    try:
        with torch.no_grad():
            call(input_ids=batch)
    finally:
        linear.select_backend = original
    return count[0]


def measure(provider, cfg, device, steps, warmup):
    """One provider's record: median/p20/p80 step time, tokens/s, peak memory."""
    build, _, via = PROVIDERS[provider]
    call = build(cfg, device)
    model = getattr(call, "_orig_mod", call)  # torch.compile's wrapper holds the model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator(device="cpu").manual_seed(2)
    batch = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen).to(device)
    losses = []

    def step(i):
        loss = call(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not losses:
            losses.append(loss.item())

    for i in range(max(1, warmup)):  # the first step compiles (peft-compile), keeps the loss
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        model_bytes = torch.cuda.memory_allocated(device)
    times = metrics.time_calls(step, lambda i: None, device, warmup_ms=0, reps=steps,
                               warmup_calls=0)
    stats = metrics.summarize(times)
    record = {**stats, "tokens_per_s": cfg.tokens / (stats["median_ms"] * 1e-3),
              "first_loss": losses[0], "trainable_params": sum(p.numel() for p in params),
              "adapter_dtype": str(params[0].dtype).replace("torch.", "") if params else None,
              "peak_mem_bytes": None, "model_bytes": None}
    if device.type == "cuda":
        record["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
        record["model_bytes"] = model_bytes
    if via:
        record.update(lorakern_via=via, lora_linears=cfg.layers * len(TARGETS),
                      lorakern_calls_per_forward=_lorakern_calls(call, batch))
    return record


def run_e2e(cfg, providers, device, env, steps=10, warmup=3):
    """Records for each provider, one model alive at a time."""
    timer = "cuda-events" if device.type == "cuda" else "cpu-perf_counter"
    records = []
    for provider in providers:
        path = ({"peft": "torch", "peft-compile": "torch.compile"}.get(provider)
                or lorakern_path(device, DTYPES[cfg.dtype]))
        base = {**env, **_config_fields(cfg), "provider": provider, "path": path,
                "timer": timer, "mode": "train-step"}
        if device.type != "cuda":
            base["note"] = CPU_NOTE
        reason = _unavailable(provider)
        if reason:
            records.append({**base, "status": "skipped", "reason": reason})
            continue
        try:
            if provider == "peft-compile":
                torch._dynamo.reset()
            records.append({**base, **measure(provider, cfg, device, steps, warmup),
                            "status": "ok"})
        except torch.cuda.OutOfMemoryError:
            records.append({**base, "status": "oom"})
        except Exception as exc:  # recorded; the run's exit status says so
            traceback.print_exc()
            records.append({**base, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return metrics.add_speedups(records, key=("config", "mode"))
