"""Compile lorakern's Triton kernels ahead of time for one GPU architecture.

No GPU is needed: ``triton.compile`` goes down to PTX and cubin for a
``GPUTarget`` on a CPU-only machine. ``tests/test_compile.py`` runs this script
in subprocesses, because a kernel decorated while ``TRITON_INTERPRET=1`` is set
(as the test suite does) can only be interpreted, never compiled.

    python tests/compile_kernels.py --arch 90 --group bf16
    python tests/compile_kernels.py --arch 80 --group fp32-ieee --list

Groups: fp16, bf16, fp32-ieee, fp32-tf32 (the x dtype and the DOT_PRECISION the
launchers pass for it) compile the rank pass, the LoRA GEMM, the LoRA term, the
one pass over dY and tn_matmul;
``dropout_mask`` compiles the dtype-independent mask kernel; ``dora_norm`` DoRA's
factored weight norm, for 16-bit and fp32 weights with 16-bit and fp32 adapters.

What one group compiles, for the kernels' x dtype:
- the rank pass (``rank_product_candidates()``) at every config it can pick,
  as the forward launches it: h = drop(x) A^T (dropout on, A read transposed);
  G = dY B (dropout off, B read as stored) once, at the widest rank block;
- the LoRA GEMM (``lora_gemm_candidates()``) at every config and epilogue rank
  block, as the forward launches it (W^T, B^T; bias on) and as dX does (W, A;
  dropout on); the forward build also with dropout on, the superset of the code;
- the LoRA GEMM's TMA build (``lora_gemm_candidates(tma=True)``), for sm_90
  only (TMA is sm_90+), as the forward (W read as stored: K contiguous) and dX
  launch it;
- the cublas strategy's LoRA term (``lora_term_candidates()``) as the forward
  (bias on) and dX (dropout on) launch it;
- the one pass over dY (``grad_output_candidates()``: G, dB and db) at every
  config and rank block, with G, db and the row split on (fp32 partials, int32
  counters);
- tn_matmul (``tn_candidates()``, each row-block shape at its widest BLOCK_Q
  and the narrowest once) with every flag on (rows split: fp32 partials summed
  in the launch), for an output in the operands' dtype, fp32 (an fp32
  adapter's gradient) and dA's transposed output; the direct store once;
- each of these again with fp32 adapters under fp16/bf16 x (h and G then fp32,
  their products in fp32: IEEE, torch's default, here; TF32 once per kernel);
- at one config per kernel: every flag off, and the unaligned specialization.

Specialization. A launch on contiguous, 16-byte aligned tensors (the common
case) compiles with pointers and multiples of 16 marked divisible by 16 and
unit strides folded to the constant 1, which is what lets Triton vectorize and
pipeline the loads through shared memory (several times the shared memory of
the unaligned build). So every entry is compiled in that "aligned"
specialization. The layer hands its kernels rows of unit stride only
(``lorakern/functional/fused_linear.py`` copies a transposed x, an expanded dY and the like
to contiguous rows), so the other launch is the "unaligned" one: unit strides
folded, nothing known to divide by 16 (odd sizes, offset views; a strided
bias as given), compiled once per kernel. The LoRA embedding's and the mask
helper's launchers take any strides: theirs is the "generic" one (nothing
known about pointers or strides).

A build that needs more shared memory than the architecture has is stopped
after LLVM IR, where its shared memory is known: it cannot launch, so its PTX
and cubin would prove nothing, and they are about half of the compile time of
the big fp32 builds (--full-over-limit lowers them anyway).

Output: JSON lines on stdout, first {"plan": [...]} (kernel, label, signature,
constexprs, options of every job), then one record per compile (kernel, label,
shared, num_warps, ptx_target, cubin_bytes, regs, spill_bytes and stack_bytes (local
memory and stack frame per thread), seconds, cpu_seconds, error). A
compile that raises is recorded and the script goes on. With --list only the
plan is printed. ``--dump DIR`` also writes each cubin to DIR (for nvdisasm).
"""
import argparse
from dataclasses import replace
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
GROUPS = tuple(PRECISION_GROUPS) + ("dropout_mask", "embedding", "dora_norm", "dequant_bnb",
                                         "segmented")
DIVISIBLE_16 = [["tt.divisibility", 16]]
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# the precision of an fp32 product when torch's allow_tf32 is off, its default
FP32_DEFAULT_PRECISION = "ieee"
# a 16-bit x or dY with fp32 adapters (h, G), when torch's TF32 switch is off: the
# rank products' exact three-part split (``_common.mixed_precision``), the LoRA term
# of fp32 h / G with fp32 adapters onto a 16-bit output (``term_precision``)
MIXED_PRECISION = "split"
MIXED_TERM_PRECISION = "tf32x3"

# Scalar arguments typed fp32; every other non-pointer, non-constexpr argument
# is an i32 size, stride, threshold or seed.
FLOAT_ARGS = {"scale", "lora_scale", "rank_scale"}
# The aligned specialization: sizes that are multiples of 16 (feature sizes and
# rank; not the token count M), and per launch the strides that are 1 on
# contiguous tensors.
DIVISIBLE_SIZES = {"N", "K", "R", "P", "Q", "rows_per_split", "k_per_split", "D",
                   "cols_per_group"}
RANK_H_UNIT_STRIDES = {"stride_lk", "stride_rk", "stride_or"}      # x, A^T, h
RANK_G_UNIT_STRIDES = {"stride_lk", "stride_rr", "stride_or"}      # dY, B, G
GEMM_Y_UNIT_STRIDES = {"stride_lk", "stride_rk", "stride_pr", "stride_qr", "stride_bias",
                       "stride_on"}                                # x, W^T, h, B^T, b, y
