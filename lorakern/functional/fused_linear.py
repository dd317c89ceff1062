"""FusedLoRALinear: the autograd Function over the Triton kernels.

Saved for the backward: x (only when dA or dW is wanted), h = drop(x) A^T
(M x r, only when dB is wanted), the dropout seed (an int), and references to
W, A and B. Neither the dropout mask nor a dropped copy of x is stored: the
kernels regenerate the mask from the seed. Beyond x and the parameters, a
layer keeps M * r * 4 bytes for h when the adapters (or x) are fp32, M * r * 2
with 16-bit adapters of x's dtype, and an int.

Backward launches (dX, dA, dB and db, W frozen): one pass over dY that makes
G = dY B (fp32 with fp32 adapters), dB and db together (kernels/grad_output.py);
dX by the GEMM with the rank term in its epilogue (strategy ``fused``) or by
torch's matmul onto the masked rank term (``cublas``; the dispatch point picks,
kernels/lora_layer.py); dA from x and G (tn_matmul). So dY is read once for the
rank work and once by the dX GEMM. Without dB, G comes from the rank pass; past the
one pass's partial budget (ranks over 32, over 16 with fp32 adapters on a
16-bit base), from the rank pass with dB and db from tn_matmul. dW only when
W trains. Only the gradients autograd asks for are computed.

``fused_forward`` and ``fused_backward`` hold the launch sequence; the
autograd Function here and the torch.library op in ``ops.py`` both call them;
``linear.py`` (``lora_linear``) picks between them and the reference.
They hand the kernels x, dY, W, A and B with unit stride along the last dim
(``layouts.unit_rows``), copying any other layout; W is read through its
``BaseWeight`` (``base_weight.py``).

Threads: calls from several threads at once (forwards, and backwards in
autograd's threads) each get what they would get alone; the launch sequence
keeps nothing between calls but the tuner's choices (``autotune.py``) and the
kernels' shared buffers (kernels/_common.py), both safe to share. The dropout
seed comes from torch's CPU generator, one for the process: threads draw in
the order they run, as torch's own dropout does.
"""
import torch
from torch.autograd.function import once_differentiable

from .base_weight import BaseWeight, DenseWeight
from .dispatch import choose_plan, load_kernels
from .layouts import flatten, unit_rows

def _unit_row_adapters(lora_A, lora_B):
    return unit_rows(lora_A, "lora_A"), unit_rows(lora_B, "lora_B")


def draw_seed():
    """A dropout seed from torch's CPU generator: follows torch.manual_seed and
    the RNG state that torch.utils.checkpoint restores, and never syncs a GPU."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _base_weight(weight):
    return weight if isinstance(weight, BaseWeight) else DenseWeight(weight)


def fused_forward(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed):
    """Returns (y [..., out], h [M, r]); h is fp32 with fp32 adapters, else x's dtype.
    ``weight``: a tensor or a ``BaseWeight``."""
    kernels = load_kernels(x.device)
    x2 = unit_rows(flatten(x), "x")
    base = _base_weight(weight)
    w = base.kernel_operand()
    lora_A, lora_B = _unit_row_adapters(lora_A, lora_B)

    def run(plan):
        return kernels.lora_forward(x2, w, lora_A, lora_B, bias, scale, dropout_p, seed, plan)

    y, h = run(choose_plan("forward", kernels, x2, w, lora_A, lora_B, dropout_p, run,
                           base.strategy))
    return y.reshape(*x.shape[:-1], base.shape[0]), h


def fused_backward(grad_y, x, weight, lora_A, lora_B, h, scale, dropout_p, seed, needs):
    """Gradients (dx, dW, dA, dB, db), None where ``needs`` (five flags) is False.

    x is needed for dA and dW, h for dB; db has grad_y's dtype (the bias shares
    x's dtype).
    """
    need_x, need_w, need_a, need_b, need_bias = needs
    base = _base_weight(weight)
    kernels = load_kernels(grad_y.device)
    dy = unit_rows(flatten(grad_y), "dY")
    # once: a non-viewable x (a permuted 3-D input) is copied by the reshape
    x2 = unit_rows(flatten(x), "x") if need_a or need_w else None
    lora_A, lora_B = _unit_row_adapters(lora_A, lora_B)
    device = dy.device
    grad_x = grad_w = grad_a = grad_b = grad_bias = None
    if need_bias:
        grad_bias = kernels.empty(base.shape[0], grad_y.dtype, device)
    if need_b:
        grad_b = kernels.empty(lora_B.shape, lora_B.dtype, device)

    # G = dY B, wanted for dX and dA; with dB, one pass over dY makes G, dB and db.
    # It runs once, before dX's plan is chosen, so the tuner times dX alone.
    need_g = need_x or need_a
    g = None
    if need_g or need_b:
        g = kernels.lora_grad_output(dy, lora_A, lora_B, h, scale, grad_b,
                                     grad_bias if need_b else None, need_g)
    if need_a:
        grad_a = kernels.empty(lora_A.shape, lora_A.dtype, device)
    if need_x:
        w = base.kernel_operand()  # a quantised base's is dequantised here, for dX only

        # dA with dX: the cublas plan makes it in the launch of dX's LoRA term, and
        # every plan the tuner times makes both (dA^T (K, r) written into dA's storage)
        def run(plan):
            return kernels.lora_grad_input(dy, w, lora_A, lora_B, g, scale, dropout_p, seed,
                                           plan, x=x2 if need_a else None, grad_a=grad_a)

        dx = run(choose_plan("grad_input", kernels, dy, w, lora_A, lora_B, dropout_p, run,
                             base.strategy))
        grad_x = dx.reshape(grad_y.shape[:-1] + (base.shape[1],))
    elif need_a:
        kernels.lora_grad_a(x2, g, lora_A, grad_a, scale, dropout_p, seed)
    if need_w:
        grad_w = base.grad_buffer(kernels.empty)
        kernels.tn_matmul(dy, x2, grad_w, 1.0,
                          colsum=grad_bias if not need_b else None)
    if need_bias and not (need_b or need_w):
        grad_bias.copy_(dy.sum(0, dtype=torch.float32))
    return grad_x, grad_w, grad_a, grad_b, grad_bias


class FusedLoRALinear(torch.autograd.Function):
    """``FusedLoRALinear.apply(x, weight, lora_A, lora_B, bias, scale, dropout_p)``.

    Inputs are expected validated (``lorakern.lora_linear`` does it); x may have
    any leading dimensions and strides. Returns ``[..., out_features]``.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scale, dropout_p):
        seed = draw_seed() if dropout_p > 0.0 else 0
        y, h = fused_forward(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed)
        _, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        ctx.save_for_backward(x if (need_a or need_w) else None, weight, lora_A, lora_B,
                              h if need_b else None)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, h = ctx.saved_tensors
        grads = fused_backward(grad_y, x, weight, lora_A, lora_B, h, ctx.scale, ctx.dropout_p,
                               ctx.seed, ctx.needs_input_grad[:5])
        return grads + (None, None)
