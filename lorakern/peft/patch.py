"""``patch_peft`` / ``unpatch_peft``: PEFT models switched to the fused kernels in place.

Every PEFT LoRA ``Linear`` (and ``Embedding``) module computes
``base(x) + s * B(A(drop(x)))`` with one call of ``lorakern.lora_linear``
(``lora_embedding``) instead of PEFT's three modules; PEFT keeps owning the
parameters, the state dict, saving, merging and adapter switching.
``patch_summary`` / ``patched_modules`` say what runs fused and why the rest
does not.

peft and transformers are optional: each is imported inside the function that
needs it, never by ``import lorakern``.
"""
import functools
import logging
import threading
import warnings
import weakref
from typing import NamedTuple

import torch
from torch import nn

from ..functional.embedding import lora_embedding
from ..functional.linear import lora_linear
from ..functional.multi_adapter import (MAX_MIXED_RANK, StackCache, mixed_batch_lora_linear,
                                        stack_reason)
from ..layers.linear import conv1d_class
from . import sharded
from .dora import dora_refusal, fused_dora_forward, is_dora
from .bnb import bnb_base_reason, fused_bnb_forward, is_peft_bnb_layer
from .fallback import fallbacks, forget_fallbacks, peft_forward as _peft_forward
from .fallback import peft_forward_instead

log = logging.getLogger("lorakern")


_SHOWN = 8  # refused modules listed in one error message


def _peft_lora_classes():
    """(the PEFT LoRA layer classes lorakern fuses, PEFT's LoraLayer base class)."""
    try:
        from peft.tuners.lora.layer import Embedding, Linear, LoraLayer
    except ImportError as exc:
        raise ImportError("lorakern.patch_peft needs the peft package (pip install peft)") from exc
    return (Linear, Embedding), LoraLayer


def _is_peft_embedding(module):
    return type(module).__name__ == "Embedding" and hasattr(module, "lora_embedding_A")


def _embedding_base_reason(base, shards_gathered=False):
    """Why a PEFT LoRA Embedding's base layer cannot run fused, or None (``shards_gathered``:
    FSDP2 puts the whole weight in place of a DTensor shard for the forward)."""
    if not isinstance(base, nn.Embedding) or type(base).forward is not nn.Embedding.forward:
        return (f"its base layer is a {type(base).__module__}.{type(base).__qualname__}, not an "
                f"nn.Embedding with its own forward (scaled embeddings are not fused)")
    if "forward" in vars(base) or base._forward_hooks or base._forward_pre_hooks:
        return ("its base layer has forward hooks or a replaced forward (e.g. accelerate "
                "offloading), which the fused call would bypass" + sharded.hooked_base_advice(base))
    if not _plain(base.weight, shards_gathered) or not base.weight.dtype.is_floating_point:
        return (f"its base weight is a {type(base.weight.data).__name__} of dtype "
                f"{base.weight.dtype}, not a plain floating-point tensor")
    for flag in ("max_norm", "scale_grad_by_freq", "sparse"):
        if getattr(base, flag):
            return f"its base embedding sets {flag}={getattr(base, flag)}"
    return None


def _plain(t, shards_gathered):
    return type(t.data) is torch.Tensor or (shards_gathered and sharded.is_dtensor(t))


def _base_weight_and_bias(base, shards_gathered=False):
    """(weight as (out, in), bias) of a plain nn.Linear or Conv1D base layer, or a reason why not.

    The fused call replaces ``base(x)`` by ``x W^T + b``: only right when the base's
    forward is exactly that, with no hooks around it and a plain float weight (or, with
    ``shards_gathered``, a DTensor shard that FSDP2 replaces by the whole weight for
    the forward).
    """
    conv1d = conv1d_class()
    if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
        weight = base.weight
    elif conv1d is not None and isinstance(base, conv1d) and type(base).forward is conv1d.forward:
        weight = base.weight.t()  # Conv1D stores (in, out): fan_in_fan_out
    else:
        return None, (f"its base layer is a {type(base).__module__}.{type(base).__qualname__}, "
                      f"not an nn.Linear or transformers Conv1D with their own forward "
                      f"(quantized and parallel layers are not fused)")
    if "forward" in vars(base) or base._forward_hooks or base._forward_pre_hooks:
        return None, ("its base layer has forward hooks or a replaced forward (e.g. accelerate "
                      "offloading), which the fused call would bypass"
                      + sharded.hooked_base_advice(base))
    for label, t in (("weight", base.weight), ("bias", base.bias)):
        if t is None:
            continue
        if not _plain(t, shards_gathered) or not t.dtype.is_floating_point:
            return None, (f"its base {label} is a {type(t.data).__name__} of dtype {t.dtype} "
                          f"(quantized or sharded), not a plain floating-point tensor")
    return (weight, base.bias), None


