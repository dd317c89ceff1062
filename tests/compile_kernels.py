"""Compile lorakern's Triton kernels ahead of time for one GPU architecture.

No GPU is needed: ``triton.compile`` goes down to PTX and cubin for a
``GPUTarget`` on a CPU-only machine. ``tests/test_compile.py`` runs this script
in subprocesses, because a kernel decorated while ``TRITON_INTERPRET=1`` is set
(as the test suite does) can only be interpreted, never compiled.

    python tests/compile_kernels.py --arch 90 --group bf16
    python tests/compile_kernels.py --arch 80 --group fp32-ieee --list

Groups: fp16, bf16, fp32-ieee, fp32-tf32 (the x dtype and the DOT_PRECISION the
launchers pass for it) compile the forward, grad-input and tn_matmul kernels;
``dropout_mask`` compiles the dtype-independent mask kernel.

What one group compiles, for the kernels' x dtype:
- every config the launcher can pick on a GPU (``row_gemm_candidates()`` for the
  forward and grad-input, ``tn_candidates()`` for tn_matmul), with every
  optional flag on (HAS_BIAS, HAS_DROPOUT, NEED_DX, HAS_COLSUM): the superset
  of the code;
- at the same configs, the mixed cases the launchers meet: fp32 lora A/B with
  fp16/bf16 x (forward, grad-input); for tn_matmul an fp32 output (the split
  partial buffers, or an fp32 adapter's gradient) besides an output in the
  operands' dtype, and dA's transposed output;
- at one config per kernel: every flag off, and the generic specialization.

Specialization. A launch on contiguous, 16-byte aligned tensors (the common
case) compiles with pointers and multiples of 16 marked divisible by 16 and
unit strides folded to the constant 1, which is what lets Triton vectorize and
pipeline the loads through shared memory (several times the shared memory of
the unaligned build). So every entry is compiled in that "aligned"
specialization; the "generic" one (nothing known about pointers or strides:
transposed or odd-sized inputs) is compiled once per kernel.

A build that needs more shared memory than the architecture has is stopped
after LLVM IR, where its shared memory is known: it cannot launch, so its PTX
and cubin would prove nothing, and they are about half of the compile time of
the big fp32 builds (--full-over-limit lowers them anyway).

Output: JSON lines on stdout, first {"plan": [...]} (kernel, label, signature,
constexprs, options of every job), then one record per compile (kernel, label,
shared, num_warps, ptx_target, cubin_bytes, regs, spill_bytes (local memory per
thread), seconds, cpu_seconds, error). A
compile that raises is recorded and the script goes on. With --list only the
plan is printed.
"""
import argparse
import importlib
import inspect
import json
import os
import resource
import sys
import time
import traceback
import warnings

SHARED_MEMORY_PER_BLOCK = {80: 166912, 90: 232448}  # bytes: 163 KiB and 227 KiB
PRECISION_GROUPS = {  # group -> (x dtype, DOT_PRECISION as the launchers pass it)
    "fp16": ("fp16", "tf32"),
    "bf16": ("bf16", "tf32"),
    "fp32-ieee": ("fp32", "ieee"),
    "fp32-tf32": ("fp32", "tf32"),
}
GROUPS = tuple(PRECISION_GROUPS) + ("dropout_mask",)
DIVISIBLE_16 = [["tt.divisibility", 16]]

# Scalar arguments typed fp32; every other non-pointer, non-constexpr argument
# is an i32 size, stride or seed.
FLOAT_ARGS = {"scale", "dropout_p", "keep_scale", "lora_scale"}
# The aligned specialization: sizes that are multiples of 16 (feature sizes and
# rank; not the token count M), and per kernel the strides that are 1 on
# contiguous tensors.
ROW_GEMM_DIVISIBLE_SIZES = {"N", "K", "R"}
TN_DIVISIBLE_SIZES = {"P", "Q", "rows_per_split"}
FORWARD_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_bias",
                        "stride_yn", "stride_hr"}
