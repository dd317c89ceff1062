"""QLoRA in ``python -m bench.static --base nf4|fp4|int8``: *predicted* times of
lorakern over a bitsandbytes base, the dequantise-then-cuBLAS composition
(bench/composition.py, Unsloth's method), a bf16 nn.Linear (the floor) and eager
PEFT QLoRA as ``get_peft_model`` builds it on a ``BitsAndBytesConfig`` model.

lorakern's forward and training backward run on meta tensors of the quantised
layout (4-bit: packed codes, nested absmax, as QLoRA's default double
quantisation; int8: CB and SCB) with every launch captured (``capture.py``) and
priced as in ``static_linear.py``, each strategy, and the faster per phase as
``lorakern QLoRA``. The others are priced op by op with the same constants
(``peft_qlora_ops``, ``composition_ops``): bitsandbytes' dequantisation as the
bytes its kernels move (at HBM bandwidth plus a launch each), its int8 GEMM at
twice the bf16 tensor peak (H100 and A100 publish 2x dense int8 over bf16).
W frozen; x, A, B and the bias trained; fp32 adapters unless ``--adapter-dtype
base``.
"""
import torch

from . import capture, predicted, roofline
from .static_linear import fastest, predict_ops, price_items

STRATEGIES = ("fused", "cublas")
PROVIDERS = ("lorakern QLoRA", "dequant+cuBLAS", "nn.Linear", "peft QLoRA")
BASES = ("nf4", "fp4", "int8")
BLOCKSIZE, BLOCKSIZE2 = 64, 256  # bitsandbytes' 4-bit defaults (absmax, nested absmax)


