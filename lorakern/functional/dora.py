"""DoRA (weight-decomposed LoRA) linear: PEFT's ``use_dora=True`` layer.

    n   = ||W + s B A||_row            (out,), detached: no gradient flows through it
    g   = m / n                        (out,), m the trainable magnitude vector
    y   = x W^T + b + (g - 1) * base + g * s * (x' A^T) B^T

with, as PEFT 0.21.2 computes it (``tuners/lora/variants.py``, ``dora.py``):

- without dropout (p = 0, or the layer in eval): x' = x and base = x W^T, so
  ``y = g * (x W^T + s (x A^T) B^T) + b``;
- with dropout (training, p > 0): x' = drop(x) and base = drop(x) W^T, a second
  product with the base weight: ``y = (x - x') W^T + g * (x' W^T + s (x' A^T) B^T) + b``.

Gradients (W frozen), z = x' W^T + s (x' A^T) B^T and dZ = g * dY (per column):

    dm = sum_rows(dY * z) / n       dA = s (dZ B)^T x'       dB = s dZ^T (x' A^T)
    db = sum_rows(dY)               dX = dY W + (dZ - dY) W + s (dZ B) A    (p = 0: dZ W + s (dZ B) A)
                                    with dropout the last two terms pass through the mask.

The norm never forms the out x in matrix W + s B A: for row i,

    n_i^2 = ||W_i||^2 + 2 s B_i . (A W_i^T) + s^2 B_i (A A^T) B_i^T

(kernels/dora_norm.py, one pass over W with the r x out product A W^T). The
reference (``dora_linear_masked``) takes the norm PEFT's way, on the dense sum, as
the oracle. The rank product and the scale g are in the promoted dtype of x, A, B
and m (fp32 adapters on a 16-bit base compute in fp32, as PEFT does); y has x's dtype.

The kernels' path (``FusedDoRALinear``) without dropout is LoRA's launch sequence
with g applied one of two ways, by cost (``folds_into_weight``):

- M >= in_features: g folded into W's and B's rows, ``y = x (gW)^T + b + s h (gB)^T``,
  and the backward is LoRA's on (dY, gW, gB): G = dY (gB) = dZ B, dX = dY (gW) + s G A,
  dB = g * (s dY^T h). gW (out x in, W's dtype) is made in the forward and again in
  the backward, and freed after each GEMM: one read and one write of W per direction.
- M < in_features: y = g * z + b in place on the kernels' z, and dZ = g * dY.

With dropout: drop(x) from the kernels' regenerated keep-mask (never stored), z by
the LoRA sequence on it, the second base product (x - drop(x)) W^T by torch's matmul.

Saved for the backward beyond LoRA's (x, h = x' A^T, W, A, B): m and n ((out,)
each), and for dm the layer's own output y (no copy; z = (y - b) / g); z itself
(M x out, x's dtype, as PEFT keeps its base product) with dropout or when some m_i
is 0. ||W_i||^2 (out x 4 bytes) is kept per weight across calls.
"""
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .base_weight import DenseWeight
from .dispatch import choose_plan, load_kernels, select_backend
from .fused_linear import draw_seed
from .layouts import flatten, unit_rows
from .validation import (check_base_dtypes, check_scalars, check_scale_fits, check_tensors,
                         lora_compute_dtype)


def check_magnitude(magnitude, weight):
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"magnitude must be (out_features={weight.shape[0]},) to match weight "
                         f"{tuple(weight.shape)}, got shape {tuple(magnitude.shape)}")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude has dtype {magnitude.dtype}; expected a float dtype")
    if magnitude.device != weight.device:
        raise ValueError(f"magnitude is on {magnitude.device}, weight on {weight.device}; "
                         f"all tensors must be on one device")


