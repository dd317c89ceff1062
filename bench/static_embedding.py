"""The LoRA embedding in ``python -m bench.static``: its kernels compiled for the
target, and *predicted* times of lorakern, nn.Embedding and eager PEFT.

The embedding kernels are gathers and per-id sums: memory-bound, with no main
loop of tensor work, and the backward's loop lengths depend on the ids. So each
launch is priced by the bytes it must move (rows gathered, not whole tables) at
the HBM bandwidth, plus the launch cost, with the same constants as the linear
rows; its compiled facts (registers, spills, shared memory, SASS mix) are
reported as for every other kernel. The torch ops the launchers run (the sort
of the ids, the gathered A^T rows) are priced by the bytes they touch.
"""
from . import predicted
from .embedding import CUDA_CASE

FP32, ID_BYTES = 4, 8
# the records' provider names: the report's schema has no field for the layer kind
PROVIDERS = {"lorakern": "lorakern-embedding", "nn.Embedding": "nn.Embedding",
             "peft": "peft-embedding"}


def capture(case, arch):
    """{'fwd': [...], 'bwd': [...]}: the launches and torch ops of one embedding case
    (table frozen, fp32 adapters), on CPU tensors of the real shapes (the ids must be
    real: the backward groups tokens by id)."""
    import torch

    from lorakern import kernels

    from .capture import recording

    table_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(case.vocab, (case.tokens,), generator=gen)
    weight = torch.empty(case.vocab, case.dim, dtype=table_dtype)
    lora_a = torch.empty(case.rank, case.vocab)
    lora_b = torch.empty(case.dim, case.rank)
    grad_y = torch.empty(case.tokens, case.dim, dtype=table_dtype)
    scale = case.alpha / case.rank
    with recording(arch) as fwd:
        kernels.lora_embedding_forward(ids, weight, lora_a, lora_b, scale)
    with recording(arch) as bwd:
        kernels.lora_embedding_backward(grad_y, ids, weight, lora_a, lora_b, scale, None,
                                        need_a=True, need_b=True, need_e=False)
    return {"fwd": fwd, "bwd": bwd}, int(torch.unique(ids).numel())


def kernel_bytes(case, name, unique_ids):
    """Bytes a launch must move: the rows it gathers, not the whole tables."""
    t, d, r, e = case.tokens, case.dim, case.rank, 2
    if name == "_lora_embedding_forward_kernel":
        return t * ID_BYTES + t * d * e + t * r * FP32 + d * r * FP32 + t * d * e
    if name == "_lora_embedding_grad_kernel":  # dY once, dA's touched columns
        return 2 * t * ID_BYTES + t * d * e + d * r * FP32 + unique_ids * r * FP32
    if name == "_tn_matmul_kernel":            # dB = s dY^T A[:, ids]^T
        return t * d * e + t * r * FP32 + d * r * FP32
    raise KeyError(name)


def predict_lorakern(case, arch, machine, kernel_reports):
    from . import capture as capture_module
    from . import roofline, sass

    phases, unique_ids = capture(case, arch)
    result = {}
    for phase, items in phases.items():
        total = 0.0
        for item in items:
            if isinstance(item, capture_module.KernelLaunch):
                report = sass.compile_launch(item, arch)
                kernel_reports.setdefault(item.compile_key(), report)
                seconds, _ = roofline.elementwise(machine, kernel_bytes(case, item.name,
                                                                        unique_ids))
            else:
                seconds, _ = roofline.elementwise(machine, item.read_bytes + item.write_bytes)
            total += seconds
        result[phase] = (total, "hbm")
    return result


def embedding_ops(case):
    """nn.Embedding alone, table frozen: the forward gather; no backward work."""
    t, d, e = case.tokens, case.dim, 2
    return {"fwd": [("embedding E[ids]", "elementwise", (t * ID_BYTES + 2 * t * d * e,))],
            "bwd": []}


def peft_ops(case):
    """Eager PEFT LoRA Embedding (fp32 adapters on a half table), op by op:
    base(x) + (embedding(x, A^T) @ B^T) * scaling, cast back; its autograd backward."""
    t, d, r, v, e = case.tokens, case.dim, case.rank, case.vocab, 2
    td4 = t * d * FP32
    fwd = embedding_ops(case)["fwd"] + [
        ("embedding A^T[ids]", "elementwise", (t * ID_BYTES + 2 * t * r * FP32,)),
        ("mm after_A B^T (fp32)", "gemm_fp32", (t, d, r)),
        ("mul scaling", "elementwise", (2 * td4,)),
        ("add base (promoted to fp32)", "elementwise", (t * d * e + 2 * td4,)),
        ("cast to the table dtype", "elementwise", (td4 + t * d * e,))]
    bwd = [("cast grad to fp32", "elementwise", (t * d * e + td4,)),
           ("mul scaling (grad)", "elementwise", (2 * td4,)),
           ("mm d after_A = g B (fp32)", "gemm_fp32", (t, r, d)),
           ("mm dB = g^T after_A (fp32)", "gemm_fp32", (d, r, t)),
           ("embedding backward: zeros (V, r)", "elementwise", (v * r * FP32,)),
           ("embedding backward: index_add", "elementwise", (t * ID_BYTES + 2 * t * r * FP32,))]
    return {"fwd": fwd, "bwd": bwd}


def predict_ops(ops, machine):
    """{'fwd': (seconds, bound), 'bwd': ...}; fp32 GEMMs at the TF32-free fp32 rate
    (1/16 of the bf16 tensor peak on sm_80/sm_90) or memory, whichever is slower."""
    from . import roofline

    result = {}
    for phase, phase_ops in ops.items():
        timed = []
        for _, kind, args in phase_ops:
            if kind == "gemm_fp32":
                m, n, k = args
                tensor = 2.0 * m * n * k / (machine.tensor_peak / 16)
                memory = FP32 * (m * k + k * n + m * n) / machine.hbm_bytes_per_s
                timed.append((max(tensor, memory) + machine.launch_s,
                              "fp32" if tensor >= memory else "hbm"))
            else:
                timed.append(roofline.predict_op(machine, kind, args))
        result[phase] = (sum(t for t, _ in timed), max(timed)[1]) if timed else (0.0, "none")
    return result


def records(case, provider, phases):
    fields = {"M": case.tokens, "K": case.vocab, "N": case.dim, "r": case.rank,
              "dtype": case.dtype, "dropout": 0.0}
    return predicted.records(fields, PROVIDERS[provider], phases)


def run(arch, machine, kernel_reports, case=CUDA_CASE):
    """The embedding records of the static report (kernels added to kernel_reports)."""
    return (records(case, "lorakern", predict_lorakern(case, arch, machine, kernel_reports))
            + records(case, "nn.Embedding", predict_ops(embedding_ops(case), machine))
            + records(case, "peft", predict_ops(peft_ops(case), machine)))


def format_table(rows):
    lines = ["", f"LoRA embedding ({CUDA_CASE}), PREDICTED ms, fwd + bwd = fwd+bwd:"]
    by_provider = {}
    for row in rows:
        by_provider.setdefault(row["provider"], {})[row["mode"]] = row["predicted_ms"]
    for provider, ms in by_provider.items():
        lines.append(f"  {provider:>12}: {ms['fwd']:.4f} + {ms['bwd']:.4f} = "
                     f"{ms['fwd+bwd']:.4f}")
    return "\n".join(lines)
