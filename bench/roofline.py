"""A roofline for one launch, with every constant stated: *predicted* times.

Time of a launch = max(tensor, issue, HBM, L2) + launch cost, where

- tensor: the CTA's tensor-core FLOPs (from its SASS: HGMMA / HMMA shapes, the
  main loop's times its trip count) at the SM's share of the tensor peak times
  an efficiency, times the CTAs the busiest SM runs (waves and tail);
- issue: the CTA's warp instructions (main loop x trips + the rest, once) at 4
  per clock per SM (one per scheduler), or its IMADs at 2 per clock per SM (the
  CUDA programming guide's 64 integer multiply-adds per clock per SM on
  sm_80/sm_90), whichever is slower, times the busiest SM's CTAs;
- HBM: every tensor argument's bytes once (reads and writes; tiles re-read by
  other CTAs are assumed to hit L2) at the copy bandwidth;
- L2: every CTA's global loads and stores from its SASS (LDG, LDGSTS, STG) at
  the L2 bandwidth. TMA loads (UTMALDG) carry no width in SASS and are not counted.

The busiest SM runs ``(G // (S c)) c + ceil((G mod S c) / S)`` of the G CTAs,
with S SMs and c CTAs per SM (registers, shared memory, threads): the tail.

The baselines (cuBLAS GEMMs, eager elementwise ops) use the same constants: a
GEMM at max(FLOPs / (peak x cuBLAS efficiency), bytes / HBM), an elementwise op
at bytes / HBM, each plus the launch cost.
"""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Machine:
    name: str
    sms: int
    clock_hz: float
    tensor_peak: float          # dense bf16/fp16 FLOP/s that cuBLAS reaches
    wgmma_efficiency: float     # a Triton wgmma kernel, of that peak
    mma_sync_efficiency: float  # a Triton mma.sync (HMMA) kernel, of that peak
    cublas_efficiency: float
    hbm_bytes_per_s: float      # read + write
    l2_bytes_per_s: float
    launch_s: float
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32
    shared_per_sm: int = 233472
    shared_reserved_per_cta: int = 1024
    schedulers_per_sm: int = 4
    imad_per_clock_per_sm: int = 64
    sources: str = ""
    # fp32 FFMA GEMMs (cuBLAS with TF32 off, torch's default for matmuls)
    fp32_peak: float = 67e12
    fp32_sources: str = "fp32_peak: the published non-tensor fp32 peak (H100 SXM 67 TFLOP/s)"

    def as_json(self):
        return asdict(self)


MACHINES = {
    90: Machine(
        name="H100 SXM (sm_90)", sms=132, clock_hz=1.83e9, tensor_peak=790e12,
        wgmma_efficiency=0.85, mma_sync_efficiency=0.5, cublas_efficiency=1.0,
        hbm_bytes_per_s=3.0e12, l2_bytes_per_s=10e12, launch_s=3e-6,
        sources=(
            "tensor_peak: torch (cuBLAS) bf16 8192^3 matmul measured at 769-798 TFLOP/s on an "
            "H100 SXM; cublas_efficiency 1.0 because that figure is cuBLAS. "
            "wgmma_efficiency 0.85: published Triton GEMMs reach 76-95% of cuBLAS on H100. "
            "mma_sync_efficiency 0.5: assumed (mma.sync cannot keep Hopper's tensor cores fed; "
            "unmeasured). clock 1.83 GHz: the clock of the 989 TFLOP/s dense spec (132 SMs x "
            "4096 FLOP/clk). hbm: device-to-device copy measured at ~3.0 TB/s counting reads "
            "and writes. l2: assumed 10 TB/s (unmeasured; 128x128-tile Triton GEMMs at the "
            "published efficiency move >= 9 TB/s through L2). launch: assumed 3 us per kernel "
            "(GPU-side gap between back-to-back launches plus ramp-up). IMAD 64/clk/SM: CUDA "
            "programming guide throughput table.")),
    80: Machine(
        name="A100 SXM (sm_80)", sms=108, clock_hz=1.41e9, tensor_peak=0.9 * 312e12,
        wgmma_efficiency=0.85, mma_sync_efficiency=0.85, cublas_efficiency=1.0,
        hbm_bytes_per_s=1.7e12, l2_bytes_per_s=5e12, launch_s=3e-6,
        shared_per_sm=167936,
        sources=(
            "tensor_peak: 90% (assumed reachable by cuBLAS) of the published 312 TFLOP/s bf16 "
            "dense. mma_sync_efficiency 0.85: assumed, as wgmma on H100 (A100 has no wgmma). "
            "hbm: 1.7 TB/s, inside the published 1.5-2.0 TB/s (40/80 GB parts). l2: assumed "
            "5 TB/s (unmeasured). clock 1.41 GHz: A100 boost. launch: assumed 3 us."),
        fp32_peak=19.5e12,
        fp32_sources="fp32_peak: the published non-tensor fp32 peak (A100 19.5 TFLOP/s)"),
}