def _adapter_reason(module, adapter):
    """Why the adapter ``adapter`` of a PEFT LoRA Linear cannot run fused, or None."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if is_dora(module, adapter):
        reason = dora_refusal(module, adapter, _is_peft_embedding(module))
        if reason:
            return reason
    elif variant is not None:
        return f"adapter '{adapter}' is a LoRA variant ({type(variant).__name__})"
    if _is_peft_embedding(module):
        return None  # PEFT applies no dropout and no bias to embedding adapters
    if getattr(module, "lora_bias", {}).get(adapter, False):
        return f"adapter '{adapter}' has lora_bias=True (a bias on lora_B)"
    if module.lora_B[adapter].bias is not None:
        return f"adapter '{adapter}' has a bias on lora_B"
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return (f"adapter '{adapter}' has a {type(dropout).__name__} as its LoRA dropout, not "
                f"nn.Dropout or nn.Identity")
    return None


def _adapters_of(module):
    return module.lora_embedding_A if _is_peft_embedding(module) else module.lora_A


def _active_here(module):
    """The active adapters that this module holds (PEFT skips the others)."""
    return [a for a in module.active_adapters if a in _adapters_of(module)]


def _state_reason(module):
    """Why the module's present state cannot be patched, or None (checked at patch time)."""
    if module.disable_adapters:
        return "its adapters are disabled (disable_adapter() / enable_adapters(False))"
    if module.merged:
        return (f"adapter(s) {list(module.merged_adapters)} are merged into its base weight "
                f"(unmerge_adapter() first)")
    return _adapters_reason(module, _active_here(module))


def _adapters_reason(module, active):
    """Why the active adapters ``active`` of the module cannot run fused, or None."""
    for adapter in active:
        reason = _adapter_reason(module, adapter)
        if reason:
            return reason
    if len(active) > 1:
        doras = [a for a in active if is_dora(module, a)]
        if doras:
            return (f"several active adapters {active}, DoRA among them ({doras}): "
                    f"stacked DoRA adapters are not fused")
        return stack_reason(*_adapter_tensors(module, active), [0.0])
    return None


def _adapter_tensors(module, active):
    """(lora_A weights, lora_B weights) of the adapters ``active``, in PEFT's layout."""
    if _is_peft_embedding(module):
        return ([module.lora_embedding_A[a] for a in active],
                [module.lora_embedding_B[a] for a in active])
    return ([module.lora_A[a].weight for a in active], [module.lora_B[a].weight for a in active])


def _unservable(module, fused_classes, shards_gathered=False):
    """The reason a module (a PEFT LoRA layer) cannot be patched, or None."""
    if is_peft_bnb_layer(module):  # QLoRA: peft/bnb.py
        return bnb_base_reason(module, getattr(module, "_lorakern_name", "")) \
            or _state_reason(module)
    if sharded.unsharded_class(module) not in fused_classes:
        cls = type(module)
        return (f"it is a PEFT {cls.__module__}.{cls.__qualname__} layer, not "
                f"peft.tuners.lora.layer.Linear or Embedding: lorakern fuses LoRA on nn.Linear, "
                f"Conv1D and nn.Embedding only (not convolutions, attention, quantized or "
                f"parallel layers)")
    if _is_peft_embedding(module):
        reason = _embedding_base_reason(module.get_base_layer(), shards_gathered)
    else:
        _, reason = _base_weight_and_bias(module.get_base_layer(), shards_gathered)
    return reason or _state_reason(module)


def _dropout_p(module, adapter):
    """The adapter's dropout probability as nn.Dropout applies it now (0 in eval mode)."""
    dropout = module.lora_dropout[adapter]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _call_reason(module, active):
    """Why this call, on the module as it is now, cannot run fused, or None."""
    if _is_peft_embedding(module):
        reason = _embedding_base_reason(module.get_base_layer())
    else:
        _, reason = _base_weight_and_bias(module.get_base_layer())
    reason = reason or _adapters_reason(module, active)
    if reason or len(active) == 1 or _is_peft_embedding(module):
        return reason
    return stack_reason(*_adapter_tensors(module, active),
                        [_dropout_p(module, a) for a in active])


# per module, outside it: a lock does not pickle or deepcopy with the model
_STACKS = weakref.WeakKeyDictionary()
_STACKS_LOCK = threading.Lock()


