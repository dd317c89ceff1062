"""The float64 oracle and the one assertion every numeric test uses."""
import torch

from lorakern import reference

# Largest error allowed, as a fraction of the largest |value| of the oracle
# tensor: about two units in the last place of the compute dtype (fp16 2^-10,
# bf16 2^-7); fp32 leaves room for accumulation-order differences over K.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_matches_oracle(actual, expected, compute_dtype, name):
    """``actual`` against the float64 ``expected``; the message says how far off, where."""
    assert actual is not None, f"{name}: no value (gradient not computed?)"
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)}, oracle {tuple(expected.shape)}")
    if expected.numel() == 0:
        return
    actual64 = actual.detach().to(torch.float64)
    diff = (actual64 - expected).abs()
    finite = torch.isfinite(actual64)
    assert finite.all(), (f"{name}: {int((~finite).sum())} non-finite values, first at "
                          f"{tuple(int(i) for i in (~finite).nonzero()[0])}")
    scale = expected.abs().max().item()
    worst = int(diff.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    max_abs = diff.max().item()
    max_rel = (diff / expected.abs().clamp_min(1e-30)).max().item()
    allowed = TOLERANCE[compute_dtype] * max(scale, 1e-30)
    assert max_abs <= allowed, (
        f"{name} ({compute_dtype}): max abs error {max_abs:.3e} at {where} "
        f"(got {actual64.flatten()[worst].item():.6g}, oracle {expected.flatten()[worst].item():.6g}); "
        f"allowed {allowed:.3e} = {TOLERANCE[compute_dtype]:.1e} x max|oracle| {scale:.3e}; "
        f"max rel error {max_rel:.3e}")


def oracle(x, weight, lora_A, lora_B, scale, bias=None, keep_mask=None, dropout_p=0.0,
           grad_y=None):
    """Forward and gradients of the layer in float64 on the CPU.

    Returns (y, grads) with grads a dict over the inputs given as tensors.
    """
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "bias": bias}
    leaves = {k: v.detach().cpu().to(torch.float64).requires_grad_() for k, v in named.items()
              if v is not None}
    mask = None if keep_mask is None else keep_mask.cpu()
    y = reference.lora_linear_masked(leaves["x"], leaves["weight"], leaves["lora_A"],
                                     leaves["lora_B"], scale, leaves.get("bias"), mask,
                                     dropout_p)
    grads = {}
    if grad_y is not None:
        y.backward(grad_y.detach().cpu().to(torch.float64))
        grads = {k: v.grad for k, v in leaves.items()}
    return y.detach(), grads