def ctas_per_sm(machine, regs, num_warps, shared_bytes):
    threads = 32 * num_warps
    regs_per_thread = max(8, -(-regs // 8) * 8)  # allocated in units of 8 per thread
    by_regs = machine.registers_per_sm // (regs_per_thread * threads)
    by_shared = machine.shared_per_sm // (shared_bytes + machine.shared_reserved_per_cta)
    by_threads = machine.threads_per_sm // threads
    return max(0, min(by_regs, by_shared, by_threads, machine.ctas_per_sm))


def busiest_sm_ctas(programs, sms, per_sm):
    """CTAs the most loaded SM runs: full waves, then the tail spread over SMs."""
    per_wave = sms * per_sm
    full, rest = divmod(programs, per_wave)
    return full * per_sm + -(-rest // sms)


@dataclass
class KernelWork:
    """What one CTA of a launch does, from the SASS and the main loop's trips."""
    programs: int
    num_warps: int
    regs: int
    shared_bytes: int
    tensor_flops: float      # per CTA
    instructions: float      # per CTA, warp instructions
    imads: float             # per CTA, warp instructions
    global_bytes: float      # per CTA
    hbm_bytes: float         # the whole launch
    wgmma: bool


def predict_kernel(machine, work):
    """(seconds, bound, details) of one Triton launch."""
    per_sm = ctas_per_sm(machine, work.regs, work.num_warps, work.shared_bytes)
    if per_sm == 0:
        raise ValueError(f"a CTA of {work.num_warps} warps, {work.regs} registers and "
                         f"{work.shared_bytes} B of shared memory does not fit one SM")
    busiest = busiest_sm_ctas(work.programs, machine.sms, per_sm)
    efficiency = machine.wgmma_efficiency if work.wgmma else machine.mma_sync_efficiency
    sm_tensor_rate = machine.tensor_peak * efficiency / machine.sms
    issue_clocks = max(work.instructions / machine.schedulers_per_sm,
                       work.imads / (machine.imad_per_clock_per_sm / 32))
    terms = {
        "tensor": busiest * work.tensor_flops / sm_tensor_rate,
        "issue": busiest * issue_clocks / machine.clock_hz,
        "hbm": work.hbm_bytes / machine.hbm_bytes_per_s,
        "l2": work.programs * work.global_bytes / machine.l2_bytes_per_s,
    }
    bound = max(terms, key=terms.get)
    details = dict(terms, ctas_per_sm=per_sm, busiest_sm_ctas=busiest,
                   tail_efficiency=work.programs / (machine.sms * busiest))
    return terms[bound] + machine.launch_s, bound, details


def gemm(machine, m, n, k, element_bytes=2, extra_bytes=0):
    """cuBLAS C[m, n] = A[m, k] B[k, n] (+ epilogue bytes): (seconds, bound)."""
    flops = 2.0 * m * n * k
    data = element_bytes * (m * k + k * n + m * n) + extra_bytes
    tensor = flops / (machine.tensor_peak * machine.cublas_efficiency)
    memory = data / machine.hbm_bytes_per_s
    return max(tensor, memory) + machine.launch_s, ("tensor" if tensor >= memory else "hbm")


def gemm_fp32(machine, m, n, k, read_bytes, write_bytes):
    """cuBLAS fp32 GEMM at IEEE precision (FFMA, TF32 off), its operands' bytes given:
    (seconds, bound)."""
    compute = 2.0 * m * n * k / machine.fp32_peak
    memory = (read_bytes + write_bytes) / machine.hbm_bytes_per_s
    return max(compute, memory) + machine.launch_s, ("issue" if compute >= memory else "hbm")


def elementwise(machine, nbytes):
    return nbytes / machine.hbm_bytes_per_s + machine.launch_s, "hbm"


def trips_or_one(trips):
    return 1 if trips is None else trips


def kernel_work(report, launch, trips, later_trips=None):
    """KernelWork of a captured launch and its compiled kernel's report. The
    loops after the main loop run ``later_trips`` times each when the compiled
    code and the Triton IR agree on them; otherwise once."""
    t = trips_or_one(trips)
    later = report.later_loops
    if later_trips is None or len(later_trips) != len(later):
        later_trips = [1] * len(later)
    later_trips = [trips_or_one(n) for n in later_trips]
    loop_imads = (report.sass["main_loop"] or {}).get("IMAD", 0)
    imads = report.sass["kernel"]["IMAD"] - loop_imads + loop_imads * t + sum(
        loop["imads"] * (n - 1) for loop, n in zip(later, later_trips))
    unique = {}
    for key, nbytes in launch.tensors.values():
        unique[key] = max(nbytes, unique.get(key, 0))

    def total(field, main):
        return main + sum(loop[field] * n for loop, n in zip(later, later_trips))

    return KernelWork(
        programs=launch.programs, num_warps=report.num_warps, regs=report.regs,
        shared_bytes=report.shared_bytes,
        tensor_flops=total("tensor_flops",
                           report.other_tensor_flops + report.loop_tensor_flops * t),
        instructions=total("instructions",
                           report.other_instructions + report.main_loop_instructions * t)
        * report.num_warps,
        imads=imads * report.num_warps,
        global_bytes=total("global_bytes",
                           report.other_global_bytes + report.loop_global_bytes * t),
        hbm_bytes=sum(unique.values()), wgmma=report.wgmma)


# ---- the baselines, op by op (a GEMM is (m, n, k); an elementwise op its bytes)

def linear_ops(case):
    """nn.Linear with W frozen and a trained bias: {'fwd': [...], 'bwd': [...]}."""
    m, k, n, e = case.tokens, case.d_in, case.d_out, 2
    return {"fwd": [("addmm x W^T + b", "gemm", (m, n, k, n * e))],
            "bwd": [("mm dX = dY W", "gemm", (m, k, n, 0)),
                    ("sum db", "elementwise", (m * n * e + n * e,))]}


def peft_ops(case):
    """Eager PEFT LoRA (adapters in the layer's dtype), W frozen, bias trained:
    base(x) + lora_B(lora_A(dropout(x))) * scaling and its autograd backward."""
    m, k, n, r, e = case.tokens, case.d_in, case.d_out, case.rank, 2
    dropout = case.dropout > 0
    mk, mn = m * k * e, m * n * e
    fwd = linear_ops(case)["fwd"]
    if dropout:  # writes the dropped copy of x and a bool mask
        fwd.append(("dropout", "elementwise", (mk + mk + m * k,)))
    fwd += [("mm h = drop(x) A^T", "gemm", (m, r, k, 0)),
            ("mm h B^T", "gemm", (m, n, r, 0)),
            ("mul scaling", "elementwise", (2 * mn,)),
            ("add", "elementwise", (3 * mn,))]
    bwd = [("mul scaling (grad)", "elementwise", (2 * mn,)),
           ("mm dh = g B", "gemm", (m, r, n, 0)),
           ("mm dB = g^T h", "gemm", (n, r, m, 0)),
           ("mm d drop(x) = dh A", "gemm", (m, k, r, 0)),
           ("mm dA = dh^T drop(x)", "gemm", (r, k, m, 0))]
    if dropout:
        bwd.append(("dropout (grad)", "elementwise", (mk + m * k + mk,)))
    bwd += linear_ops(case)["bwd"]
    bwd.append(("add dX (two paths)", "elementwise", (3 * mk,)))
    return {"fwd": fwd, "bwd": bwd}


def peft_fp32_adapter_ops(case):
    """Eager PEFT LoRA as ``get_peft_model`` builds it by default on a 16-bit base
    (``autocast_adapter_dtype=True``: fp32 adapters), W frozen, bias trained. Its
    forward casts x to fp32 (``_cast_input_dtype``), runs both rank products as fp32
    GEMMs (FFMA: torch's matmuls keep TF32 off by default), adds the fp32 LoRA output
    to the 16-bit base output (an fp32 sum) and casts the sum back; autograd's backward
    runs each of those in reverse. A gemm32 is (m, n, k, read bytes, write bytes)."""
    m, k, n, r, e = case.tokens, case.d_in, case.d_out, case.rank, 2
    dropout = case.dropout > 0
    mk, mn, f = m * k, m * n, 4
    fwd = linear_ops(case)["fwd"] + [("x.to(fp32)", "elementwise", (mk * e + mk * f,))]
    if dropout:  # writes the dropped fp32 copy of x and a bool mask
        fwd.append(("dropout", "elementwise", (mk * f + mk * f + mk,)))
    fwd += [("mm h = drop(x) A^T (fp32)", "gemm32", (m, r, k, (mk + r * k) * f, m * r * f)),
            ("mm h B^T (fp32)", "gemm32", (m, n, r, (m * r + n * r) * f, mn * f)),
            ("mul scaling", "elementwise", (2 * mn * f,)),
            ("add (16-bit + fp32 -> fp32)", "elementwise", (mn * e + 2 * mn * f,)),
            ("result.to(16-bit)", "elementwise", (mn * f + mn * e,))]
    bwd = [("grad .to(fp32)", "elementwise", (mn * e + mn * f,)),
           ("grad add -> base (fp32 -> 16-bit)", "elementwise", (mn * f + mn * e,)),
           ("mul scaling (grad)", "elementwise", (2 * mn * f,)),
           ("mm dh = g B (fp32)", "gemm32", (m, r, n, (mn + n * r) * f, m * r * f)),
           ("mm dB = g^T h (fp32)", "gemm32", (n, r, m, (mn + m * r) * f, n * r * f)),
           ("mm d drop(x) = dh A (fp32)", "gemm32", (m, k, r, (m * r + r * k) * f, mk * f)),
           ("mm dA = dh^T drop(x) (fp32)", "gemm32", (r, k, m, (m * r + mk) * f, r * k * f))]
    if dropout:
        bwd.append(("dropout (grad)", "elementwise", (mk * f + mk + mk * f,)))
    bwd += [("grad x.to(fp32) (fp32 -> 16-bit)", "elementwise", (mk * f + mk * e,))]
    bwd += linear_ops(case)["bwd"]
    bwd.append(("add dX (two paths)", "elementwise", (3 * mk * e,)))
    return {"fwd": fwd, "bwd": bwd}


def peft_default_ops(case):
    """PEFT as ``get_peft_model`` builds it by default for the case's adapter dtype."""
    if case.adapter_torch_dtype != case.torch_dtype:
        return peft_fp32_adapter_ops(case)
    return peft_ops(case)


# torch's matmuls, as the cublas strategy calls them: (C or None, A, B) shapes
MATMUL_OPS = {"addmm_": 1, "addmm": 1, "mm": 0}


def torch_op(machine, name, shapes, read_bytes, write_bytes, element_bytes=2):
    """A torch op captured from a launcher: a matmul is priced as cuBLAS's GEMM
    (reading C once more when it is added: addmm with beta = 1), anything else
    as memory-bound."""
    if name in MATMUL_OPS:
        first = MATMUL_OPS[name]
        (m, k), (_, n) = shapes[first], shapes[first + 1]
        c_bytes = m * n * element_bytes if first else 0
        return gemm(machine, m, n, k, element_bytes, extra_bytes=c_bytes)
    return elementwise(machine, read_bytes + write_bytes)


def predict_op(machine, kind, args):
    if kind == "gemm":
        m, n, k, extra = args
        return gemm(machine, m, n, k, extra_bytes=extra)
    if kind == "gemm32":
        return gemm_fp32(machine, *args)
    if kind == "gemm_int8":
        return gemm_int8(machine, *args)
    return elementwise(machine, *args)


def gemm_int8(machine, m, n, k):
    """cuBLAS int8 x int8 -> int32 GEMM (LLM.int8()): twice the bf16 tensor peak, as
    H100 and A100 publish for dense int8; 1-byte operands, a 4-byte output."""
    tensor = 2.0 * m * n * k / (2 * machine.tensor_peak * machine.cublas_efficiency)
    memory = (m * k + k * n + 4 * m * n) / machine.hbm_bytes_per_s
    return max(tensor, memory) + machine.launch_s, ("tensor" if tensor >= memory else "hbm")
