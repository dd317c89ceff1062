"""The layer's launch sequences, in two strategies that share the rank passes.

``fused``: a GEMM with the LoRA term in its epilogue (lora_gemm.py)

    forward     h  = rank_product(x, A^T, scale 1 / (1 - p_eff), mask)      (M, R)
                y  = lora_gemm(x, W^T, P = h, Q = B^T, c = s) + b           (M, N)
    grad-input  dX = lora_gemm(dY, W, P = G, Q = A, c = s / (1 - p_eff), mask)

``cublas``: torch's matmul for the big product, the LoRA term as its C operand

    forward     h   = rank_product(x, A^T, scale 1 / (1 - p_eff), mask)
                y0  = lora_term(P = h, Q = B^T, c = s) + b                  (M, N)
                y   = addmm(y0, x, W^T)               in place, beta = 1
    grad-input  dX0 = lora_term(P = G, Q = A, c = s / (1 - p_eff), mask)
                dX  = addmm(dX0, dY, W)
    with dA     dX0 and dA = (s / (1 - p_eff)) G^T (x * m) from one tn_matmul
                launch (``term_fits``: rank block 16, or 32 in 16 bits), then the addmm

and, shared by both, before dX (``lora_grad_output``):

    G = dY B (M, R), with dB = s dY^T h and db = sum dY when dB is wanted:
        grad_output(dY, B, h)     one pass over dY (grad_output.py; two passes,
                                  rank_product and tn_matmul, past its budget)
    G alone:
        rank_product(dY, B)

G is made once per backward and handed to ``lora_grad_input``, so the tuner's
grad-input candidates (``run(plan)``) time and repeat dX alone. Decode (M <=
16, the whole rank in one epilogue chunk) in ``fused`` skips the forward's
rank pass: the GEMM makes h itself (lora_gemm.py, ``rank_in_kernel``), one
launch for the forward. Both strategies save the same tensors and draw the
same mask from the same seed. A
``Plan`` names a strategy and, for ``fused``, the GEMM's tile config;
``layer_plans`` lists the plans a call may take, the table's choice first.

h and G are in the promoted dtype of x and the adapters: fp32 with fp32
adapters, else x's dtype. The mask is generated once per element of x in the
forward (in the rank pass) and once per element of dX in the backward (in the
GEMM's epilogue); the GEMMs' main loops carry neither mask nor rank work.
W may be a ``QuantizedOperand`` (qlora_gemm.py: a bitsandbytes 4-bit or 8-bit
base): ``fused`` then runs qlora_gemm, which dequantises W's tiles in its main
loop, and ``cublas`` dequantises W into a buffer for the one addmm that reads
it, freed when it returns. ``launch_counts`` counts these sequences ("lora_forward", "lora_grad_input":
dX given G) as well as each kernel.
"""
from dataclasses import dataclass
from typing import Optional

from . import _common
from ._common import count_launch, empty, lora_dtype
from .dropout import keep_scale
from .grad_output import grad_output
from .lora_grad_weights import term_fits, tn_matmul
from .lora_gemm import (GemmConfig, config_name, epilogue_rank_block, lora_gemm,
                        lora_gemm_tuning_configs, rank_in_kernel, tma_operands)
from .lora_term import lora_term
from .qlora_decode import decodes, qlora_decode
from .qlora_gemm import QuantizedOperand, qlora_gemm, qlora_gemm_config
from .rank_product import rank_product

STRATEGIES = ("fused", "cublas")

# The table's strategy by token count (when not tuning): from 256 tokens the
# GEMM dominates and cuBLAS's is predicted faster than the Triton one without
# TMA (bench/NOTES.md: 0.077 against 0.096 ms fwd+bwd at 4096x4096, M = 256);
# below, one launch fewer and no M x N round trip of the C operand win or tie
CUBLAS_FROM_M = 256


@dataclass(frozen=True)
class Plan:
    strategy: str
    gemm: Optional[GemmConfig] = None

    @property
    def name(self):
        return self.strategy if self.gemm is None else f"{self.strategy}:{config_name(self.gemm)}"


def layer_plans(m, x, lora_a, lora_b, weight=None):
    """Every plan for a call with M tokens of x's dtype (forward or grad-input:
    the GEMM's left operand is x or dY, of one dtype), the table's choice first.
    With ``weight`` given, the fused GEMM's TMA builds lead where the GPU has
    TMA and x (or dY) and W can be read through descriptors."""
    cublas = [Plan("cublas")]
    if isinstance(weight, QuantizedOperand):
        fused = [Plan("fused", qlora_gemm_config(m))]
        return cublas + fused if m >= CUBLAS_FROM_M else fused + cublas
    pq_bytes = lora_dtype(x, lora_a, lora_b).itemsize
    block_r = epilogue_rank_block(lora_a.shape[0], pq_bytes)
    tma = (weight is not None and _common.tma_supported(x.device)
           and tma_operands(x, weight) is not None)
    ieee = _common.dot_precision(x.dtype) == "ieee"
    fused = [Plan("fused", cfg)
             for cfg in lora_gemm_tuning_configs(m, x.element_size(), block_r, pq_bytes, tma,
                                                 ieee)]
    return cublas + fused if m >= CUBLAS_FROM_M else fused + cublas


def _base_plus(c, lhs, rhs_t):
    """c += lhs @ rhs_t by torch's matmul (cuBLAS on CUDA), c read once as the C operand;
    a quantised rhs_t dequantised into a buffer that lives for this product only."""
    if isinstance(rhs_t, QuantizedOperand):
        rhs_t = rhs_t.dense()
    return c.addmm_(lhs, rhs_t)