GRAD_INPUT_UNIT_STRIDES = {"stride_dyn", "stride_wk", "stride_ak", "stride_br",
                           "stride_dxk", "stride_gr"}
TN_UNIT_STRIDES = {"stride_lp", "stride_qq", "stride_oq", "stride_cp"}
# dA^T is written through A's gradient transposed: unit stride along P.
TN_TRANSPOSED_OUT_UNIT_STRIDES = {"stride_lp", "stride_qq", "stride_op", "stride_cp"}


def _constexpr_params(fn):
    """Names of the ``tl.constexpr`` parameters (of a compiled or interpreted kernel)."""
    python_fn = getattr(fn, "fn", fn)
    return {p.name for p in inspect.signature(python_fn).parameters.values()
            if "constexpr" in str(p.annotation)}


def build_source_args(fn, pointer_dtypes, meta, *, aligned, unit_strides=(),
                      divisible_sizes=()):
    """(signature, constexprs, attrs) for ``ASTSource``, as a launch would build them.

    Every constexpr parameter of ``fn`` must be in ``meta`` and every pointer in
    ``pointer_dtypes``, so a kernel that grows an argument fails here by name.
    """
    signature, constexprs, attrs = {}, {}, {}
    constexpr_params = _constexpr_params(fn)
    if set(meta) != constexpr_params:
        raise ValueError(f"{fn.__name__}: constexprs given {sorted(meta)}, kernel has "
                         f"{sorted(constexpr_params)}")
    for index, name in enumerate(fn.arg_names):
        if name in constexpr_params:
            signature[name] = "constexpr"
            constexprs[name] = meta[name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.pop(name)
            if aligned:
                attrs[(index,)] = DIVISIBLE_16
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif aligned and name in unit_strides:
            signature[name] = "constexpr"  # an int argument equal to 1 is specialized
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if aligned and (name.startswith("stride_") or name in divisible_sizes):
                attrs[(index,)] = DIVISIBLE_16
    if pointer_dtypes:
        raise ValueError(f"{fn.__name__}: no such pointer arguments {sorted(pointer_dtypes)}")
    return signature, constexprs, attrs


def _job(kernel, label, fn, pointer_dtypes, meta, num_warps, num_stages, **spec):
    signature, constexprs, attrs = build_source_args(fn, dict(pointer_dtypes), meta, **spec)
    return {"kernel": kernel, "label": label, "fn": fn, "signature": signature,
            "constexprs": constexprs, "attrs": attrs,
            "options": {"num_warps": num_warps, "num_stages": num_stages}}


def _row_gemm_label(cfg, block_r):
    return (f"BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} BLOCK_K={cfg.block_k} "
            f"BLOCK_R={block_r} GROUP_M={cfg.group_m} warps={cfg.num_warps} "
            f"stages={cfg.num_stages}")


def _tn_label(cfg):
    return (f"BLOCK_M={cfg.block_m} BLOCK_P={cfg.block_p} BLOCK_Q={cfg.block_q} "
            f"warps={cfg.num_warps} stages={cfg.num_stages}")


# Per row-block kernel: its module, optional flag, activation-side pointers,
# unit strides, and the words its labels use for the input and the flags.
ROW_GEMM_KERNELS = {
    "_lora_forward_kernel": ("lora_forward", "HAS_BIAS",
                             ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "h_ptr"),
                             FORWARD_UNIT_STRIDES, "x", "bias+dropout"),
    "_lora_grad_input_kernel": ("lora_grad_input", "NEED_DX",
                                ("dy_ptr", "w_ptr", "dx_ptr", "g_ptr"),
                                GRAD_INPUT_UNIT_STRIDES, "dY", "dX+dropout"),
}