GEMM_DX_UNIT_STRIDES = {"stride_lk", "stride_rn", "stride_pr", "stride_qn", "stride_bias",
                        "stride_on"}                               # dY, W, G, A, dX
TERM_Y_UNIT_STRIDES = {"stride_pr", "stride_qr", "stride_bias", "stride_on"}  # h, B^T, b, y0
TERM_DX_UNIT_STRIDES = {"stride_pr", "stride_qn", "stride_on"}               # G, A, dX0
# dY, B, h, G, dB, db (the partials are contiguous by construction)
GRAD_OUTPUT_UNIT_STRIDES = {"stride_yn", "stride_br", "stride_hr", "stride_gr", "stride_dbr",
                            "stride_dbias"}
TN_UNIT_STRIDES = {"stride_lp", "stride_qq", "stride_oq", "stride_cp"}
# dA^T is written through A's gradient transposed: unit stride along P.
TN_TRANSPOSED_OUT_UNIT_STRIDES = {"stride_lp", "stride_qq", "stride_op", "stride_cp"}
# with the grad-input's LoRA term: A (r, K) and dX0 (M, K) have unit stride along K
TN_TERM_UNIT_STRIDES = TN_TRANSPOSED_OUT_UNIT_STRIDES | {"stride_ap", "stride_tp"}
KERNEL_MODULES = {"_rank_product_kernel": "rank_product", "_lora_gemm_kernel": "lora_gemm",
                  "_lora_gemm_tma_kernel": "lora_gemm",
                  "_lora_term_kernel": "lora_term",
                  "_tn_matmul_kernel": "lora_grad_weights",
                  "_grad_output_kernel": "grad_output",
                  "_dropout_mask_kernel": "dropout_mask",
                  "_dora_norm_kernel": "dora_norm",
                  "_lora_embedding_forward_kernel": "lora_embedding",
                  "_lora_embedding_grad_kernel": "lora_embedding",
                  "_dequant_4bit_kernel": "dequant_bnb",
                  "_dequant_int8_kernel": "dequant_bnb",
                  "_qlora_gemm_kernel": "qlora_gemm",
                  "_qlora_decode_kernel": "qlora_decode",
                  "_segmented_rank_kernel": "segmented_lora"}
EMBEDDING_FORWARD_UNIT_STRIDES = {"stride_ids", "stride_ed", "stride_av", "stride_br",
                                  "stride_yd"}                      # ids, E, A, B, y
EMBEDDING_GRAD_UNIT_STRIDES = {"stride_dyd", "stride_br", "stride_dav", "stride_ded"}
# LORAKERN_COMPILE_ALL=1 compiles every rank block of every tile config. By
# default each tile config is compiled at the largest rank block the launchers
# pair it with, and the smallest rank block (16, tl.dot's minimum) once: the
# rank block only widens the rank tiles, so the largest is the one that can run
# out of shared memory or registers. That keeps the CI run short.
COMPILE_ALL = os.environ.get("LORAKERN_COMPILE_ALL", "0") == "1"


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
    A TMA descriptor argument (``*_desc``) is given there as (dtype, block shape).
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
        elif name.endswith("_desc"):
            dtype, block = pointer_dtypes.pop(name)
            signature[name] = f"tensordesc<{dtype}[{', '.join(map(str, block))}]>"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.pop(name)
            if aligned:
                attrs[(index,)] = DIVISIBLE_16
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in unit_strides:
            signature[name] = "constexpr"  # an int argument equal to 1 is specialized
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if aligned and (name.startswith("stride_") or name in divisible_sizes):
                attrs[(index,)] = DIVISIBLE_16
    if pointer_dtypes:
        raise ValueError(f"{fn.__name__}: no such pointer arguments {sorted(pointer_dtypes)}")
    return signature, constexprs, attrs


def kernel_fn(kernel):
    module = importlib.import_module(f"lorakern.kernels.{KERNEL_MODULES[kernel]}")
    return getattr(module, kernel)


