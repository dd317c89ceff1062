"""The cuBLAS composition of a LoRA linear (Unsloth's ``matmul_lora``, plus
dropout and bias): three library GEMMs and a hand-written backward.

    forward:   h = (x⊙m) Aᵀ                    [M, r]
               y = x Wᵀ + b;  y.addmm_(h, Bᵀ, alpha=s')
    backward:  G  = dY B                      [M, r]
               dX = dY W + s'·(G A)⊙m
               dA = s'·Gᵀ (x⊙m),  dB = s'·dYᵀ h,  dW = dYᵀ x,  db = Σ dY

with s' = s / (1 - p) and m the boolean keep-mask (all ones when p = 0, and
then never built). It saves x, h and, with dropout, the mask (1 byte per
element of x): what a careful hand-written baseline keeps.
"""
import torch


def keep_mask(shape, dropout_p, device):
    """The dropout keep-mask, drawn from torch's generator for ``device``."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - dropout_p)



def _addmm_forward(x, weight_of, lora_A, lora_B, bias, scale, dropout_p):
    """(x2, h, mask, s, y) of the composition's forward: x W^T + b by addmm, then
    s h B^T added onto it; ``weight_of()`` gives W (a buffer dropped on return
    when it is dequantised)."""
    x2 = x.reshape(-1, x.shape[-1])
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    mask = keep_mask(x2.shape, dropout_p, x.device) if dropout_p > 0.0 else None
    s = scale / (1.0 - dropout_p)
    h = (x2 if mask is None else x2 * mask) @ A.t()
    weight = weight_of()
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(h, B.t(), alpha=s)
    return x2, h, mask, s, y


class AddmmLoRA(torch.autograd.Function):
    """``AddmmLoRA.apply(x, weight, lora_A, lora_B, bias, scale, dropout_p)``.

    x ``[..., in]``; weight ``[out, in]``; lora_A ``[r, in]``; lora_B ``[out, r]``;
    bias ``[out]`` or None. Adapters are cast to x's dtype for the products and
    their gradients returned in their own dtypes.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scale, dropout_p):
        x2, h, mask, s, y = _addmm_forward(x, lambda: weight, lora_A, lora_B, bias, scale,
                                           dropout_p)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, h, mask)
        ctx.s, ctx.x_shape, ctx.has_bias = s, x.shape, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, h, mask = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dw = dy.t() @ x2 if need_w else None
        dx, da, db, dbias = _lora_grads(ctx, dy, lambda: weight, x2, lora_A, lora_B, h, mask,
                                        (need_x, need_a, need_b, need_bias))
        return dx, dw, da, db, dbias, None, None


def _lora_grads(ctx, dy, weight, x2, lora_A, lora_B, h, mask, needs):
    """(dX, dA, dB, db) of the composition; ``weight()`` gives W when dX is wanted."""
    need_x, need_a, need_b, need_bias = needs
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    s = ctx.s
    g = dy @ B if (need_x or need_a) else None
    dx = da = db = dbias = None
    if need_x:
        dx = dy @ weight()
        if mask is None:
            dx.addmm_(g, A, alpha=s)
        else:
            dx.add_((g @ A) * mask, alpha=s)
        dx = dx.reshape(ctx.x_shape)
    if need_a:
        da = (g.t() @ (x2 if mask is None else x2 * mask)).mul_(s).to(lora_A.dtype)
    if need_b:
        db = (dy.t() @ h).mul_(s).to(lora_B.dtype)
    if need_bias and ctx.has_bias:
        dbias = dy.sum(0)
    return dx, da, db, dbias


def addmm_lora(x, weight, lora_A, lora_B, scale=1.0, bias=None, dropout_p=0.0):
    """y = x Wᵀ + b + s·((x⊙m)/(1-p) Aᵀ) Bᵀ through ``AddmmLoRA``."""
    return AddmmLoRA.apply(x, weight, lora_A, lora_B, bias, float(scale), float(dropout_p))


class DequantAddmmLoRA(torch.autograd.Function):
    """The composition over a quantised base (Unsloth's QLoRA method):
    ``DequantAddmmLoRA.apply(x, dequantize, lora_A, lora_B, bias, scale, dropout_p)``
    with ``dequantize()`` giving W [out, in] in x's dtype (bitsandbytes'
    ``dequantize_4bit`` or int8 dequantisation). W is dequantised into a buffer
    in the forward and again in the backward, for dX; the buffer is dropped when
    each returns, so nothing of W is saved. The rest is ``AddmmLoRA``'s.
    """

    @staticmethod
    def forward(ctx, x, dequantize, lora_A, lora_B, bias, scale, dropout_p):
        x2, h, mask, s, y = _addmm_forward(x, dequantize, lora_A, lora_B, bias, scale,
                                           dropout_p)
        ctx.save_for_backward(x2, lora_A, lora_B, h, mask)
        ctx.dequantize, ctx.s, ctx.x_shape = dequantize, s, x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, lora_A, lora_B, h, mask = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dx, da, db, dbias = _lora_grads(ctx, dy, ctx.dequantize, x2, lora_A, lora_B, h, mask,
                                        (need_x, need_a, need_b, need_bias))
        return dx, None, da, db, dbias, None, None


def dequant_addmm_lora(x, dequantize, lora_A, lora_B, scale=1.0, bias=None, dropout_p=0.0):
    """y = x Wᵀ + b + s·((x⊙m)/(1-p) Aᵀ) Bᵀ with W = ``dequantize()``, per call."""
    return DequantAddmmLoRA.apply(x, dequantize, lora_A, lora_B, bias, float(scale),
                                  float(dropout_p))