def _row_gemm_job(kernel, cfg, block_r, precision, x, adapter, flags, label_extra="",
                  **spec):
    module, flag, x_pointers, unit_strides, x_word, flag_words = ROW_GEMM_KERNELS[kernel]
    fn = getattr(importlib.import_module(f"lorakern.kernels.{module}"), kernel)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                BLOCK_R=block_r, GROUP_M=cfg.group_m, HAS_DROPOUT=flags,
                UPCAST_DOT=False, DOT_PRECISION=precision, **{flag: flags})
    pointers = dict(dict.fromkeys(x_pointers, x), a_ptr=adapter, b_ptr=adapter)
    spec = spec or dict(aligned=True, unit_strides=unit_strides,
                        divisible_sizes=ROW_GEMM_DIVISIBLE_SIZES)
    label = (f"{_row_gemm_label(cfg, block_r)}, {x_word} {x}, A/B {adapter}, {precision}, "
             f"{flag_words} {'on' if flags else 'off'}{label_extra}")
    return _job(kernel, label, fn, pointers, meta, cfg.num_warps, cfg.num_stages, **spec)


def _forward_job(*args, **kwargs):
    return _row_gemm_job("_lora_forward_kernel", *args, **kwargs)


def _grad_input_job(*args, **kwargs):
    return _row_gemm_job("_lora_grad_input_kernel", *args, **kwargs)


def _tn_job(cfg, precision, x, out, colsum, dropout, has_colsum, label_extra="",
            unit_strides=TN_UNIT_STRIDES, **spec):
    from lorakern.kernels.lora_grad_weights import _tn_matmul_kernel
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_P=cfg.block_p, BLOCK_Q=cfg.block_q,
                HAS_DROPOUT=dropout, HAS_COLSUM=has_colsum, UPCAST_DOT=False,
                DOT_PRECISION=precision)
    pointers = dict(l_ptr=x, q_ptr=x, out_ptr=out, colsum_ptr=colsum)
    spec = spec or dict(aligned=True, unit_strides=unit_strides,
                        divisible_sizes=TN_DIVISIBLE_SIZES)
    label = (f"{_tn_label(cfg)}, L/Q {x}, out {out}, colsum {colsum}, {precision}, "
             f"dropout {'on' if dropout else 'off'}, colsum {'on' if has_colsum else 'off'}"
             f"{label_extra}")
    return _job("_tn_matmul_kernel", label, _tn_matmul_kernel, pointers, meta,
                cfg.num_warps, cfg.num_stages, **spec)


ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# LORAKERN_COMPILE_ALL=1 compiles every rank block of every tile config. By
# default each tile config is compiled at the largest rank block the launchers
# pair it with, and the smallest rank block (16, tl.dot's minimum) once: the
# rank block only widens the rank tiles, so the largest is the one that can run
# out of shared memory or registers. That keeps the CI run short.
COMPILE_ALL = os.environ.get("LORAKERN_COMPILE_ALL", "0") == "1"


def row_gemm_pairs(x, adapter):
    """The (tile config, rank block) pairs compiled for these operand dtypes."""
    from lorakern.kernels._common import row_gemm_candidates

    pairs = row_gemm_candidates(ELEMENT_BYTES[x], ELEMENT_BYTES[adapter])
    if COMPILE_ALL:
        return pairs
    widest = {}
    for cfg, block_r in pairs:
        widest[cfg] = max(block_r, widest.get(cfg, 0))
    narrowest = min(pairs, key=lambda pair: pair[1])
    return sorted(set(widest.items()) | {narrowest}, key=repr)