def _job(kernel, meta, pointer_dtypes, cfg, words, unit_strides=None, min_arch=0,
         aligned=True):
    """One compile: ``unit_strides`` None means the generic specialization, not
    ``aligned`` the unaligned one (unit strides, nothing divisible);
    ``min_arch``: compiled only for that architecture and later (TMA: 90)."""
    fn = kernel_fn(kernel)
    if unit_strides is None:
        spec = dict(aligned=False)
        words = words + ["generic strides"]
    elif not aligned:
        # a strided bias is read as it is given (the layer copies nothing else)
        spec = dict(aligned=False, unit_strides=set(unit_strides) - {"stride_bias"})
        words = words + ["unaligned"]
    else:
        spec = dict(aligned=True, unit_strides=unit_strides, divisible_sizes=DIVISIBLE_SIZES)
    signature, constexprs, attrs = build_source_args(fn, dict(pointer_dtypes), meta, **spec)
    shown = " ".join(f"{k}={v}" for k, v in meta.items()
                     if k.startswith("BLOCK_") or k == "GROUP_M")
    flags = " ".join(f"{k}={'on' if v else 'off'}" for k, v in meta.items()
                     if k.startswith(("HAS_", "NEED_", "SPLIT_", "RANK_IN", "RANK_DROPOUT")))
    pointers = " ".join(f"{k[:-4]}:{v}" for k, v in pointer_dtypes.items()
                        if k.endswith("_ptr"))
    label = ", ".join([f"{shown} warps={cfg.num_warps} stages={cfg.num_stages}", pointers,
                       flags] + [f"{k}={v}" for k, v in meta.items() if "PRECISION" in k]
                      + words)
    return {"kernel": kernel, "label": label, "fn": fn, "signature": signature,
            "constexprs": constexprs, "attrs": attrs,
            "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            "min_arch": min_arch}


def _promoted(x, adapter):
    return x if x == adapter else "fp32"


def _adapter_precision(x, adapter, precision):
    """DOT_PRECISION of a product of x with an adapter-dtype operand."""
    return precision if x == adapter else MIXED_PRECISION


def _widest_and_narrowest(pairs):
    """Each tile config at its widest rank block, and the narrowest pair once."""
    if COMPILE_ALL:
        return pairs
    widest = {}
    for cfg, block_r in pairs:
        widest[cfg] = max(block_r, widest.get(cfg, 0))
    narrowest = min(pairs, key=lambda pair: pair[1])
    return sorted(set(widest.items()) | {narrowest}, key=repr)


def rank_pairs(x, adapter):
    from lorakern.kernels.rank_product import rank_product_candidates
    return _widest_and_narrowest(rank_product_candidates(ELEMENT_BYTES[x],
                                                         ELEMENT_BYTES[adapter]))


def gemm_pairs(x, adapter, precision="tf32"):
    """The pointer build's pairs; fp32 x with IEEE products has tiles of its own."""
    from lorakern.kernels.lora_gemm import lora_gemm_candidates
    pq = _promoted(x, adapter)
    ieee = x == "fp32" and precision == "ieee"
    return _widest_and_narrowest(lora_gemm_candidates(ELEMENT_BYTES[x], ELEMENT_BYTES[pq],
                                                      ieee=ieee))


def rank_job(cfg, block_r, x, adapter, precision, pass_, dropout=None, unit=True):
    """The rank pass as the forward (pass_ "h") or the backward ("G") launches it."""
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
                HAS_DROPOUT=(pass_ == "h") if dropout is None else dropout,
                UPCAST_DOT=False, DOT_PRECISION=precision)
    pointers = dict(l_ptr=x, rt_ptr=adapter, out_ptr=_promoted(x, adapter))
    strides = RANK_H_UNIT_STRIDES if pass_ == "h" else RANK_G_UNIT_STRIDES
    return _job("_rank_product_kernel", meta, pointers, cfg, [f"pass {pass_}"], strides,
                aligned=unit)


def gemm_job(cfg, block_r, x, adapter, precision, rank_precision, pass_, bias, dropout,
             unit=True):
    """The LoRA GEMM as the forward (pass_ "y"), the decode forward that makes h
    itself ("y+h": the mask on x, none in the epilogue) or grad-input ("dX")
    launches it."""
    in_kernel = pass_ == "y+h"
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                BLOCK_R=block_r, GROUP_M=cfg.group_m, HAS_BIAS=bias,
                HAS_DROPOUT=dropout and not in_kernel, UPCAST_DOT=False,
                DOT_PRECISION=precision, RANK_DOT_PRECISION=rank_precision,
                RANK_IN_KERNEL=in_kernel, RANK_DROPOUT=dropout and in_kernel)
    pointers = dict(l_ptr=x, rt_ptr=x, p_ptr=_promoted(x, adapter), q_ptr=adapter,
                    pr_ptr=adapter, bias_ptr=x, out_ptr=x)
    strides = (GEMM_DX_UNIT_STRIDES if pass_ == "dX" else
               GEMM_Y_UNIT_STRIDES | ({"stride_prk"} if in_kernel else set()))
    return _job("_lora_gemm_kernel", meta, pointers, cfg, [f"pass {pass_}"], strides,
                aligned=unit)


def gemm_tma_pairs(x, adapter):
    """The TMA build's pairs: none for fp32 x, which keeps the pointer build."""
    from lorakern.kernels.lora_gemm import lora_gemm_candidates
    pq = _promoted(x, adapter)
    pairs = lora_gemm_candidates(ELEMENT_BYTES[x], ELEMENT_BYTES[pq], tma=True)
    return _widest_and_narrowest(pairs) if pairs else []


def gemm_tma_job(cfg, block_r, x, adapter, precision, rank_precision, pass_):
    """The LoRA GEMM's TMA build (sm_90+) as the forward (pass_ "y": W read as
    stored, K contiguous, bias and, for the superset, dropout on) or grad-input
    ("dX": W's tile (K, N), dropout on) launches it on aligned operands."""
    forward = pass_ == "y"
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                BLOCK_R=block_r, GROUP_M=cfg.group_m, RT_TRANSPOSED=forward,
                HAS_BIAS=forward, HAS_DROPOUT=True, UPCAST_DOT=False,
                DOT_PRECISION=precision, RANK_DOT_PRECISION=rank_precision)
    rt_block = [cfg.block_n, cfg.block_k] if forward else [cfg.block_k, cfg.block_n]
    operands = dict(l_desc=(x, [cfg.block_m, cfg.block_k]), rt_desc=(x, rt_block),
                    p_ptr=_promoted(x, adapter), q_ptr=adapter, bias_ptr=x, out_ptr=x)
    strides = GEMM_Y_UNIT_STRIDES if forward else GEMM_DX_UNIT_STRIDES
    return _job("_lora_gemm_tma_kernel", meta, operands, cfg, [f"pass {pass_}", "TMA"],
                strides, min_arch=90)


def decode_rank_blocks(x, adapter):
    """The rank blocks at which a decode forward makes h in the GEMM."""
    from lorakern.kernels.lora_gemm import RANK_BLOCKS, epilogue_rank_block
    pq = ELEMENT_BYTES[_promoted(x, adapter)]
    return [b for b in RANK_BLOCKS if epilogue_rank_block(b, pq) == b]