def _adapter_term(module, active):
    """(A, B, scale) of the LoRA term of the adapters ``active``: one adapter's own
    tensors, or several stacked (``multi_adapter.py``, cached per module)."""
    lora_As, lora_Bs = _adapter_tensors(module, active)
    if len(active) == 1:
        return lora_As[0], lora_Bs[0], module.scaling[active[0]]
    with _STACKS_LOCK:
        cache = _STACKS.setdefault(module, StackCache())
    return cache.get(lora_As, lora_Bs, [module.scaling[a] for a in active])


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's ``Linear.forward`` (``Embedding.forward``) as one ``lora_linear``
    (``lora_embedding``) call, for one plain LoRA adapter or several stacked.

    States without a LoRA term (adapters disabled, merged, or none active on this
    layer) run PEFT's own forward, which is the base layer alone. Calls the fused
    path cannot reproduce run PEFT's forward too, and say so (``fallback.py``).
    """
    if kwargs.get("adapter_names") is not None and not args and not any(
            v is not None for k, v in kwargs.items() if k != "adapter_names"):
        return _mixed_batch(self, x, kwargs["adapter_names"])
    extra = sorted(k for k, v in kwargs.items() if v is not None)
    if args or extra:
        return peft_forward_instead(self, f"forward arguments beyond x ({len(args)} "
                                    f"positional, keyword {extra}) are not fused",
                                    x, *args, **kwargs)
    active = _active_here(self)
    if self.disable_adapters or self.merged or not active:
        return _peft_forward(self, x)
    name = self._lorakern_name
    if _is_peft_embedding(self) and sharded.zero3_registered(self.get_base_layer()):
        _say_once(f"lorakern: PEFT LoRA embedding '{name}' runs PEFT's forward "
                  f"under DeepSpeed ZeRO-3, not the fused kernel")
        return _peft_forward(self, x)
    if is_peft_bnb_layer(self):
        reason = bnb_base_reason(self, name) or _adapters_reason(self, active)
        if not reason and len(active) > 1:
            reason = "several active adapters on a quantised base are not fused"
        if reason:
            return peft_forward_instead(self, reason, x)
        return fused_bnb_forward(self, name, x, active[0])
    reason = _call_reason(self, active)
    if reason:
        return peft_forward_instead(self, reason, x)
    if is_dora(self, active[0]):  # one adapter: _adapters_reason refuses DoRA stacks
        (weight, bias), _ = _base_weight_and_bias(self.get_base_layer())
        return fused_dora_forward(self, x, active[0], weight, bias)
    lora_A, lora_B, scale = _adapter_term(self, active)
    if _is_peft_embedding(self):
        base = self.get_base_layer()
        return lora_embedding(x, base.weight, lora_A, lora_B, scale, base.padding_idx)
    (weight, bias), _ = _base_weight_and_bias(self.get_base_layer())
    dropout_p = _dropout_p(self, active[0]) if len(active) == 1 else 0.0
    # PEFT casts x to the adapter dtype for the LoRA term only; lora_linear takes x in
    # the base dtype and computes the rank product in the promoted dtype of x, A, B
    return lora_linear(x, weight, lora_A, lora_B, scale=scale, bias=bias, dropout_p=dropout_p)


def _mixed_batch_reason(module, present):
    """Why this mixed-adapter batch, with the adapters ``present`` on this layer,
    cannot run fused, or None."""
    if _is_peft_embedding(module):
        return "mixed-adapter batches (adapter_names) on embeddings are not fused"
    if is_peft_bnb_layer(module):
        return "mixed-adapter batches (adapter_names) on quantised bases are not fused"
    if any(is_dora(module, a) for a in present):
        return "mixed-adapter batches (adapter_names) with DoRA adapters are not fused"
    _, reason = _base_weight_and_bias(module.get_base_layer())
    reason = reason or _adapters_reason(module, present)
    if reason:
        return reason
    lora_As, lora_Bs = _adapter_tensors(module, present)
    reason = stack_reason(lora_As, lora_Bs, [_dropout_p(module, a) for a in present])
    if reason:
        return "in a mixed-adapter batch, " + reason
    widest = max(a.shape[0] for a in lora_As)
    if widest > MAX_MIXED_RANK:
        return f"a mixed-adapter batch with an adapter of rank {widest} (over {MAX_MIXED_RANK})"
    tensors = [*lora_As, *lora_Bs, *module.get_base_layer().parameters()]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ("mixed-adapter batches (adapter_names) are fused for inference only: "
                "grad is enabled (run under torch.no_grad() or torch.inference_mode())")
    return None


def _mixed_input_reason(x):
    if x.dim() < 2:
        return f"a mixed-adapter batch of a {x.dim()}-D x is not fused"
    if x.requires_grad and torch.is_grad_enabled():
        return "mixed-adapter batches are fused for inference only: x requires grad"
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except (TypeError, RuntimeError):  # older torch, or a device type autocast lacks
        autocast = False
    if autocast:
        return "mixed-adapter batches under autocast are not fused"
    return None


def _mixed_batch(self, x, adapter_names):
    """PEFT's ``_mixed_batch_forward``: item b of x through adapter adapter_names[b]
    (``__base__``, or an adapter this layer lacks: the base layer alone), fused
    (``mixed_batch_lora_linear``). PEFT's own checks run first, raising its errors."""
    self._check_forward_args(x, adapter_names=adapter_names)
    present = [a for a in dict.fromkeys(adapter_names) if a in _adapters_of(self)]
    if self.disable_adapters or not present:
        return _peft_forward(self, x, adapter_names=adapter_names)
    reason = _mixed_batch_reason(self, present) or _mixed_input_reason(x)
    if reason:
        return peft_forward_instead(self, reason, x, adapter_names=adapter_names)
    lora_A, lora_B, scale = _adapter_term(self, present)
    index = {adapter: i for i, adapter in enumerate(present)}
    ranks = [self.lora_A[a].weight.shape[0] for a in present]
    (weight, bias), _ = _base_weight_and_bias(self.get_base_layer())
    return mixed_batch_lora_linear(x, weight, lora_A, lora_B, scale, ranks,
                                   [index.get(name, -1) for name in adapter_names], bias)