def _meta_base(case, base):
    """A ``QuantizedWeight`` on meta with the layout bitsandbytes gives the case's W."""
    from lorakern.functional.quantized_weight import QuantizedWeight

    n, k = case.d_out, case.d_in
    meta = dict(device="meta")

    class MetaQuantizedWeight(QuantizedWeight):
        def _operand_fields(self):
            # made once, as a loaded base's tensors are (its code's pair table too)
            if not hasattr(self, "_fields"):
                self._fields = self._make_fields()
            return self._fields

        def _make_fields(self):
            if base == "int8":
                tensors = (torch.empty(n, k, dtype=torch.int8, **meta),
                           torch.empty(n, dtype=torch.float32, **meta))
                return dict(base_kind="int8", tensors=tensors, weight_shape=(n, k),
                            state_dtype=torch.float32, dtype=self.dtype)
            blocks = n * k // BLOCKSIZE
            tensors = (torch.empty(n * k // 2, 1, dtype=torch.uint8, **meta),
                       torch.empty(blocks, dtype=torch.uint8, **meta),
                       torch.empty(16, dtype=torch.float32, **meta),
                       torch.empty(-(-blocks // BLOCKSIZE2), dtype=torch.float32, **meta),
                       torch.empty(256, dtype=torch.float32, **meta),
                       torch.empty((), dtype=torch.float32, **meta))
            return dict(base_kind=base, tensors=tensors, weight_shape=(n, k),
                        state_dtype=self.dtype, dtype=self.dtype, blocksize=BLOCKSIZE,
                        blocksize2=BLOCKSIZE2)

    return MetaQuantizedWeight("bench", (n, k), case.torch_dtype, torch.device("meta"))


def capture_qlora(case, arch, base, strategy=None):
    """{'fwd': [...], 'bwd': [...]} of lorakern's layer over a quantised base."""
    from lorakern.functional.dispatch import strategy_forced
    from lorakern.functional.fused_linear import fused_backward, fused_forward

    t = capture.layer_tensors(case)
    weight = _meta_base(case, base)
    seed = capture.SEED if case.dropout > 0 else 0
    with strategy_forced(strategy):
        with capture.recording(arch) as fwd:
            _, h = fused_forward(t["x"], weight, t["lora_A"], t["lora_B"], t["bias"],
                                 case.scale, case.dropout, seed)
        with capture.recording(arch) as bwd:
            fused_backward(t["grad_y"], t["x"], weight, t["lora_A"], t["lora_B"], h,
                           case.scale, case.dropout, seed, capture.TRAINING_NEEDS)
    return {"fwd": fwd, "bwd": bwd}


def bnb_dequant_ops(case, base):
    """bitsandbytes' dequantisation of W into the compute dtype, as its CUDA path runs
    it for every ``matmul_4bit`` with more than one token (``dequantize_4bit``: the
    nested absmax first by ``dequantize_blockwise`` and an in-place add of the offset,
    then the 4-bit kernel) or for the 8-bit backward (CB cast, scaled in place)."""
    n, k, e = case.d_out, case.d_in, 2
    if base == "int8":
        return [("CB.to(dtype)", "elementwise", (n * k + n * k * e,)),
                ("CB.mul_(SCB / 127)", "elementwise", (2 * n * k * e + 4 * n,))]
    blocks = n * k // BLOCKSIZE
    return [("dequantize_blockwise(absmax)", "elementwise", (blocks + 4 * blocks,)),
            ("absmax += offset", "elementwise", (2 * 4 * blocks,)),
            ("dequantize_4bit", "elementwise", (n * k // 2 + 4 * blocks + n * k * e,))]


def _int8_forward_ops(case):
    """LLM.int8() without outliers (PEFT's default threshold 0): x cast to fp16 and
    quantised row-wise (two reads: the row maxima, then the codes), the int8 GEMM
    into int32, its dequantisation with the bias into 16 bits."""
    m, k, n, e = case.tokens, case.d_in, case.d_out, 2
    return [("x.to(fp16)", "elementwise", (2 * m * k * e,)),
            ("int8_vectorwise_quant(x)", "elementwise", (2 * m * k * e + m * k + 4 * m,)),
            ("int8 GEMM (int32 out)", "gemm_int8", (m, n, k)),
            ("int8_mm_dequant + bias", "elementwise", (4 * m * n + 4 * m + 4 * n + e * m * n,))]


def peft_qlora_ops(case, base):
    """Eager PEFT QLoRA (``lora.bnb.Linear4bit`` / ``Linear8bitLt``) with fp32 adapters:
    the base layer as bitsandbytes runs it (4-bit: W dequantised, then the 16-bit GEMM,
    in the forward and again in the backward; 8-bit: LLM.int8()'s forward, the
    dequantised CB's GEMM in the backward), then PEFT's fp32 LoRA branch and its
    casts (``roofline.peft_fp32_adapter_ops`` without its base GEMMs)."""
    lora = roofline.peft_default_ops(case)
    linear = roofline.linear_ops(case)
    fwd = [op for op in lora["fwd"] if op not in linear["fwd"]]
    bwd = [op for op in lora["bwd"] if op not in linear["bwd"]]
    if base == "int8":
        base_fwd = _int8_forward_ops(case)
    else:
        base_fwd = bnb_dequant_ops(case, base) + linear["fwd"]
    base_bwd = bnb_dequant_ops(case, base) + linear["bwd"]
    return {"fwd": base_fwd + fwd, "bwd": base_bwd + bwd}


def composition_ops(case, base):
    """``DequantAddmmLoRA`` (bench/composition.py) over bitsandbytes' dequantisation:
    adapters cast to 16 bits, h = (x m) A^T, y = addmm(b, x, W^T) then y += s' h B^T;
    backward G = dY B, dX = dY W (+ s' G A, masked), dA, dB, db; W dequantised in each
    direction and dropped."""
    m, k, n, r, e = case.tokens, case.d_in, case.d_out, case.rank, 2
    dropout = case.dropout > 0
    mk, mn = m * k * e, m * n * e
    casts = [("A, B to 16 bits", "elementwise", (6 * r * (k + n),))]
    fwd = casts + bnb_dequant_ops(case, base)
    if dropout:  # the bool mask (bernoulli_) and x * mask
        fwd += [("keep mask", "elementwise", (m * k,)), ("x * mask", "elementwise", (2 * mk + m * k,))]
    fwd += [("mm h = (x m) A^T", "gemm", (m, r, k, 0)),
            ("addmm b + x W^T", "gemm", (m, n, k, n * e)),
            ("addmm_ y += s' h B^T", "gemm", (m, n, r, mn))]
    bwd = casts + bnb_dequant_ops(case, base)
    bwd += [("mm G = dY B", "gemm", (m, r, n, 0)), ("mm dX = dY W", "gemm", (m, k, n, 0))]
    if dropout:
        bwd += [("mm G A", "gemm", (m, k, r, 0)), ("* mask, add_", "elementwise", (4 * mk + m * k,)),
                ("x * mask", "elementwise", (2 * mk + m * k,))]
    else:
        bwd += [("addmm_ dX += s' G A", "gemm", (m, k, r, mk))]
    bwd += [("mm dA = G^T (x m)", "gemm", (r, k, m, 0)), ("mm dB = dY^T h", "gemm", (n, r, m, 0)),
            ("mul_, to fp32 (dA, dB)", "elementwise", (12 * r * (k + n),)),
            ("sum db", "elementwise", (mn + n * e,))]
    return {"fwd": fwd, "bwd": bwd}


def _records(case, base, provider, phases):
    fields = {"M": case.tokens, "K": case.d_in, "N": case.d_out, "r": case.rank,
              "dtype": case.dtype, "adapter_dtype": case.adapter_label, "dropout": case.dropout,
              "base": base}
    return predicted.records(fields, provider, phases)


def run(arch, machine, kernel_reports, cases, launch_log, bases):
    """The QLoRA records: lorakern over the quantised base (each strategy, and the
    faster per phase), the composition, a bf16 nn.Linear and PEFT QLoRA."""
    records = []
    for base in bases:
        for case in cases:
            by_strategy = {}
            for strategy in STRATEGIES:
                captured = capture_qlora(case, arch, base, strategy)
                by_strategy[strategy] = {
                    phase: price_items(items, case, f"{base}:{strategy}", phase, arch, machine,
                                       kernel_reports, launch_log)
                    for phase, items in captured.items()}
            records += _records(case, base, "lorakern QLoRA", fastest(*by_strategy.values()))
            for strategy, phases in by_strategy.items():
                records += _records(case, base, f"lorakern QLoRA:{strategy}", phases)
            records += _records(case, base, "dequant+cuBLAS",
                                predict_ops(composition_ops(case, base), machine))
            records += _records(case, base, "nn.Linear",
                                predict_ops(roofline.linear_ops(case), machine))
            records += _records(case, base, "peft QLoRA",
                                predict_ops(peft_qlora_ops(case, base), machine))
    return records


def format_targets(records):
    """Each case against the QLoRA targets: fwd+bwd vs PEFT QLoRA and the bf16 nn.Linear,
    and at decode (M <= 16) the forward against nn.Linear's."""
    by = {}
    for rec in records:
        if rec.get("base") in BASES and rec["provider"] in PROVIDERS:
            key = (rec["base"], rec["K"], rec["N"], rec["M"], rec["r"], rec["dropout"],
                   rec["adapter_dtype"])
            by.setdefault(key, {})[(rec["provider"], rec["mode"])] = rec["predicted_ms"]
    lines = ["", "QLoRA ratios (predicted): lorakern QLoRA against PEFT QLoRA and a bf16 "
             "nn.Linear"]
    for (base, k, n, m, r, p, adapters), ms in by.items():
        ours = ms[("lorakern QLoRA", "fwd+bwd")]
        line = (f"  {base} {k}x{n} M={m} r={r} p={p:g} adapters={adapters}: fwd+bwd "
                f"{ms[('peft QLoRA', 'fwd+bwd')] / ours:.2f}x faster than peft QLoRA, "
                f"{ours / ms[('nn.Linear', 'fwd+bwd')]:.3f}x nn.Linear")
        if m <= 16:
            line += (f"; forward {ms[('lorakern QLoRA', 'fwd')] / ms[('nn.Linear', 'fwd')]:.3f}x "
                     f"nn.Linear's")
        lines.append(line)
    return lines
