"""lorakern's Triton kernels (installed as ``lorakern.kernels``).

The layer:  y = x W^T + b + s * drop(x) A^T B^T,  x (M, K), W (N, K), b (N),
A (R, K), B (N, R), drop(x) = x * m / (1 - p_eff) with the Philox keep-mask m
(dropout.py; p_eff is p quantised to 1/65536). With h = drop(x) A^T (kept from
the forward) and G = dY B:

    h  = (1 / (1 - p_eff)) (x * m) A^T          rank_product       (mask made here)
    y  = x W^T + b + s h B^T                    lora_gemm, or addmm onto lora_term's
                                                b + s h B^T (the cublas strategy)
    G  = dY B,                                  grad_output        (one read of dY for
    dB = s dY^T h,  db = sum_m dY                                   all three; rank_product
                                                                    and tn_matmul past its
                                                                    partial budget: r > 32,
                                                                    r > 16 with fp32
                                                                    adapters on 16 bits)
    dX = dY W + (s / (1 - p_eff)) (G A) * m     lora_gemm          (mask in the epilogue),
                                                or addmm onto the masked term, which
                                                dA's tn_matmul writes (rank block 16,
                                                32 in 16 bits; else lora_term)
    dA = (s / (1 - p_eff)) G^T (x * m)          tn_matmul          (mask per x tile)
    dW = dY^T x   (only when W trains)          tn_matmul

Sums across programs (dB, db and G in grad_output, split rows in tn_matmul)
are made by the last program to finish each block, in a fixed order, inside
the launch: deterministic, no float atomics; int32 counters that the kernels
reset themselves, so no memset launch goes with them.

dequant_bnb.py dequantises bitsandbytes' 4-bit and 8-bit weights into a buffer
of the compute dtype, bit-exact with bitsandbytes (QLoRA bases, the cublas
strategy); qlora_gemm.py is lora_gemm with that dequantisation in its main
loop (the fused strategy: 4 or 8 bits read a weight, no buffer), and
qlora_decode.py the 4-bit decode forward (M <= 16: y and h in one launch, K
split across programs, W as the dot's left operand).
A mixed-adapter batch (inference) makes h with each row's own adapter's A
(segmented_lora.py: zero outside that adapter's columns of the stacked A) and
runs lora_gemm once with the stacked B.

No kernel forms the N x K product A B. h and G are fp32 when the adapters are
(PEFT's default on a 16-bit base), else in x's dtype.
"""
from ._common import SUPPORTED_DTYPES, empty, launch_counts, rank_block
from .dequant_bnb import dequantize_4bit, dequantize_int8
from .dropout import effective_dropout_p, keep_scale
from .dora_norm import dora_weight_norm
from .dropout_mask import dropout_keep_mask
from .grad_output import grad_output
from .lora_embedding import lora_embedding_backward, lora_embedding_forward
from .lora_gemm import lora_gemm
from .lora_grad_weights import tn_matmul
from .lora_layer import (STRATEGIES, Plan, layer_plans, lora_forward, lora_forward_with_h,
                         lora_grad_a, lora_grad_input, lora_grad_output)
from .lora_term import lora_term
from .qlora_gemm import QuantizedOperand
from .rank_product import rank_product
from .segmented_lora import segment_config, segment_tiles, segmented_rank_product

__all__ = ["SUPPORTED_DTYPES", "empty", "launch_counts", "rank_block", "effective_dropout_p",
           "keep_scale", "dora_weight_norm", "dropout_keep_mask", "lora_embedding_backward", "lora_embedding_forward",
           "lora_gemm", "lora_term", "rank_product", "grad_output", "lora_forward",
           "lora_forward_with_h", "lora_grad_a", "lora_grad_input", "lora_grad_output", "tn_matmul",
           "STRATEGIES", "Plan", "layer_plans", "dequantize_4bit", "dequantize_int8",
           "segment_config", "segment_tiles", "segmented_rank_product", "QuantizedOperand"]