def lora_forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, plan=None):
    """(y, h) for a 2-D x; y in x's dtype, h = drop(x) @ A^T in the rank dtype.
    ``plan`` defaults to the table's choice for x."""
    plan = plan or layer_plans(x.shape[0], x, lora_a, lora_b, weight)[0]
    rank_dtype = lora_dtype(x, lora_a, lora_b)
    if plan.strategy == "fused" and rank_in_kernel(x.shape[0], weight.shape[0],
                                                   lora_a.shape[0], rank_dtype.itemsize):
        # decode: the GEMM fills h itself, one launch in all
        h = empty((x.shape[0], lora_a.shape[0]), rank_dtype, x.device)
        quantised = isinstance(weight, QuantizedOperand)
        if quantised and decodes(weight.t(), x.shape[0], lora_a.shape[0]):
            y = qlora_decode(x, weight.t(), h, lora_b.t(), bias, scale, lora_a.t(),
                             keep_scale(dropout_p), dropout_p, seed)
        else:
            gemm = qlora_gemm if quantised else lora_gemm
            y = gemm(x, weight.t(), h, lora_b.t(), bias, scale, config=plan.gemm,
                     rank_rt=lora_a.t(), rank_scale=keep_scale(dropout_p),
                     rank_dropout_p=dropout_p, seed=seed)
    else:
        h = rank_product(x, lora_a.t(), rank_dtype, keep_scale(dropout_p),
                         dropout_p=dropout_p, seed=seed)
        y = _with_lora_term(plan, x, weight.t(), h, lora_b.t(), bias, scale)
    count_launch("lora_forward")
    return y, h


def lora_forward_with_h(x, weight, h, lora_b, bias, scale, plan):
    """y = x W^T + b + s h B^T for an h already made (a mixed-adapter batch's,
    segmented_lora.py), by ``plan``'s strategy."""
    return _with_lora_term(plan, x, weight.t(), h, lora_b.t(), bias, scale)


def _with_lora_term(plan, lhs, rhs_t, p, q, bias, lora_scale, dropout_p=0.0, seed=0):
    """lhs @ rhs_t + bias + lora_scale * (p @ q) * m, by ``plan``'s strategy."""
    if plan.strategy == "cublas":
        c = lora_term(p, q, bias, lora_scale, lhs.dtype, dropout_p=dropout_p, seed=seed)
        return _base_plus(c, lhs, rhs_t)
    gemm = qlora_gemm if isinstance(rhs_t, QuantizedOperand) else lora_gemm
    return gemm(lhs, rhs_t, p, q, bias, lora_scale, dropout_p=dropout_p, seed=seed,
                config=plan.gemm)


def lora_grad_output(grad_y, lora_a, lora_b, h, scale, grad_b, grad_bias, need_g):
    """G = dY @ B (M, R) in the rank dtype, or None when not ``need_g``.

    With ``grad_b`` given, the same pass over dY also writes dB = s dY^T h into it
    and, with ``grad_bias`` given, db = sum over rows of dY (grad_output.py; two
    passes when its partials would not fit). Without, G comes from the rank pass.
    """
    g_dtype = lora_dtype(grad_y, lora_a, lora_b)
    if grad_b is None:
        return rank_product(grad_y, lora_b, g_dtype) if need_g else None
    return grad_output(grad_y, lora_b, h, scale, grad_b, grad_bias, g_dtype if need_g else None)


def lora_grad_input(grad_y, weight, lora_a, lora_b, g, scale, dropout_p, seed, plan=None,
                    x=None, grad_a=None):
    """dX for a 2-D dY, in dY's dtype, from G = dY @ B (``lora_grad_output``).
    ``plan`` defaults to the table's choice for dY. With x (2-D) and ``grad_a``
    given, dA = (s / (1 - p_eff)) G^T (x * m) is written into grad_a too: in
    ``cublas`` by the launch that makes dX's LoRA term (tn_matmul's term), else
    by tn_matmul after dX, so that every plan's run makes both."""
    plan = plan or layer_plans(grad_y.shape[0], grad_y, lora_a, lora_b, weight)[0]
    rank_block = _common.rank_block(lora_a.shape[0])
    if grad_a is not None and plan.strategy == "cublas" and term_fits(rank_block,
                                                                       g.element_size()):
        dx0 = empty((grad_y.shape[0], lora_a.shape[1]), grad_y.dtype, grad_y.device)
        lora_grad_a(x, g, lora_a, grad_a, scale, dropout_p, seed, term_out=dx0)
        dx = _base_plus(dx0, grad_y, weight)
    else:
        dx = _with_lora_term(plan, grad_y, weight, g, lora_a, None,
                             scale * keep_scale(dropout_p), dropout_p, seed)
        if grad_a is not None:
            lora_grad_a(x, g, lora_a, grad_a, scale, dropout_p, seed)
    count_launch("lora_grad_input")
    return dx


def lora_grad_a(x, g, lora_a, grad_a, scale, dropout_p, seed, term_out=None):
    """dA = (s / (1 - p_eff)) G^T (x * m) into grad_a (dA^T written into its (r, K)
    storage); with ``term_out``, dX's LoRA term (s / (1 - p_eff)) (G A) * m into it
    from the same launch."""
    tn_matmul(x, g, grad_a.t(), scale * keep_scale(dropout_p),
              rank_block=_common.rank_block(lora_a.shape[0]), dropout_p=dropout_p, seed=seed,
              term_rhs=None if term_out is None else lora_a, term_out=term_out)