def term_job(cfg, block_r, x, adapter, rank_precision, pass_, unit=True):
    """The cublas strategy's C operand as the forward (pass_ "y0": bias on) or
    grad-input ("dX0": dropout on) launches it; the superset (both on) for y0."""
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r,
                GROUP_M=cfg.group_m, HAS_BIAS=pass_ == "y0", HAS_DROPOUT=True,
                UPCAST_DOT=False, RANK_DOT_PRECISION=rank_precision)
    pointers = dict(p_ptr=_promoted(x, adapter), q_ptr=adapter, bias_ptr=x, out_ptr=x)
    strides = TERM_Y_UNIT_STRIDES if pass_ == "y0" else TERM_DX_UNIT_STRIDES
    return _job("_lora_term_kernel", meta, pointers, cfg, [f"pass {pass_}"],
                strides, aligned=unit)


def term_pairs(x, adapter):
    from lorakern.kernels.lora_term import lora_term_candidates
    return _widest_and_narrowest(lora_term_candidates(ELEMENT_BYTES[_promoted(x, adapter)]))


def term_jobs(x, adapter, rank_precision):
    # fp32 h / G with fp32 adapters: tf32x3 up to rank block 16, IEEE past it
    # (``_common.term_precision``)
    return [term_job(cfg, block_r, x, adapter,
                     FP32_DEFAULT_PRECISION if rank_precision == MIXED_TERM_PRECISION
                     and block_r > 16 else rank_precision, pass_)
            for cfg, block_r in term_pairs(x, adapter) for pass_ in ("y0", "dX0")]


def tn_job(cfg, precision, lhs, rhs, out, colsum, dropout, has_colsum, words=(),
           unit_strides=TN_UNIT_STRIDES, split=True, aligned=True, term=None):
    """tn_matmul; ``split``: rows split across programs, fp32 partials summed by the
    last program of each tile (the launch at large M), else the direct store;
    ``term``: (A's dtype, dX0's dtype, the term's precision) of the grad-input's
    LoRA term written beside dA."""
    term_rhs, term_out, term_precision = term or (out, out, precision)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_P=cfg.block_p, BLOCK_Q=cfg.block_q,
                HAS_DROPOUT=dropout, HAS_COLSUM=has_colsum, SPLIT_M=split,
                HAS_TERM=term is not None, UPCAST_DOT=False, DOT_PRECISION=precision,
                TERM_PRECISION=term_precision)
    pointers = dict(l_ptr=lhs, q_ptr=rhs, out_ptr=out, colsum_ptr=colsum, part_ptr="fp32",
                    colpart_ptr="fp32", counter_ptr="i32", term_rhs_ptr=term_rhs,
                    term_ptr=term_out)
    return _job("_tn_matmul_kernel", meta, pointers, cfg, list(words), unit_strides,
                aligned=aligned)


def grad_output_pairs(x, adapter):
    from lorakern.kernels.grad_output import grad_output_candidates
    return _widest_and_narrowest(grad_output_candidates(ELEMENT_BYTES[x],
                                                        ELEMENT_BYTES[_promoted(x, adapter)]))


def grad_output_job(cfg, block_r, x, adapter, precision, need_g=True, colsum=True,
                    split_m=True, unit=True):
    """The one pass over dY (G, dB, db) as the backward launches it: dY in x's
    dtype, B and dB in the adapters', h and G in the rank dtype, fp32 partials."""
    rank = _promoted(x, adapter)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, NEED_G=need_g,
                HAS_COLSUM=colsum, SPLIT_M=split_m, UPCAST_DOT=False, DOT_PRECISION=precision)
    pointers = dict(dy_ptr=x, b_ptr=adapter, h_ptr=rank, g_ptr=rank, db_ptr=adapter,
                    dbias_ptr=x, part_ptr="fp32", colpart_ptr="fp32", gpart_ptr="fp32",
                    counter_ptr="i32")
    return _job("_grad_output_kernel", meta, pointers, cfg, [], GRAD_OUTPUT_UNIT_STRIDES,
                aligned=unit)


def grad_output_jobs(x, adapter, precision):
    return [grad_output_job(cfg, block_r, x, adapter, precision)
            for cfg, block_r in grad_output_pairs(x, adapter)]


def rank_and_gemm_jobs(x, adapter, precision):
    """The forward's and grad-input's kernels at every config, for one adapter dtype."""
    rank_precision = _adapter_precision(x, adapter, precision)
    # the GEMM's epilogue (h B^T, G A) and decode rank product: fp32 with fp32 at IEEE
    gemm_rank_precision = precision if x == adapter else FP32_DEFAULT_PRECISION
    term_precision = precision if x == adapter else MIXED_TERM_PRECISION
    jobs = []
    pairs = rank_pairs(x, adapter)
    for cfg, block_r in pairs:
        jobs.append(rank_job(cfg, block_r, x, adapter, rank_precision, "h"))
    # G's build differs from h's only by the mask (off) and which stride of the
    # adapter is 1: once, at the widest rank block
    cfg, block_r = max(pairs, key=lambda pair: pair[1])
    jobs.append(rank_job(cfg, block_r, x, adapter, rank_precision, "G"))
    for cfg, block_r in gemm_pairs(x, adapter, precision):
        jobs.append(gemm_job(cfg, block_r, x, adapter, precision, gemm_rank_precision, "y",
                             bias=True, dropout=True))
        jobs.append(gemm_job(cfg, block_r, x, adapter, precision, gemm_rank_precision, "dX",
                             bias=False, dropout=True))
    for cfg, block_r in gemm_tma_pairs(x, adapter):
        jobs += [gemm_tma_job(cfg, block_r, x, adapter, precision, gemm_rank_precision, pass_)
                 for pass_ in ("y", "dX")]
    from lorakern.kernels.lora_gemm import DECODE_M, lora_gemm_config_gpu
    pq = ELEMENT_BYTES[_promoted(x, adapter)]
    for block_r in _widest_and_narrowest_blocks(decode_rank_blocks(x, adapter)):
        cfg = lora_gemm_config_gpu(DECODE_M, ELEMENT_BYTES[x], block_r, pq)
        jobs.append(gemm_job(cfg, block_r, x, adapter, precision, gemm_rank_precision, "y+h",
                             bias=True, dropout=True))
    return (jobs + term_jobs(x, adapter, term_precision)
            + grad_output_jobs(x, adapter, rank_precision))