_SAID = set()


def _say_once(line):
    if line not in _SAID:
        _SAID.add(line)
        log.warning(line)


def _is_patched(module):
    fwd = vars(module).get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _fused_forward


def patch_peft(peft_model, strict=True):
    """Switch every PEFT LoRA ``Linear`` and ``Embedding`` module of ``peft_model`` to the
    fused kernels, in place.

    Each ``peft.tuners.lora.layer.Linear`` (on an ``nn.Linear`` or a transformers
    ``Conv1D`` base, i.e. ``fan_in_fan_out`` too) gets a forward that calls
    ``lorakern.lora_linear(x, W, A, B, scaling, bias, p)`` with the base layer's
    weight and bias and the active adapter's ``lora_A``/``lora_B`` weights,
    scaling and dropout probability (dropout only while the dropout module is in
    training mode, as nn.Dropout). Each ``peft.tuners.lora.layer.Embedding`` on an
    ``nn.Embedding`` calls ``lorakern.lora_embedding(ids, E, lora_embedding_A,
    lora_embedding_B, scaling, padding_idx)`` (PEFT applies no dropout there).
    Several active adapters (``set_adapter([...])``) run as one LoRA term of rank
    r_1 + r_2 + ... (``lorakern.functional.multi_adapter``). Parameters, state
    dict, saving, merging and adapter switching stay PEFT's; PEFT's forward runs
    whenever there is no LoRA term (adapters disabled or merged, or no active
    adapter on the layer), and for any call the fused path does not reproduce
    (mixed-adapter batches, a state changed after patching, dropout active on
    several adapters): such a call is logged once per module and reason and
    reported by ``patch_summary`` (``lorakern.peft.fallback``); where PEFT raises,
    PEFT's forward raises.

    Args:
        peft_model: a ``peft.PeftModel``, ``LoraModel``, or any module holding PEFT
            LoRA layers.
        strict: if True (default), any PEFT LoRA layer that cannot run fused raises
            ValueError naming it and why: a LoRA variant (DoRA on Linear layers
            is fused, by ``lorakern.dora_linear``; on embeddings it is refused),
            ``lora_bias``, active adapters of different dtypes, merged or disabled adapters,
            LoRA on convolutions/attention, scaled or max_norm embeddings,
            quantized or hooked base layers. If False, such layers keep PEFT's forward and a warning lists
            them.
    Sharded models (``sharded.py``): under FSDP2, ``patch_peft`` before or after
    ``fully_shard`` (applied to modules above the LoRA layers); under DeepSpeed
    ZeRO-3, before ``deepspeed.initialize`` (each patched Linear becomes a ZeRO-3
    leaf, whose parameters DeepSpeed gathers together; LoRA embeddings run PEFT's
    forward there).

    Returns:
        ``peft_model``, so that ``model = patch_peft(get_peft_model(...))`` chains.
        What was fused and what was left to PEFT (with the reason) is logged as
        one INFO line (logger "lorakern") and returned by
        ``patch_summary(peft_model)``; ``patched_modules(peft_model)`` lists the
        fused modules.
    """
    fused_classes, lora_layer_cls = _peft_lora_classes()
    layers = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, lora_layer_cls)]
    if not layers:
        raise ValueError(f"patch_peft: no PEFT LoRA layers in this {type(peft_model).__name__}")
    refused = []
    to_patch = []
    gathered = sharded.fsdp2_gathered_modules(peft_model)
    for name, module in layers:
        if _is_patched(module):
            continue
        reason = _unservable(module, fused_classes, id(module) in gathered)
        if reason:
            refused.append(f"'{name}': {reason}")
        else:
            to_patch.append((name, module))
    if refused:
        listed = "; ".join(refused[:_SHOWN])
        if len(refused) > _SHOWN:
            listed += f"; ... ({len(refused)} modules in all)"
        if strict:
            raise ValueError(f"patch_peft: these PEFT LoRA modules cannot run on lorakern's fused "
                             f"kernels (nothing was patched): {listed}. For a model that mixes "
                             f"them with fusable layers, patch_peft(model, strict=False) patches "
                             f"the rest and leaves these on PEFT's forward")
        warnings.warn(f"patch_peft: these PEFT LoRA modules keep PEFT's forward: {listed}",
                      RuntimeWarning, stacklevel=2)
    for name, module in to_patch:
        module._lorakern_name = name
        # a partial of a module-level function pickles by reference (torch.save of the
        # whole model); a bound method would pickle as getattr(module, "_fused_forward")
        module.forward = functools.partial(_fused_forward, module)
        if not _is_peft_embedding(module):
            sharded.mark_zero3_leaf(module)
    log.info("lorakern: patch_peft: %s", patch_summary(peft_model))
    return peft_model


