"""Several LoRA adapters on one layer as one LoRA term of rank r_1 + ... + r_n.

Adapters i = 1..n with A_i (r_i, in), B_i (out, r_i) and scales s_i:

    sum_i s_i (x A_i^T) B_i^T  =  s (x A^T) B^T
    A = [A_1; ...; A_n]            (R, in), stacked by rows,  R = r_1 + ... + r_n
    B = [c_1 B_1, ..., c_n B_n]    (out, R), stacked by columns

with s = s_1 and c_i = 1 when every s_i is equal (B is then not rounded by a
fold), else s = 1 and c_i = s_i. Gradients of the stack split back by the same
slices: dA_i = the rows of dA for adapter i, dB_i = c_i * its columns of dB.
With grad enabled the stack is built by ``torch.cat`` (autograd routes each
slice to its adapter's parameters; the copy is R * (in + out) elements, small
beside the layer's M * in * out products); without grad it is cached and rebuilt
only when a parameter's version, storage, shape, dtype or a scale changes.

One term means one dropout mask for all n adapters, so a stack is only built for
adapters without active dropout (``stack_reason`` says why not otherwise).
"""
import threading

import torch


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


class StackCache:
    """The last stack built for a layer's adapters, reused while nothing changed.

    ``get`` builds through autograd (no cache) when grad is enabled and any
    adapter parameter requires grad, so that gradients reach each adapter.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._value = None

    def get(self, lora_As, lora_Bs, scales):
        tensors = (*lora_As, *lora_Bs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return stack_adapters(lora_As, lora_Bs, scales)
        key = (tuple(_parameter_key(t) for t in tensors), tuple(float(s) for s in scales))
        with self._lock:
            if key != self._key:
                with torch.no_grad():
                    self._value = stack_adapters(lora_As, lora_Bs, scales)
                self._key = key
            return self._value

    def clear(self):
        with self._lock:
            self._key = self._value = None