def precision_jobs(x, precision):
    """The compiles of the forward, grad-input and tn_matmul kernels for x dtype ``x``."""
    from lorakern.kernels.lora_grad_weights import tn_candidates, tn_config_gpu

    # lora_A / lora_B may be fp32 under fp16 / bf16 x (and their grads then are)
    adapters = [x] if x == "fp32" else [x, "fp32"]
    generic = dict(aligned=False)
    jobs = []

    # ---- forward and grad-input: the tile configs the launchers pick, per adapter dtype
    for adapter in adapters:
        for cfg, block_r in row_gemm_pairs(x, adapter):
            jobs.append(_forward_job(cfg, block_r, precision, x, adapter, flags=True))
            jobs.append(_grad_input_job(cfg, block_r, precision, x, adapter, flags=True))
    cfg, block_r = row_gemm_pairs(x, x)[-1]
    jobs += [_forward_job(cfg, block_r, precision, x, x, flags=False),
             _grad_input_job(cfg, block_r, precision, x, x, flags=False),
             _forward_job(cfg, block_r, precision, x, x, True, ", generic strides", **generic),
             _grad_input_job(cfg, block_r, precision, x, x, True, ", generic strides",
                             **generic)]

    # ---- tn_matmul: out = scale * L^T @ Q for dA^T, dB (rank-wide configs) and dW.
    # (out, colsum) dtypes it is launched with: the operands' dtype (dW, and dB / db
    # into same-dtype parameters), fp32 for both (the split partial buffers), and an
    # fp32 out with the bias-dtype colsum (dB of an fp32 adapter, unsplit).
    out_colsum = [(x, x)] if x == "fp32" else [(x, x), ("fp32", "fp32"), ("fp32", x)]
    tn_configs = tn_candidates(ELEMENT_BYTES[x])
    for index, cfg in enumerate(tn_configs):
        # the output dtypes change only the epilogue's stores: all of them at one
        # config (all configs with LORAKERN_COMPILE_ALL=1), the first elsewhere
        variants = out_colsum if COMPILE_ALL or index == len(tn_configs) - 1 else out_colsum[:1]
        for out, colsum in variants:
            jobs.append(_tn_job(cfg, precision, x, out, colsum, dropout=True, has_colsum=True))
        if cfg != tn_config_gpu(None, ELEMENT_BYTES[x]):
            # dA^T, written through A's grad transposed (unit stride along P), unsplit
            for adapter in adapters:
                jobs.append(_tn_job(cfg, precision, x, adapter, adapter, dropout=True,
                                    has_colsum=False, label_extra=", transposed out (dA)",
                                    unit_strides=TN_TRANSPOSED_OUT_UNIT_STRIDES))
    cfg = tn_configs[-1]
    jobs += [_tn_job(cfg, precision, x, x, x, dropout=False, has_colsum=False),
             _tn_job(cfg, precision, x, x, x, True, True, ", generic strides", **generic)]
    return jobs


def dropout_mask_jobs():
    from lorakern.kernels.dropout_mask import _dropout_mask_kernel
    meta = dict(BLOCK_M=32, BLOCK_K=64)  # as dropout_keep_mask launches it
    return [_job("_dropout_mask_kernel", f"BLOCK_M=32 BLOCK_K=64, {spec_label}",
                 _dropout_mask_kernel, dict(mask_ptr="i8"), meta, 4, 3, **spec)
            for spec_label, spec in [
                ("aligned", dict(aligned=True, unit_strides={"stride_mk"},
                                 divisible_sizes={"K"})),
                ("generic strides", dict(aligned=False))]]


