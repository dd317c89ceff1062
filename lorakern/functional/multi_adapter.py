"""Several LoRA adapters on one layer as one LoRA term of rank r_1 + ... + r_n.

Adapters i = 1..n with A_i (r_i, in), B_i (out, r_i) and scales s_i:

    sum_i s_i (x A_i^T) B_i^T  =  s (x A^T) B^T
    A = [A_1; ...; A_n]            (R, in), stacked by rows,  R = r_1 + ... + r_n
    B = [c_1 B_1, ..., c_n B_n]    (out, R), stacked by columns

with s = s_1 and c_i = 1 when every s_i is equal (B is then not rounded by a
fold), else s = 1 and c_i = s_i. Gradients of the stack split back by the same
slices: dA_i = the rows of dA for adapter i, dB_i = c_i * its columns of dB.
With grad enabled the stack is built by ``torch.cat`` (autograd routes each
The stack is cached and rebuilt only when a parameter's version, storage, shape,
dtype or a scale changes (an optimizer step or ``load_state_dict`` bumps the
version; a write through ``.data`` does not, and is not seen). With grad enabled
the cached stack enters the graph through ``_StackedAdapters``, whose backward
splits the stack's gradients back: no copy per call, and each adapter's
gradients land in its own parameters.

One term means one dropout mask for all n adapters, so a stack is only built for
adapters without active dropout (``stack_reason`` says why not otherwise).

``mixed_batch_lora_linear``: a batch whose items each pick one of the stacked
adapters (or none), for inference: row m gets s c_a (x[m] A_a^T) B_a^T of its
adapter a only. The kernels make h = x A_a^T in adapter a's columns of the stack,
zero elsewhere (kernels/segmented_lora.py), then one GEMM with the LoRA term of
the whole stack in its epilogue; the reference does the same per adapter.
"""
import threading

import torch
import torch.nn.functional as F

from .base_weight import DenseWeight
from .dispatch import choose_plan, load_kernels, select_backend
from .layouts import flatten, unit_rows
from .validation import check_base_dtypes, check_tensors, lora_compute_dtype


def _common_scale(scales):
    first = scales[0]
    return first if all(s == first for s in scales) else None


def _parameter_key(t):
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


def stack_adapters(lora_As, lora_Bs, scales):
    """(A [R, in], B [out, R], s): the adapters' sum as one term, built now.

    Args:
        lora_As: n tensors ``[r_i, in_features]``; lora_Bs: n tensors
            ``[out_features, r_i]``, one dtype for all; scales: n floats.
    """
    scale = _common_scale(scales)
    stacked_a = torch.cat(list(lora_As), dim=0)
    if scale is not None:
        return stacked_a, torch.cat(list(lora_Bs), dim=1), scale
    folded = [b * s for b, s in zip(lora_Bs, scales)]
    return stacked_a, torch.cat(folded, dim=1), 1.0


def stack_reason(lora_As, lora_Bs, dropout_ps):
    """Why these adapters cannot run as one stacked term, or None."""
    dtypes = {t.dtype for t in (*lora_As, *lora_Bs)}
    if len(dtypes) > 1:
        return (f"the active adapters have different dtypes ({sorted(map(str, dtypes))}); a "
                f"stacked term has one")
    devices = {t.device for t in (*lora_As, *lora_Bs)}
    if len(devices) > 1:
        return f"the active adapters are on different devices ({sorted(map(str, devices))})"
    dropping = [p for p in dropout_ps if p > 0.0]
    if dropping:
        return (f"dropout is active on {len(dropping)} of {len(dropout_ps)} active adapters "
                f"(p = {dropping}); a stacked term would share one mask among them, PEFT "
                f"draws one per adapter")
    return None


