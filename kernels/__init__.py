"""lorakern's Triton kernels (installed as ``lorakern.kernels``).

The layer:  y = x W^T + b + s * drop(x) A^T B^T,  x (M, K), W (N, K), b (N),
A (R, K), B (N, R), drop(x) = x * m / (1 - p) with a Philox keep-mask m.
With h = drop(x) A^T (kept from the forward) and G = dY B:

    dX = dY W + (s / (1 - p)) (G A) * m       lora_grad_input
    dA = (s / (1 - p)) G^T (x * m)             tn_matmul
    dB = s dY^T h,  db = sum_m dY              tn_matmul (one pass)
    dW = dY^T x   (only when W trains)         tn_matmul

No kernel forms the N x K product A B.
"""
from ._common import SUPPORTED_DTYPES, empty, launch_counts, rank_block
from .dropout_mask import dropout_keep_mask
from .lora_embedding import lora_embedding_backward, lora_embedding_forward
from .lora_forward import lora_forward
from .lora_grad_input import lora_grad_input
from .lora_grad_weights import tn_matmul

__all__ = ["SUPPORTED_DTYPES", "empty", "launch_counts", "rank_block", "dropout_keep_mask",
           "lora_embedding_backward", "lora_embedding_forward", "lora_forward", "lora_grad_input", "tn_matmul"]