def _widest_and_narrowest_blocks(blocks):
    return blocks if COMPILE_ALL else sorted({min(blocks), max(blocks)})


def tn_configs_compiled(operand_bytes):
    """tn_matmul's configs, each row-block shape at its widest BLOCK_Q (the rank
    block) and the narrowest once, as for the other kernels."""
    from lorakern.kernels.lora_grad_weights import tn_candidates
    from dataclasses import replace

    configs = tn_candidates(operand_bytes)
    pairs = [(replace(c, block_q=0), c.block_q) for c in configs]
    return sorted({replace(c, block_q=q) for c, q in _widest_and_narrowest(pairs)}, key=repr)


def tn_jobs(x, precision):
    """tn_matmul: dA^T, dB (rank-wide configs) and dW, for same-dtype and fp32 adapters."""
    from lorakern.kernels.lora_grad_weights import tn_config_gpu

    jobs = []
    tn_configs = tn_configs_compiled(ELEMENT_BYTES[x])
    for cfg in tn_configs:
        # dW, and dB / db into same-dtype parameters
        jobs.append(tn_job(cfg, precision, x, x, x, x, True, True))
        if cfg != tn_config_gpu(None, ELEMENT_BYTES[x]):
            jobs.append(tn_job(cfg, precision, x, x, x, x, True, False, ["transposed out (dA)"],
                               TN_TRANSPOSED_OUT_UNIT_STRIDES))
    if x != "fp32":
        # fp32 adapters: Q = G or h is fp32, the products run in fp32 and write an
        # fp32 dA^T or dB (with db, in the bias's dtype x, beside it)
        for cfg in tn_configs_compiled(4):
            if cfg == tn_config_gpu(None, 4):
                continue
            mixed = MIXED_PRECISION if cfg.block_q <= 16 else FP32_DEFAULT_PRECISION
            jobs.append(tn_job(cfg, mixed, x, "fp32", "fp32", x, True, True,
                               ["fp32 adapters"]))
            jobs.append(tn_job(cfg, mixed, x, "fp32", "fp32", "fp32", True,
                               False, ["fp32 adapters", "transposed out (dA)"],
                               TN_TRANSPOSED_OUT_UNIT_STRIDES))
    # dA with the grad-input's LoRA term (cublas), masked, rows split, at each rank
    # block it is written for: G in the rank dtype, A and dA in the adapters', dX0 in x's
    from lorakern.kernels.lora_grad_weights import (TERM_RANK_BLOCKS, term_fits,
                                                    tn_term_config_gpu)
    for adapter in ([x] if x == "fp32" else [x, "fp32"]):
        rank = _promoted(x, adapter)
        for block_q in (b for b in TERM_RANK_BLOCKS if term_fits(b, ELEMENT_BYTES[rank])):
            cfg = tn_term_config_gpu(block_q, ELEMENT_BYTES[rank])
            dot, term = precision, precision
            if x != adapter:
                dot = MIXED_PRECISION if block_q <= 16 else FP32_DEFAULT_PRECISION
                term = MIXED_TERM_PRECISION if block_q <= 16 else FP32_DEFAULT_PRECISION
            jobs.append(tn_job(cfg, dot, x, rank, adapter, x, True, False,
                               [f"{adapter} adapters", "dA with dX's term"],
                               TN_TERM_UNIT_STRIDES, term=(adapter, x, term)))
    # one config: the direct store (rows not split), every flag off, unaligned sizes
    cfg = tn_configs[-1]
    jobs += [tn_job(cfg, precision, x, x, x, x, True, True, split=False),
             tn_job(cfg, precision, x, x, x, x, False, False, split=False),
             tn_job(cfg, precision, x, x, x, x, True, True, aligned=False)]
    return jobs


def precision_jobs(x, precision):
    """The compiles of the rank pass, the LoRA GEMM and tn_matmul for x dtype ``x``."""
    adapters = [x] if x == "fp32" else [x, "fp32"]
    jobs = []
    for adapter in adapters:
        jobs += rank_and_gemm_jobs(x, adapter, precision)
    # one config per kernel: flags off, the unaligned specialization, and (16-bit x)
    # the fp32-adapter products under TF32
    cfg, block_r = rank_pairs(x, x)[-1]
    jobs += [rank_job(cfg, block_r, x, x, precision, "h", dropout=False),
             rank_job(cfg, block_r, x, x, precision, "h", unit=False)]
    cfg, block_r = gemm_pairs(x, x)[-1]
    jobs += [gemm_job(cfg, block_r, x, x, precision, precision, "y", False, False),
             gemm_job(cfg, block_r, x, x, precision, precision, "dX", True, True, unit=False)]
    cfg, block_r = grad_output_pairs(x, x)[-1]
    jobs.append(grad_output_job(cfg, block_r, x, x, precision, False, False, False))
    # an unaligned dY has tiles of its own, at every rank block
    from lorakern.kernels.grad_output import grad_output_candidates
    jobs += [grad_output_job(cfg, block_r, x, x, precision, unit=False)
             for cfg, block_r in grad_output_candidates(ELEMENT_BYTES[x], ELEMENT_BYTES[x],
                                                        aligned=False)]
    if x != "fp32":
        cfg, block_r = rank_pairs(x, "fp32")[-1]
        jobs.append(rank_job(cfg, block_r, x, "fp32", "tf32", "h"))
        cfg, block_r = gemm_pairs(x, "fp32")[-1]
        jobs.append(gemm_job(cfg, block_r, x, "fp32", precision, "tf32", "dX", False, True))
        cfg, block_r = grad_output_pairs(x, "fp32")[-1]
        jobs.append(grad_output_job(cfg, block_r, x, "fp32", "tf32"))
    return jobs + tn_jobs(x, precision)


