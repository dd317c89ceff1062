"""DoRA in ``python -m bench.static --variant dora``: *predicted* times of lorakern's
DoRA, lorakern's LoRA (the same case: fp32 adapters on the bf16 base, PEFT's
default), nn.Linear and eager PEFT DoRA as ``LoraConfig(use_dora=True)`` builds it.

lorakern's two layers run on meta tensors with every launch and torch op captured
(``capture.py``) and priced as in ``static_linear.py``; PEFT DoRA is priced op by op
(``peft_dora_ops``) with the same constants. W frozen; x, A, B, m (DoRA) and the
bias trained.
"""
import torch

from . import capture, predicted, roofline
from .static_linear import fastest, predict_lorakern, predict_ops

STRATEGIES = ("fused", "cublas")
PROVIDERS = ("lorakern DoRA", "lorakern LoRA", "nn.Linear", "peft DoRA")


def dora_tensors(case):
    """The training case on meta: bf16 x, W, b; fp32 A, B, m, as PEFT keeps them."""
    t = capture.layer_tensors(case)
    for name in ("lora_A", "lora_B"):
        t[name] = t[name].to(torch.float32)
    t["magnitude"] = torch.empty(case.d_out, dtype=torch.float32, device="meta")
    for name in ("x", "lora_A", "lora_B", "magnitude", "bias"):
        t[name].requires_grad_(True)
    return t


def capture_dora(case, arch, strategy=None, use_dora=True):
    """{'fwd': [...], 'bwd': [...]} of lorakern's DoRA (or, ``use_dora=False``, LoRA)
    on fp32 adapters."""
    from lorakern.functional.dispatch import strategy_forced
    from lorakern.functional.dora import FusedDoRALinear
    from lorakern.functional.fused_linear import FusedLoRALinear

    t = dora_tensors(case)
    with strategy_forced(strategy):
        with capture.recording(arch) as fwd:
            if use_dora:
                y = FusedDoRALinear.apply(t["x"], t["weight"], t["lora_A"], t["lora_B"],
                                          t["magnitude"], t["bias"], case.scale, case.dropout)
            else:
                y = FusedLoRALinear.apply(t["x"], t["weight"], t["lora_A"], t["lora_B"],
                                          t["bias"], case.scale, case.dropout)
        with capture.recording(arch) as bwd:
            y.backward(t["grad_y"])
    return {"fwd": fwd, "bwd": bwd}