class _StackedAdapters(torch.autograd.Function):
    """The cached stack (A, B) as a function of the adapters' parameters:
    forward hands out views of it, backward slices dA by rows and dB by columns
    (times each fold c_i)."""

    @staticmethod
    def forward(ctx, stacked_a, stacked_b, folds, *params):
        ctx.ranks = [a.shape[0] for a in params[:len(params) // 2]]
        ctx.folds = folds
        return stacked_a.view_as(stacked_a), stacked_b.view_as(stacked_b)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        grads_a, grads_b, first = [], [], 0
        for r, fold in zip(ctx.ranks, ctx.folds):
            grads_a.append(None if grad_a is None else grad_a[first:first + r])
            part = None if grad_b is None else grad_b[:, first:first + r]
            grads_b.append(part if part is None or fold == 1.0 else part * fold)
            first += r
        return (None, None, None, *grads_a, *grads_b)


class StackCache:
    """The last stack built for a layer's adapters, reused while nothing changed;
    with grad enabled, differentiable in each adapter's parameters."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._value = None

    def get(self, lora_As, lora_Bs, scales):
        tensors = (*lora_As, *lora_Bs)
        key = (tuple(_parameter_key(t) for t in tensors), tuple(float(s) for s in scales))
        with self._lock:
            if key != self._key:
                with torch.no_grad():
                    self._value = stack_adapters(lora_As, lora_Bs, scales)
                self._key = key
            stacked_a, stacked_b, scale = self._value
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            folds = [1.0] * len(scales) if _common_scale(scales) is not None else list(scales)
            stacked_a, stacked_b = _StackedAdapters.apply(stacked_a, stacked_b, folds, *tensors)
        return stacked_a, stacked_b, scale

    def clear(self):
        with self._lock:
            self._key = self._value = None


# the widest adapter the segmented rank pass takes (kernels/segmented_lora.py's
# MAX_SEGMENT_RANK; the kernels are imported on first use only)
MAX_MIXED_RANK = 128


def _check_row_adapters(x, ranks, row_adapters):
    if x.dim() < 2 or len(row_adapters) != x.shape[0]:
        raise ValueError(f"mixed_batch_lora_linear: {len(row_adapters)} adapter indices for "
                         f"an x of shape {tuple(x.shape)} (one per item of dim 0)")
    bad = sorted({a for a in row_adapters if not -1 <= a < len(ranks)})
    if bad:
        raise ValueError(f"mixed_batch_lora_linear: adapter indices {bad} outside -1 .. "
                         f"{len(ranks) - 1} ({len(ranks)} adapters stacked)")


def _first_rows(ranks):
    firsts, total = [], 0
    for r in ranks:
        firsts.append(total)
        total += r
    return firsts


def mixed_batch_lora_linear(x, weight, lora_A, lora_B, scale, ranks, row_adapters, bias=None):
    """y[b] = x[b] W^T + bias + scale * (x[b] A_a^T) B_a^T, a = row_adapters[b], inference.

    Args:
        x: ``[batch, ..., in_features]``; item b of dim 0 uses adapter
            ``row_adapters[b]`` (an index into ``ranks``), or none for -1.
        weight: ``[out_features, in_features]``; bias: optional ``[out_features]``.
        lora_A: ``[R, in_features]``, lora_B: ``[out_features, R]``: the adapters
            stacked as ``stack_adapters`` makes them (each scale folded into B,
            or common as ``scale``), ``ranks`` their r_i in order (sum R).
    Returns:
        ``[batch, ..., out_features]`` in x's dtype. No autograd: call it under
        ``torch.no_grad()`` or with tensors that need no gradient.
    """
    check_tensors(x, weight, lora_A, lora_B, bias)
    check_base_dtypes(x, weight, bias)
    if sum(ranks) != lora_A.shape[0]:
        raise ValueError(f"mixed_batch_lora_linear: ranks {list(ranks)} sum to {sum(ranks)}, "
                         f"lora_A has {lora_A.shape[0]} rows")
    _check_row_adapters(x, ranks, row_adapters)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, lora_A, lora_B, bias)):
        raise ValueError("mixed_batch_lora_linear is for inference: it has no backward "
                         "(run it under torch.no_grad())")
    if select_backend(x, weight, lora_A, lora_B, bias) == "reference":
        return _mixed_reference(x, weight, lora_A, lora_B, scale, ranks, row_adapters, bias)
    return mixed_batch_kernels(x, weight, lora_A, lora_B, scale, ranks, row_adapters, bias)


def _mixed_reference(x, weight, lora_A, lora_B, scale, ranks, row_adapters, bias):
    y = F.linear(x, weight, bias)
    lora_dtype = lora_compute_dtype(x, lora_A, lora_B)
    for adapter, (first, r) in enumerate(zip(_first_rows(ranks), ranks)):
        items = [b for b, a in enumerate(row_adapters) if a == adapter]
        if not items:
            continue
        index = torch.tensor(items, device=x.device)
        part = x[index].to(lora_dtype)
        term = F.linear(F.linear(part, lora_A[first:first + r].to(lora_dtype)),
                        lora_B[:, first:first + r].to(lora_dtype))
        y[index] += (scale * term).to(y.dtype)
    return y


def mixed_batch_kernels(x, weight, lora_A, lora_B, scale, ranks, row_adapters, bias):
    """The kernels' launch sequence of ``mixed_batch_lora_linear``, arguments checked."""
    kernels = load_kernels(x.device)
    x2 = unit_rows(flatten(x), "x")
    base = DenseWeight(weight)
    rows_per_item = x2.shape[0] // max(x.shape[0], 1)
    cfg = kernels.segment_config(max(ranks, default=1))
    segments, n_tiles = kernels.segment_tiles(row_adapters, rows_per_item, _first_rows(ranks),
                                              list(ranks), cfg.block_m)
    h = kernels.segmented_rank_product(x2, lora_A, segments.to(x.device), n_tiles,
                                       max(ranks, default=1), lora_compute_dtype(x, lora_A, lora_B),
                                       config=cfg)
    w = base.kernel_operand()

    def run(plan):
        return kernels.lora_forward_with_h(x2, w, h, lora_B, bias, scale, plan)

    # the strategy and config of a single forward at rank R: the same GEMM and epilogue
    y = run(choose_plan("forward", kernels, x2, w, lora_A, lora_B, 0.0, run))
    return y.reshape(*x.shape[:-1], base.shape[0])