def dora_linear(x, weight, lora_A, lora_B, magnitude, scale=1.0, bias=None, dropout_p=0.0):
    """PEFT's DoRA linear, fused where the kernels serve the call.

    Args:
        x: ``[..., in_features]``; weight: ``[out_features, in_features]`` (frozen: no
            gradient is computed for it), x's dtype; bias: optional ``[out_features]``.
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]``.
        magnitude: ``[out_features]``, m (PEFT's ``lora_magnitude_vector``).
        scale: s (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout_p: > 0 means PEFT's training forward with dropout (the second base
            product on drop(x)); pass 0 in eval, as PEFT then takes no dropout.
    Returns:
        ``[..., out_features]`` in x's dtype.
    """
    check_tensors(x, weight, lora_A, lora_B, bias)
    check_magnitude(magnitude, weight)
    check_base_dtypes(x, weight, bias)
    scale, dropout_p = check_scalars(scale, dropout_p)
    check_scale_fits(scale, lora_compute_dtype(x, lora_A, lora_B), "x, lora_A and lora_B")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"dora_linear: weight {tuple(weight.shape)} requires grad; DoRA "
                         f"trains A, B and the magnitude with W frozen (as PEFT does)")
    if select_backend(x, weight, lora_A, lora_B, bias, magnitude) == "reference":
        return dora_linear_unchecked(x, weight, lora_A, lora_B, magnitude, scale, bias,
                                     dropout_p)
    return FusedDoRALinear.apply(x, weight, lora_A, lora_B, magnitude, bias, scale, dropout_p)


# ------------------------------------------------------------------ the reference
def dense_weight_norm(weight, lora_A, lora_B, scale, dtype):
    """PEFT's norm, ``||W + s B A||`` per row on the dense sum in ``dtype``, detached."""
    with torch.no_grad():
        dense = weight.to(dtype) + scale * (lora_B.to(dtype) @ lora_A.to(dtype))
        return torch.linalg.norm(dense, dim=1)


def dense_weight_norm_chunked(weight, lora_A, lora_B, scale, rows_per_step=1024):
    """``dense_weight_norm`` in float32 (at least) a block of rows at a time: a layer's
    initial magnitude and its merge, with a few block-sized temporaries."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        a, b = lora_A.to(weight.device, compute), lora_B.to(weight.device, compute)
        parts = [torch.linalg.norm(weight[start:start + rows_per_step].to(compute)
                                   + scale * (b[start:start + rows_per_step] @ a), dim=1)
                 for start in range(0, weight.shape[0], rows_per_step)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=compute,
                                                          device=weight.device)


def dora_linear_unchecked(x, weight, lora_A, lora_B, magnitude, scale, bias, dropout_p):
    keep_mask = None
    if dropout_p > 0.0:
        keep_mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        keep_mask.bernoulli_(1.0 - dropout_p)
    return dora_linear_masked(x, weight, lora_A, lora_B, magnitude, scale, bias, keep_mask,
                              dropout_p)


def dora_linear_masked(x, weight, lora_A, lora_B, magnitude, scale, bias, keep_mask,
                       dropout_p):
    """The layer in plain PyTorch with an explicit keep-mask (dropout on) or None (off),
    term by term as PEFT computes it."""
    result = F.linear(x, weight, bias)
    lora_dtype = lora_compute_dtype(x, lora_A, lora_B)
    lora_in = x.to(lora_dtype)
    norm = dense_weight_norm(weight, lora_A, lora_B, scale, lora_dtype)
    column_scale = (magnitude / norm).view(1, -1)
    if keep_mask is None:
        base = result if bias is None else result - bias
    else:
        lora_in = torch.where(keep_mask, lora_in, 0.0) / (1.0 - dropout_p)
        base = F.linear(lora_in, weight.to(lora_dtype))
    lora = F.linear(F.linear(lora_in, lora_A.to(lora_dtype)), lora_B.to(lora_dtype))
    extra = (column_scale - 1) * base + column_scale * lora * scale
    return (result + extra).to(x.dtype)


# ------------------------------------------------------------------ the kernels
_row_sq_cache = {}  # id(weight) -> (weakref to it, its _version, ||W_i||^2)
_row_sq_lock = threading.Lock()


def _cached_row_sq_norms(weight):
    """||W_i||^2 of this weight at its current version, or None."""
    with _row_sq_lock:
        entry = _row_sq_cache.get(id(weight))
    if entry is None:
        return None
    ref, version, sq = entry
    return sq if ref() is weight and version == weight._version else None


def _remember_row_sq_norms(weight, sq):
    key = id(weight)
    ref = weakref.ref(weight, lambda _, key=key: _row_sq_cache.pop(key, None))
    with _row_sq_lock:
        _row_sq_cache[key] = (ref, weight._version, sq)


def weight_row_norms(weight, lora_A, lora_B, scale):
    """n = ||W + s B A|| per row, fp32 (out,), by the factored norm (kernels/dora_norm.py).
    ||W_i||^2 is kept per weight (the tensor and its version: an in-place update
    of W, a merge, takes it anew)."""
    kernels = load_kernels(weight.device)
    cached = _cached_row_sq_norms(weight)
    norm, sq = kernels.dora_weight_norm(weight, lora_A, lora_B, scale, cached)
    if cached is None:
        _remember_row_sq_norms(weight, sq)
    return norm


def _lora_product(kernels, x2, w, lora_A, lora_B, scale, bias=None):
    """(x W^T + b + s (x A^T) B^T, x A^T) by the LoRA launch sequence, no dropout."""
    def run(plan):
        return kernels.lora_forward(x2, w, lora_A, lora_B, bias, scale, 0.0, 0, plan)

    return run(choose_plan("forward", kernels, x2, w, lora_A, lora_B, 0.0, run))


def folds_into_weight(rows, in_features):
    """Whether g goes into W's rows (one read and write of W, out x in elements) rather
    than onto the output and dY (a read and write of M x out each): the fold is
    cheaper once M >= in_features."""
    return rows >= in_features


def _folded(w, lora_B, column_scale):
    """(g * W, g * B) in W's and B's dtypes: DoRA without dropout is LoRA on these."""
    w_g = torch.empty_like(w)
    torch.mul(w, column_scale[:, None], out=w_g)  # fp32 products, rounded once
    b_g = (lora_B.float() * column_scale[:, None]).to(lora_B.dtype)
    return w_g, b_g


def _keep_mask(kernels, x2, dropout_p, seed):
    """The kernels' keep-mask (M, in), bool, regenerated from the seed."""
    return kernels.dropout_keep_mask(x2.shape[0], x2.shape[1], dropout_p, seed, x2.device)