def dropout_mask_jobs():
    from lorakern.kernels.dropout_mask import MASK_BLOCK_K, MASK_BLOCK_M, _dropout_mask_kernel
    from lorakern.kernels.rank_product import RankConfig

    cfg = RankConfig(MASK_BLOCK_M, MASK_BLOCK_K, num_warps=4, num_stages=3)  # launch defaults
    meta = dict(BLOCK_M=MASK_BLOCK_M, BLOCK_K=MASK_BLOCK_K)
    assert _dropout_mask_kernel.__name__ == "_dropout_mask_kernel"
    return [_job("_dropout_mask_kernel", meta, dict(mask_ptr="i8"), cfg, ["aligned"],
                 {"stride_mk"}),
            _job("_dropout_mask_kernel", meta, dict(mask_ptr="i8"), cfg, [], None)]


def embedding_jobs():
    """The LoRA embedding's forward and grad kernels: every table dtype with adapters of
    its dtype and fp32, int64 and int32 ids, at every rank block (each has its own tile;
    these builds take a second or two); the generic specialization once each."""
    from lorakern.kernels.lora_embedding import forward_config, grad_block_d
    from lorakern.kernels.rank_product import RANK_BLOCKS, RankConfig

    cfg = RankConfig(0, 0, num_warps=4, num_stages=1)  # what the launchers pass
    jobs = []
    for table in ("bf16", "fp16", "fp32"):
        for adapter in sorted({table, "fp32"}):
            precision = "ieee" if adapter == "fp32" else "tf32"
            for block_r in RANK_BLOCKS:
                block_t, block_d = forward_config(block_r)
                meta = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_R=block_r,
                            UPCAST_DOT=False, DOT_PRECISION=precision)
                for ids in ("i64", "i32"):
                    pointers = dict(ids_ptr=ids, e_ptr=table, a_ptr=adapter, b_ptr=adapter,
                                    y_ptr=table)
                    jobs.append(_job("_lora_embedding_forward_kernel", meta, pointers, cfg,
                                     [], EMBEDDING_FORWARD_UNIT_STRIDES))
                grad_meta = dict(BLOCK_D=grad_block_d(block_r), BLOCK_R=block_r, NEED_DA=True,
                                 NEED_DE=True)
                grad_pointers = dict(order_ptr="i64", starts_ptr="i64", uids_ptr="i64",
                                     dy_ptr=table, b_ptr=adapter, da_ptr=adapter, de_ptr=table)
                jobs.append(_job("_lora_embedding_grad_kernel", grad_meta, grad_pointers, cfg,
                                 [], EMBEDDING_GRAD_UNIT_STRIDES))
    jobs.append(_job("_lora_embedding_forward_kernel", meta, pointers, cfg, [], None))
    jobs.append(_job("_lora_embedding_grad_kernel", grad_meta, grad_pointers, cfg, [], None))
    return jobs


DORA_NORM_UNIT_STRIDES = {"stride_wk", "stride_ak", "stride_br"}  # contiguous W, A, B


def dora_norm_jobs():
    """DoRA's norm (any strides: generic builds) at the widest rank block of each of
    its tile configs for a bf16 weight with fp32 adapters, at rank block 256 with bf16
    adapters and for an fp32 weight (fp16 loads as bf16 does), the cached squares once,
    and the contiguous aligned build."""
    from lorakern.kernels.dora_norm import norm_config
    from lorakern.kernels.rank_product import RankConfig

    def job(weight, adapter, block_r, sq_given=False, unit_strides=None):
        block_n, block_k, warps = norm_config(block_r)
        meta = dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, SQ_GIVEN=sq_given)
        pointers = dict(w_ptr=weight, a_ptr=adapter, b_ptr=adapter, quad_ptr="fp32",
                        norm_ptr="fp32", sq_ptr="fp32")
        cfg = RankConfig(block_n, block_k, num_warps=warps, num_stages=3)  # launch defaults
        words = ["aligned"] if unit_strides else []
        return _job("_dora_norm_kernel", meta, pointers, cfg, words, unit_strides)

    jobs = [job("bf16", "fp32", block_r) for block_r in (32, 64, 128)]
    for weight, adapter in (("bf16", "fp32"), ("bf16", "bf16"), ("fp32", "fp32")):
        jobs.append(job(weight, adapter, 256))
    jobs.append(job("bf16", "fp32", 32, sq_given=True))
    jobs.append(job("bf16", "fp32", 32, unit_strides=DORA_NORM_UNIT_STRIDES))
    return jobs