def patched_modules(model):
    """Names of the modules of ``model`` that ``patch_peft`` switched to the fused kernels."""
    return [name for name, m in model.named_modules() if _is_patched(m)]


class PatchSummary(NamedTuple):
    """Which PEFT LoRA modules of a model run fused, and why the others do not.

    ``fused``: names of the modules on lorakern's kernels (``patched_modules``).
    ``left_to_peft``: {name: reason} for every other PEFT LoRA layer.
    ``fell_back``: {name: {reason: calls}} for the patched modules that ran PEFT's
    forward on some call since patching (``lorakern.peft.fallback``).
    ``str()`` gives one line: the counts, then the modules left to PEFT.
    """
    fused: list
    left_to_peft: dict
    fell_back: dict

    def __str__(self):
        line = (f"{len(self.fused)} PEFT LoRA module(s) on the fused kernels, "
                f"{len(self.left_to_peft)} left on PEFT's forward")
        if self.left_to_peft:
            shown = list(self.left_to_peft.items())[:_SHOWN]
            line += ": " + "; ".join(f"'{name}' ({reason})" for name, reason in shown)
            if len(self.left_to_peft) > _SHOWN:
                line += f"; ... ({len(self.left_to_peft)} in all)"
        if self.fell_back:
            shown = list(self.fell_back.items())[:_SHOWN]
            line += (f"; {len(self.fell_back)} patched module(s) ran PEFT's forward on some "
                     f"calls: " + "; ".join(f"'{name}' ({', '.join(reasons)})"
                                            for name, reasons in shown))
        return line


def patch_summary(model):
    """The ``PatchSummary`` of ``model`` as it is now (after ``patch_peft``,
    ``unpatch_peft`` or adapter changes): computed from the modules, never stored."""
    fused_classes, lora_layer_cls = _peft_lora_classes()
    fused, left, fell_back = [], {}, {}
    gathered = sharded.fsdp2_gathered_modules(model)
    for name, module in model.named_modules():
        if _is_patched(module):
            fused.append(name)
            if fallbacks(module):
                fell_back[name] = fallbacks(module)
        elif isinstance(module, lora_layer_cls):
            left[name] = (_unservable(module, fused_classes, id(module) in gathered)
                          or "fusable, not patched (patch_peft patches it)")
    return PatchSummary(fused, left, fell_back)


def unpatch_peft(peft_model):
    """Undo ``patch_peft``: every patched module gets PEFT's forward back.

    Returns:
        The number of modules restored.
    """
    restored = 0
    for _, module in peft_model.named_modules():
        if _is_patched(module):
            del module.forward
            del module._lorakern_name
            sharded.unmark_zero3_leaf(module)
            forget_fallbacks(module)
            _STACKS.pop(module, None)
            restored += 1
    return restored
