"""The layer's launch sequences: each is a rank pass and a GEMM with a LoRA epilogue.

    forward     h  = rank_product(x, A^T, scale 1 / (1 - p_eff), mask)      (M, R)
                y  = lora_gemm(x, W^T, P = h, Q = B^T, c = s) + b           (M, N)
    grad-input  G  = rank_product(dY, B)                                    (M, R)
                dX = lora_gemm(dY, W, P = G, Q = A, c = s / (1 - p_eff), mask)

h and G are in the promoted dtype of x and the adapters: fp32 with fp32
adapters, else x's dtype. The mask is generated once per element of x in the
forward (in the rank pass) and once per element of dX in the backward (in the
GEMM's epilogue); the GEMMs' main loops carry neither mask nor rank work.
``launch_counts`` counts these sequences ("lora_forward", "lora_grad_input")
as well as each kernel.
"""
from ._common import launch_counts, lora_dtype
from .dropout import keep_scale
from .lora_gemm import lora_gemm
from .rank_product import rank_product


def lora_forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    """(y, h) for a 2-D x; y in x's dtype, h = drop(x) @ A^T in the rank dtype."""
    h = rank_product(x, lora_a.t(), lora_dtype(x, lora_a, lora_b), keep_scale(dropout_p),
                     dropout_p=dropout_p, seed=seed)
    y = lora_gemm(x, weight.t(), h, lora_b.t(), bias, scale)
    launch_counts["lora_forward"] += 1
    return y, h


def lora_grad_input(grad_y, weight, lora_a, lora_b, scale, dropout_p, seed, need_dx):
    """(dX or None, G) for a 2-D dY; G = dY @ B in the rank dtype, dX in dY's dtype."""
    g = rank_product(grad_y, lora_b, lora_dtype(grad_y, lora_a, lora_b))
    dx = None
    if need_dx:
        dx = lora_gemm(grad_y, weight, g, lora_a, None, scale * keep_scale(dropout_p),
                       dropout_p=dropout_p, seed=seed)
    launch_counts["lora_grad_input"] += 1
    return dx, g