def dequant_bnb_jobs():
    """bitsandbytes' dequantisation into each compute dtype: 4-bit with plain and nested
    absmax at the smallest and largest blocksize (the tile of whole absmax blocks a
    program reads: 64 blocks of 16 bytes, or one of 2048), and 8-bit rows;
    floating-point contraction off, as the launchers ask."""
    from lorakern.kernels.dequant_bnb import INT8_BLOCK_K, INT8_BLOCK_N, dequant_4bit_blocks
    from lorakern.kernels.dequant_bnb import INT8_INVERSE_SCALE
    from lorakern.kernels.rank_product import RankConfig

    cfg = RankConfig(0, 0, num_warps=4, num_stages=3)  # Triton's launch defaults
    jobs = []
    for out in ("bf16", "fp16", "fp32"):
        for nested, blocksize in ((False, 32), (False, 4096), (True, 32), (True, 4096)):
            blocks, half = dequant_4bit_blocks(blocksize)
            meta = dict(BLOCKS=blocks, HALF=half, BLOCKSIZE=blocksize,
                        BLOCKSIZE2=256 if nested else 1, NESTED=nested, INTERPRETED=False)
            pointers = dict(packed_ptr="u8", absmax_ptr="u8" if nested else "fp32",
                            code_ptr="fp32", absmax2_ptr="fp32", code2_ptr="fp32",
                            offset_ptr="fp32", out_ptr=out)
            jobs.append(_job("_dequant_4bit_kernel", meta, pointers, cfg,
                             [f"blocksize={blocksize}", f"nested={nested}"], set()))
        meta = dict(BLOCK_N=INT8_BLOCK_N, BLOCK_K=INT8_BLOCK_K, INVERSE_SCALE=INT8_INVERSE_SCALE,
                    INTERPRETED=False)
        jobs.append(_job("_dequant_int8_kernel", meta, dict(cb_ptr="i8", scb_ptr="fp32",
                                                            out_ptr=out), cfg, [], set()))
    jobs.append(_job("_dequant_int8_kernel", meta, dict(cb_ptr="i8", scb_ptr="fp32",
                                                        out_ptr=out), cfg, [], None))
    jobs += qlora_gemm_jobs()
    for job in jobs:
        job["options"]["enable_fp_fusion"] = False
    return jobs


QLORA_Y_UNIT_STRIDES = {"stride_lk", "stride_pr", "stride_qr", "stride_bias", "stride_on"}
QLORA_DX_UNIT_STRIDES = {"stride_lk", "stride_pr", "stride_qn", "stride_on"}


def qlora_gemm_jobs():
    """The GEMM that dequantises W in its main loop, as QLoRA runs it (bf16 x, fp32
    adapters): NF4 with nested absmax at both tiles, the decode forward that makes h,
    the forward (by byte pairs, blocksize 64) and grad-input with the mask; int8
    likewise; an fp16 base once; the generic forward loop (absmax blocks across rows)
    at decode."""
    from lorakern.kernels.qlora_gemm import QLORA_DECODE, QLORA_DECODE_GENERIC, QLORA_SMALL_M

    def job(cfg, x, adapter, fmt, pass_, paired=True):
        in_kernel, dx = pass_ == "y+h", pass_ == "dX"
        paired = paired and fmt == "4bit" and not dx
        if paired:  # the byte-pair forward, one 64-block deep
            cfg = replace(cfg, block_k=min(cfg.block_k, 64))
        elif cfg == QLORA_DECODE:  # as the launcher takes it
            cfg = QLORA_DECODE_GENERIC
        pq = _promoted(x, adapter)
        meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                    BLOCK_R=16, GROUP_M=cfg.group_m, FORMAT=fmt, TRANSPOSED=not dx,
                    PAIRED=paired,
                    BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=fmt == "4bit", STATE=x,
                    HAS_BIAS=not dx, HAS_DROPOUT=dx, UPCAST_DOT=False,
                    DOT_PRECISION="tf32", RANK_DOT_PRECISION="ieee" if pq == "fp32" else "tf32",
                    RANK_IN_KERNEL=in_kernel, RANK_DROPOUT=in_kernel)
        w, scales = ("u8", "u8") if fmt == "4bit" else ("i8", "fp32")
        pointers = dict(l_ptr=x, w_ptr=w, scale_ptr=scales, code_ptr="fp32",
                        absmax2_ptr="fp32", code2_ptr="fp32", offset_ptr="fp32", p_ptr=pq,
                        q_ptr=adapter, pr_ptr=adapter, bias_ptr=x, out_ptr=x)
        strides = (QLORA_DX_UNIT_STRIDES if dx else
                   QLORA_Y_UNIT_STRIDES | ({"stride_prk"} if in_kernel else set()))
        words = [f"pass {pass_}", fmt] + ([] if paired or fmt != "4bit" or dx else ["generic"])
        return _job("_qlora_gemm_kernel", meta, pointers, cfg, words, strides)

    return [job(cfg, "bf16", "fp32", fmt, pass_) for fmt in ("4bit", "int8")
            for cfg, pass_ in ((QLORA_DECODE, "y+h"), (QLORA_SMALL_M, "y"),
                               (QLORA_SMALL_M, "dX"))] + [
        job(QLORA_DECODE, "fp16", "fp16", "4bit", "y+h"),
        job(QLORA_DECODE, "bf16", "fp32", "4bit", "y+h", paired=False),
        job(QLORA_DECODE, "fp16", "fp16", "4bit", "y+h", paired=False)] + qlora_decode_jobs()