def peft_dora_ops(case):
    """Eager PEFT DoRA (fp32 adapters and m on a bf16 base, W frozen, bias trained),
    op by op as ``DoraLinearVariant.forward`` / ``DoraLinearLayer.forward`` run them
    in training, and autograd's backward. fp32 products are priced as GEMMs of 4-byte
    elements (memory-bound at r = 16 whatever their FLOP rate)."""
    m, k, n, r = case.tokens, case.d_in, case.d_out, case.rank
    mk2, mk4, mn2, mn4, nk2, nk4 = 2 * m * k, 4 * m * k, 2 * m * n, 4 * m * n, 2 * n * k, 4 * n * k
    dropout = case.dropout > 0
    g32 = lambda a, b, c: ("gemm4", (a, b, c))  # noqa: E731
    fwd = list(roofline.linear_ops(case)["fwd"])
    fwd += [("x to fp32", "elementwise", (mk2 + mk4,)),
            ("eye(in)", "elementwise", (4 * k * k,)),
            ("lora_A(eye)", *g32(k, r, k)), ("lora_B(.)", *g32(k, n, r)),
            ("W to fp32", "elementwise", (nk2 + nk4,)),
            ("scaling * BA", "elementwise", (2 * nk4,)), ("W + s BA", "elementwise", (3 * nk4,)),
            ("norm rows", "elementwise", (nk4,))]
    if dropout:  # dropout(x) in fp32 (copy and mask), then the second base product in fp32
        fwd += [("dropout", "elementwise", (mk4 + mk4 + m * k,)),
                ("base on drop(x), fp32", *g32(m, n, k))]
    else:
        fwd += [("result - bias", "elementwise", (2 * mn2,))]
    fwd += [("lora_A(x)", *g32(m, r, k)), ("lora_B(h)", *g32(m, n, r)),
            ("(g - 1) * base", "elementwise", ((mn4 if dropout else mn2) + mn4,)),
            ("g * lora", "elementwise", (2 * mn4,)), ("* scaling", "elementwise", (2 * mn4,)),
            ("add", "elementwise", (3 * mn4,)), ("result + dora", "elementwise", (mn2 + 2 * mn4,)),
            ("to bf16", "elementwise", (mn4 + mn2,))]
    bwd = [("grad to fp32", "elementwise", (mn2 + mn4,)),
           ("grad * scaling", "elementwise", (2 * mn4,)),
           ("grad * g (lora)", "elementwise", (2 * mn4,)),
           ("dm: grad * lora, sum", "elementwise", (3 * mn4 + mn4,)),
           ("grad * (g - 1) (base)", "elementwise", (2 * mn4,)),
           ("dm: grad * base, sum", "elementwise", ((mn4 if dropout else mn2) + 2 * mn4,)),
           ("dh = dlora B", *g32(m, r, n)), ("dB = dlora^T h", *g32(n, r, m)),
           ("d lora_in = dh A", *g32(m, k, r)), ("dA = dh^T x", *g32(r, k, m))]
    if dropout:
        bwd += [("d drop(x) (base, fp32)", *g32(m, k, n)),
                ("add two fp32 dX paths", "elementwise", (3 * mk4,)),
                ("dropout (grad)", "elementwise", (mk4 + m * k + mk4,))]
    else:
        bwd += [("grad into result (bf16)", "elementwise", (mn4 + mn2 + 2 * mn2,))]
    bwd += [("dX to bf16", "elementwise", (mk4 + mk2,))]
    bwd += roofline.linear_ops(case)["bwd"]
    bwd += [("add dX (two paths)", "elementwise", (3 * mk2,))]
    return {"fwd": fwd, "bwd": bwd}


def _predict_peft(ops, machine):
    result = {}
    for phase, phase_ops in ops.items():
        timed = []
        for _, kind, args in phase_ops:
            if kind == "gemm4":
                timed.append(roofline.gemm(machine, *args, element_bytes=4))
            else:
                timed.append(roofline.predict_op(machine, kind, args))
        result[phase] = (sum(t for t, _ in timed), max(timed)[1])
    return result


def _predict_captured(case, arch, machine, kernel_reports, launch_log, strategy, use_dora):
    original = capture.capture_case
    capture.capture_case = lambda c, a, s=None: capture_dora(c, a, s, use_dora)
    try:
        return predict_lorakern(case, arch, machine, kernel_reports, launch_log, strategy)
    finally:
        capture.capture_case = original


def _records(case, provider, phases):
    fields = {"M": case.tokens, "K": case.d_in, "N": case.d_out, "r": case.rank,
              "dtype": case.dtype, "adapter_dtype": "fp32", "dropout": case.dropout,
              "variant": "dora"}
    return predicted.records(fields, provider, phases)


def run(arch, machine, kernel_reports, cases, launch_log):
    """The DoRA records of the static report: lorakern DoRA (and per strategy),
    lorakern LoRA, nn.Linear and PEFT DoRA."""
    records = []
    for case in cases:
        for provider, use_dora in (("lorakern DoRA", True), ("lorakern LoRA", False)):
            by_strategy = {s: _predict_captured(case, arch, machine, kernel_reports,
                                                launch_log, s, use_dora) for s in STRATEGIES}
            records += _records(case, provider, fastest(*by_strategy.values()))
        records += _records(case, "nn.Linear", predict_ops(roofline.linear_ops(case), machine))
        records += _records(case, "peft DoRA", _predict_peft(peft_dora_ops(case), machine))
    return records