def plan(group):
    """The deduplicated compile jobs of one group (arch independent)."""
    if group == "dropout_mask":
        jobs = dropout_mask_jobs()
    else:
        jobs = precision_jobs(*PRECISION_GROUPS[group])
    if group == "fp32-tf32" and not COMPILE_ALL:
        # TF32 changes only how tl.dot is lowered, and fp32-ieee compiles every
        # config: here the widest build of each kernel
        firsts = {}
        for job in jobs:
            firsts.setdefault(job["kernel"], job)
        jobs = list(firsts.values())
    unique, seen = [], set()
    for job in jobs:
        key = json.dumps([job["kernel"], job["signature"], job["constexprs"],
                          sorted((list(k), v) for k, v in job["attrs"].items()),
                          job["options"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(job)
    return unique


def describe(job):
    """A job as JSON: what was compiled, without the kernel object."""
    return {"kernel": job["kernel"], "label": job["label"], "signature": job["signature"],
            "constexprs": job["constexprs"], "options": job["options"],
            "aligned": bool(job["attrs"])}


class SharedMemoryOverLimit(Exception):
    """A build already too big for one block: lowering it further shows nothing new."""

    def __init__(self, shared):
        super().__init__(f"needs {shared} bytes of shared memory")
        self.shared = shared


def stop_before_ptx_when_over(limit):
    """Make the NVIDIA backend stop after LLVM IR (where shared memory is known)
    when a build needs more than ``limit`` bytes of shared memory: such a kernel
    cannot launch, and PTX and ptxas would take about half of its compile time.
    Without the hook (another triton layout), everything compiles to the end."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        make_ptx = CUDABackend.make_ptx
    except (ImportError, AttributeError):
        return

    def checked_make_ptx(self, src, metadata, *args, **kwargs):
        shared = metadata.get("shared")
        if shared is not None and shared > limit:
            raise SharedMemoryOverLimit(shared)
        return make_ptx(self, src, metadata, *args, **kwargs)

    CUDABackend.make_ptx = checked_make_ptx


def _cpu_seconds():
    """CPU time of this process and its finished children (ptxas)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def resource_usage(cubin):
    """{'REG': registers, 'LOCAL': local memory bytes (spill slots), ...} per thread,
    from the cuobjdump that Triton ships."""
    import re
    import subprocess
    import tempfile
    from triton.backends.nvidia import __file__ as nvidia_init

    tool = os.path.join(os.path.dirname(nvidia_init), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b([A-Z]+):(\d+)", usage)}


def compile_job(job, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record = {"kernel": job["kernel"], "label": job["label"], "arch": arch,
              "num_warps_requested": job["options"]["num_warps"]}
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    try:
        src = ASTSource(fn=job["fn"], signature=job["signature"],
                        constexprs=job["constexprs"], attrs=job["attrs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=job["options"])
        ptx = compiled.asm.get("ptx", "")
        target = next((line.split()[1] for line in ptx.splitlines()
                       if line.startswith(".target")), None)
        record.update(shared=compiled.metadata.shared,
                      num_warps=compiled.metadata.num_warps,
                      ptx_target=target,
                      ptx_has_entry=f".entry {job['kernel']}" in ptx,
                      cubin_bytes=len(compiled.asm.get("cubin", b"")),
                      error=None)
        usage = resource_usage(compiled.asm["cubin"])
        record.update(regs=usage.get("REG"), spill_bytes=usage.get("LOCAL"))
    except SharedMemoryOverLimit as over:
        record.update(shared=over.shared, error=None, stopped_before_ptx=True)
    except Exception as exc:  # recorded per entry; the other entries still compile
        message = str(exc)
        record.update(error=f"{type(exc).__name__}: {message[:4000]}",
                      traceback=traceback.format_exc()[-4000:])
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["cpu_seconds"] = round(_cpu_seconds() - start_cpu, 2)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_MEMORY_PER_BLOCK),
                        required=True)
    parser.add_argument("--group", choices=GROUPS, required=True)
    parser.add_argument("--list", action="store_true", help="print the plan, compile nothing")
    parser.add_argument("--full-over-limit", action="store_true",
                        help="lower to PTX and cubin even builds over the shared memory limit")
    args = parser.parse_args(argv)
    jobs = plan(args.group)
    print(json.dumps({"plan": [describe(job) for job in jobs]}), flush=True)
    if args.list:
        return
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("compile_kernels.py: TRITON_INTERPRET=1 is set; interpreted kernels cannot "
                 "be compiled. Run it with TRITON_INTERPRET unset or 0.")
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    if not args.full_over_limit:
        stop_before_ptx_when_over(SHARED_MEMORY_PER_BLOCK[args.arch])
    for job in jobs:
        print(json.dumps(compile_job(job, args.arch)), flush=True)


if __name__ == "__main__":
    main()