def qlora_decode_jobs():
    """The 4-bit decode forward (W as the left operand, y and h from K slices): bf16 x
    with fp32 adapters (QLoRA's default) at rank blocks 16 and 32, with and without the
    mask, nested and plain absmax; fp16 and bf16 x with adapters of their dtype; the
    whole-K build (one slice) once."""
    from lorakern.kernels import qlora_decode as decode
    from lorakern.kernels.lora_gemm import GemmConfig

    cfg = GemmConfig(decode.DECODE_M, decode.BLOCK_N_GPU, decode.BLOCK_K_GPU,
                     num_warps=decode.WARPS_GPU, num_stages=decode.STAGES_GPU)

    def job(x, adapter, block_r, dropout, nested, split=True):
        pq = _promoted(x, adapter)
        rank_precision = MIXED_PRECISION if x != adapter else "tf32"
        term = MIXED_TERM_PRECISION if pq == "fp32" and block_r <= 16 else (
            FP32_DEFAULT_PRECISION if pq == "fp32" else "tf32")
        meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                    BLOCK_R=block_r, BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=nested, STATE=x,
                    HAS_BIAS=True, RANK_DROPOUT=dropout, SPLIT_K=split, UPCAST_DOT=False,
                    DOT_PRECISION="tf32", RANK_DOT_PRECISION=rank_precision,
                    TERM_PRECISION=term)
        pointers = dict(l_ptr=x, w_ptr="u8", scale_ptr="u8" if nested else "fp32",
                        code_ptr="fp32", absmax2_ptr="fp32", code2_ptr="fp32",
                        offset_ptr="fp32", rt_ptr=adapter, h_ptr=pq, q_ptr=adapter,
                        bias_ptr=x, out_ptr=x, part_ptr="fp32", hpart_ptr="fp32",
                        counter_ptr="i32")
        words = ["decode", f"{adapter} adapters"] + (["one slice"] if not split else [])
        return _job("_qlora_decode_kernel", meta, pointers, cfg, words,
                    QLORA_DECODE_UNIT_STRIDES)

    return ([job("bf16", "fp32", block_r, dropout, nested)
             for block_r in (16, 32) for dropout in (False, True) for nested in (True, False)]
            + [job(x, x, 32, True, True) for x in ("bf16", "fp16")]
            + [job("bf16", "fp32", 16, True, True, split=False)])


# x, A^T and B^T (transposed views of A and B), h, y: the decode forward's unit strides
QLORA_DECODE_UNIT_STRIDES = {"stride_lk", "stride_rk", "stride_hr", "stride_qr", "stride_on"}


SEGMENTED_UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_hr"}  # x, stacked A, h
SEGMENTED_RANK_BLOCKS = (16, 128)  # the narrowest tile and a wide one (r_a up to 128)


def segmented_jobs():
    """The mixed batch's segmented rank pass: every x dtype with adapters of its dtype
    and fp32 (h in the promoted dtype; fp32 products IEEE, and TF32 once), at the
    narrowest and a wide rank block; the generic specialization once."""
    from lorakern.kernels.segmented_lora import segment_config

    jobs = []
    for x in ("bf16", "fp16", "fp32"):
        for adapter in sorted({x, "fp32"}):
            precisions = ["ieee", "tf32"] if _promoted(x, adapter) == "fp32" else ["tf32"]
            for block_r in SEGMENTED_RANK_BLOCKS:
                cfg = segment_config(block_r)
                for precision in precisions[:1 if block_r != SEGMENTED_RANK_BLOCKS[-1] else 2]:
                    meta = dict(BLOCK_M=cfg.block_m, BLOCK_R=block_r, BLOCK_K=cfg.block_k,
                                UPCAST_DOT=False, DOT_PRECISION=precision)
                    pointers = dict(x_ptr=x, a_ptr=adapter, h_ptr=_promoted(x, adapter),
                                    segments_ptr="i32")
                    jobs.append(_job("_segmented_rank_kernel", meta, pointers, cfg, [],
                                     SEGMENTED_UNIT_STRIDES))
    cfg = segment_config(16)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_R=16, BLOCK_K=cfg.block_k, UPCAST_DOT=False,
                DOT_PRECISION="ieee")
    jobs.append(_job("_segmented_rank_kernel", meta, pointers, cfg, [], None))
    return jobs


def plan(group):
    """The deduplicated compile jobs of one group (arch independent)."""
    if group == "dora_norm":
        jobs = dora_norm_jobs()
    elif group == "dropout_mask":
        jobs = dropout_mask_jobs()
    elif group == "segmented":
        jobs = segmented_jobs()
    elif group == "embedding":
        jobs = embedding_jobs()
    elif group == "dequant_bnb":
        jobs = dequant_bnb_jobs()
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
            "aligned": bool(job["attrs"]), "min_arch": job["min_arch"]}


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
    """{'REG': registers, 'STACK' and 'LOCAL': bytes of stack frame and local memory
    (where spilled registers go), ...} per thread,
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


def compile_job(job, arch, dump_dir=None, index=0):
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
                      num_stages=compiled.metadata.num_stages,
                      n_regs=getattr(compiled, "n_regs", None),
                      n_spills=getattr(compiled, "n_spills", None),
                      ptx_target=target,
                      ptx_has_entry=f".entry {job['kernel']}" in ptx,
                      cubin_bytes=len(compiled.asm.get("cubin", b"")),
                      error=None)
        usage = resource_usage(compiled.asm["cubin"])
        # spilled registers land in local memory (LOCAL) or in the stack frame (STACK)
        record.update(regs=usage.get("REG"), spill_bytes=usage.get("LOCAL", 0),
                      stack_bytes=usage.get("STACK", 0))
        if dump_dir:
            path = os.path.join(dump_dir, f"{index:03d}{job['kernel']}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            record["cubin_path"] = path
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
    parser.add_argument("--dump", metavar="DIR", help="write each cubin into DIR")
    parser.add_argument("--only", metavar="TEXT",
                        help="compile only the jobs whose kernel and label contain TEXT")
    args = parser.parse_args(argv)
    jobs = [job for job in plan(args.group) if args.arch >= job["min_arch"]]
    if args.only:
        jobs = [job for job in jobs if args.only in f"{job['kernel']} {job['label']}"]
    print(json.dumps({"plan": [describe(job) for job in jobs]}), flush=True)
    if args.list:
        return
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("compile_kernels.py: TRITON_INTERPRET=1 is set; interpreted kernels cannot "
                 "be compiled. Run it with TRITON_INTERPRET unset or 0.")
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    if not args.full_over_limit:
        stop_before_ptx_when_over(SHARED_MEMORY_PER_BLOCK[args.arch])
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    for index, job in enumerate(jobs):
        print(json.dumps(compile_job(job, args.arch, args.dump, index)), flush=True)


if __name__ == "__main__":
    main()