def _masked(t, keep, kernels, dropout_p):
    """t * mask / (1 - p_eff), in t's dtype (a where and a scale: no fp32 copy)."""
    return torch.where(keep, t, 0).mul_(kernels.keep_scale(dropout_p))


def _column_scale(magnitude, norm):
    return magnitude.float() / norm


def _dora_forward(x2, w, lora_A, lora_B, magnitude, bias, scale, dropout_p, seed, norm,
                  plan):
    """(y, h, z): y [M, out] in x's dtype, h = x' A^T, and z = x' W^T + s h B^T when
    ``plan`` is "save z" (else None). ``plan``: "fold", "scale output" or "save z"."""
    kernels = load_kernels(x2.device)
    column_scale = _column_scale(magnitude, norm)
    if plan == "fold":
        w_g, b_g = _folded(w, lora_B, column_scale)
        y, h = _lora_product(kernels, x2, w_g, lora_A, b_g, scale, bias)
        return y, h, None
    if dropout_p == 0.0:
        z, h = _lora_product(kernels, x2, w, lora_A, lora_B, scale)
        y = z.mul_(column_scale) if plan == "scale output" else z * column_scale
    else:
        dropped = _masked(x2, _keep_mask(kernels, x2, dropout_p, seed), kernels, dropout_p)
        z, h = _lora_product(kernels, dropped, w, lora_A, lora_B, scale)
        # PEFT's second product with W, on the dropped input: (x - x') W^T + g z
        y = torch.mm(x2 - dropped, w.t()).addcmul_(z, column_scale.to(z.dtype))
    if bias is not None:
        y.add_(bias)
    return y.to(x2.dtype), h, (z if plan == "save z" else None)


def _forward_plan(x2, magnitude, dropout_p):
    """How the forward applies g and what dm reads: "fold" and "scale output" save the
    output y (z = (y - b) / g); with dropout, or some m_i = 0 (one read of m, a sync on
    a GPU), z is saved."""
    # a meta magnitude (shapes only: a model built empty, a capture) is taken as nonzero
    has_zero = magnitude.device.type != "meta" and not bool((magnitude != 0).all())
    if dropout_p > 0.0 or has_zero:
        return "save z"
    return "fold" if folds_into_weight(x2.shape[0], x2.shape[1]) else "scale output"


def _grad_magnitude(ctx, dy, kept, bias, magnitude, norm):
    """dm = sum_rows(dY * z) / n; from y itself, (sum_rows(dY * y) - b * sum_rows(dY)) / m.
    Each column's dot product in one batched product (fp32 accumulation, one read of dY
    and of y or z; no M x out temporary)."""
    column_dots = torch.einsum("mj,mj->j", dy, kept).float()
    if ctx.plan == "save z":
        return column_dots.div_(norm).to(magnitude.dtype)
    if bias is not None:
        column_dots.sub_(bias.float() * dy.sum(0, dtype=torch.float32))
    return column_dots.div_(magnitude.float()).to(magnitude.dtype)


def _dora_backward(ctx, grad_y):
    x2, w, lora_A, lora_B, magnitude, bias, h, kept, norm = ctx.saved_tensors
    need_x, _, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:6]
    kernels = load_kernels(grad_y.device)
    scale, dropout_p, seed = ctx.scale, ctx.dropout_p, ctx.seed
    dy = unit_rows(flatten(grad_y), "dY")
    column_scale = _column_scale(magnitude, norm)
    grad_x = grad_a = grad_b = grad_m = grad_bias = None
    if need_m:
        grad_m = _grad_magnitude(ctx, dy, kept, bias, magnitude, norm)
    if need_b:
        grad_b = kernels.empty(lora_B.shape, lora_B.dtype, dy.device)
    if ctx.plan == "fold":
        # LoRA's backward on (g W, g B) with dY: G = dY (g B) = dZ B, and dB = g (s dY^T h)
        w_g, b_g = _folded(w, lora_B, column_scale)
        if need_bias and need_b:
            grad_bias = kernels.empty(w.shape[0], grad_y.dtype, dy.device)
        g = kernels.lora_grad_output(dy, lora_A, b_g, h, scale, grad_b, grad_bias,
                                     need_x or need_a)
        if need_b:
            grad_b.copy_(grad_b.float() * column_scale[:, None])
        dz, w_used, b_used = dy, w_g, b_g
    else:
        dz = torch.mul(dy, column_scale, out=torch.empty_like(dy))  # fp32 products, one pass
        # G = dZ B (for dX and dA) and dB = s dZ^T h in one pass over dZ
        g = kernels.lora_grad_output(dz, lora_A, lora_B, h, scale, grad_b, None,
                                     need_x or need_a)
        w_used, b_used = w, lora_B
    if need_bias and grad_bias is None:
        grad_bias = dy.sum(0, dtype=torch.float32).to(grad_y.dtype)
    if need_x:
        grad_x = _grad_input(kernels, dy, dz, w_used, lora_A, b_used, g, scale, dropout_p,
                             seed, x2).reshape(grad_y.shape[:-1] + (w.shape[1],))
    if need_a:
        grad_a = kernels.empty(lora_A.shape, lora_A.dtype, dy.device)
        # dA^T = s G^T x', the mask regenerated per x tile as for LoRA
        kernels.tn_matmul(x2, g, grad_a.t(), scale * kernels.keep_scale(dropout_p),
                          rank_block=kernels.rank_block(lora_A.shape[0]),
                          dropout_p=dropout_p, seed=seed)
    return grad_x, grad_a, grad_b, grad_m, grad_bias


def _grad_input(kernels, dy, dz, w, lora_A, lora_B, g, scale, dropout_p, seed, x2):
    """dX = dZ W + s G A; with dropout, dY W + (dZ W + s G A - dY W) * mask / (1 - p)."""
    def run(plan):
        return kernels.lora_grad_input(dz, w, lora_A, lora_B, g, scale, 0.0, 0, plan)

    dx = run(choose_plan("grad_input", kernels, dz, w, lora_A, lora_B, 0.0, run))
    if dropout_p == 0.0:
        return dx
    plain = torch.mm(dy, w)
    keep = _keep_mask(kernels, x2, dropout_p, seed)
    return plain.add_(_masked(dx.sub_(plain), keep, kernels, dropout_p))


class FusedDoRALinear(torch.autograd.Function):
    """``FusedDoRALinear.apply(x, weight, lora_A, lora_B, magnitude, bias, scale,
    dropout_p)``, inputs validated by ``dora_linear``; W gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scale, dropout_p):
        seed = draw_seed() if dropout_p > 0.0 else 0
        x2 = unit_rows(flatten(x), "x")
        w = DenseWeight(weight).kernel_operand()
        lora_A, lora_B = unit_rows(lora_A, "lora_A"), unit_rows(lora_B, "lora_B")
        norm = weight_row_norms(w, lora_A, lora_B, scale)
        ctx.plan = _forward_plan(x2, magnitude, dropout_p)
        y, h, z = _dora_forward(x2, w, lora_A, lora_B, magnitude, bias, scale, dropout_p,
                                seed, norm, ctx.plan)
        kept = z if ctx.plan == "save z" else y
        ctx.save_for_backward(x2, w, lora_A, lora_B, magnitude, bias, h, kept, norm)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        grad_x, grad_a, grad_b, grad_m, grad_bias = _dora_backward(ctx, grad_y)
        return grad_x, None, grad_a, grad_b, grad_m, grad_bias, None, None
