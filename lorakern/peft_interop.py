"""Interoperation with Hugging Face PEFT: adapter files both ways, and PEFT models
switched to the fused kernels in place.

- ``save_adapter(model, path)``: a model injected with lorakern (``LoRALinear``, ``LoRAEmbedding``
  layers) written as a PEFT LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads.
- ``load_adapter(model, path)``: a PEFT LoRA adapter injected into a base model
  as ``LoRALinear``/``LoRAEmbedding`` layers (via ``inject_lora``), weights loaded.
- ``patch_peft(peft_model)`` / ``unpatch_peft(peft_model)``: every PEFT LoRA
  ``Linear`` (and ``Embedding``) module computes ``base(x) + s * B(A(drop(x)))`` with one call of
  ``lorakern.lora_linear`` instead of PEFT's three modules; PEFT keeps owning the
  parameters, the state dict, saving, merging and adapter switching.

peft, transformers and safetensors are optional: each is imported inside the
function that needs it, never by ``import lorakern``.
"""
import functools
import json
import logging
import math
import os
import re
import secrets
import shutil
import warnings
from typing import NamedTuple

import torch
from torch import nn

from .api import lora_linear
from .embedding import lora_embedding
from .inject import _pattern_value, inject_lora
from .embedding import LoRAEmbedding, embedding_layout
from .modules import LoRALayer, LoRALinear, _check_lora_args, base_layout

log = logging.getLogger("lorakern")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's key prefix for a LoRA model (PeftModel.base_model is the LoraModel,
# whose .model is the wrapped transformers model); the adapter name is stripped
PREFIX = "base_model.model."
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
# an embedding's adapter: PEFT keeps A and B as Parameters, not as nn.Linear modules
_EMBEDDING_A_SUFFIX, _EMBEDDING_B_SUFFIX = ".lora_embedding_A", ".lora_embedding_B"
_SHOWN = 8  # refused modules listed in one error message


def _conv1d_class():
    """transformers' Conv1D (GPT-2's (in, out) linear), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_linear_like(module):
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


# ------------------------------------------------------------------------------------------------
# patch_peft: PEFT's LoRA Linear modules on the fused kernels
# ------------------------------------------------------------------------------------------------

def _peft_lora_classes():
    """(the PEFT LoRA layer classes lorakern fuses, PEFT's LoraLayer base class)."""
    try:
        from peft.tuners.lora.layer import Embedding, Linear, LoraLayer
    except ImportError as exc:
        raise ImportError("lorakern.patch_peft needs the peft package (pip install peft)") from exc
    return (Linear, Embedding), LoraLayer


def _is_peft_embedding(module):
    return type(module).__name__ == "Embedding" and hasattr(module, "lora_embedding_A")


def _embedding_base_reason(base):
    """Why a PEFT LoRA Embedding's base layer cannot run fused, or None."""
    if not isinstance(base, nn.Embedding) or type(base).forward is not nn.Embedding.forward:
        return (f"its base layer is a {type(base).__module__}.{type(base).__qualname__}, not an "
                f"nn.Embedding with its own forward (scaled embeddings are not fused)")
    if "forward" in vars(base) or base._forward_hooks or base._forward_pre_hooks:
        return ("its base layer has forward hooks or a replaced forward (e.g. accelerate "
                "offloading), which the fused call would bypass")
    if type(base.weight.data) is not torch.Tensor or not base.weight.dtype.is_floating_point:
        return (f"its base weight is a {type(base.weight.data).__name__} of dtype "
                f"{base.weight.dtype}, not a plain floating-point tensor")
    for flag in ("max_norm", "scale_grad_by_freq", "sparse"):
        if getattr(base, flag):
            return f"its base embedding sets {flag}={getattr(base, flag)}"
    return None


def _base_weight_and_bias(base):
    """(weight as (out, in), bias) of a plain nn.Linear or Conv1D base layer, or a reason why not.

    The fused call replaces ``base(x)`` by ``x W^T + b``: only right when the base's
    forward is exactly that, with no hooks around it and a plain float weight.
    """
    conv1d = _conv1d_class()
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
                      "offloading), which the fused call would bypass")
    for label, t in (("weight", base.weight), ("bias", base.bias)):
        if t is None:
            continue
        if type(t.data) is not torch.Tensor or not t.dtype.is_floating_point:
            return None, (f"its base {label} is a {type(t.data).__name__} of dtype {t.dtype} "
                          f"(quantized or sharded), not a plain floating-point tensor")
    return (weight, base.bias), None


def _adapter_reason(module, adapter):
    """Why the adapter ``adapter`` of a PEFT LoRA Linear cannot run fused, or None."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if getattr(module, "use_dora", {}).get(adapter, False):
        return f"adapter '{adapter}' uses DoRA (use_dora=True)"
    if variant is not None:
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
    active = _active_here(module)
    if len(active) > 1:
        return (f"several adapters are active at once ({active}); lorakern fuses one adapter "
                f"per layer")
    if active:
        return _adapter_reason(module, active[0])
    return None


def _unservable(module, fused_classes):
    """The reason a module (a PEFT LoRA layer) cannot be patched, or None."""
    if type(module) not in fused_classes:
        cls = type(module)
        return (f"it is a PEFT {cls.__module__}.{cls.__qualname__} layer, not "
                f"peft.tuners.lora.layer.Linear or Embedding: lorakern fuses LoRA on nn.Linear, "
                f"Conv1D and nn.Embedding only (not convolutions, attention, quantized or "
                f"parallel layers)")
    if _is_peft_embedding(module):
        reason = _embedding_base_reason(module.get_base_layer())
    else:
        _, reason = _base_weight_and_bias(module.get_base_layer())
    return reason or _state_reason(module)


def _peft_forward(module, x, *args, **kwargs):
    """PEFT's own forward of the module's class."""
    return type(module).forward(module, x, *args, **kwargs)


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's ``Linear.forward`` for one plain LoRA adapter, as one ``lora_linear`` call.

    States without a LoRA term (adapters disabled, merged, or none active on this
    layer) run PEFT's own forward, which is the base layer alone. States the fused
    path cannot reproduce raise ValueError naming the module.
    """
    name = self._lorakern_name
    if kwargs.get("adapter_names") is not None:
        raise ValueError(f"lorakern-patched PEFT module '{name}': mixed-adapter batches "
                         f"(adapter_names=...) are not fused; unpatch_peft() the model first")
    if any(kwargs.get(k) is not None for k in ("alora_offsets",)):
        raise ValueError(f"lorakern-patched PEFT module '{name}': aLoRA offsets are not fused")
    kwargs.pop("adapter_names", None)
    kwargs.pop("alora_offsets", None)
    if args or kwargs:
        raise ValueError(f"lorakern-patched PEFT module '{name}': extra forward arguments "
                         f"{len(args)} positional, {sorted(kwargs)} keyword are not supported")
    active = _active_here(self)
    if self.disable_adapters or self.merged or not active:
        return _peft_forward(self, x)
    if _is_peft_embedding(self):
        return _fused_embedding(self, x, active)
    weight_bias, reason = _base_weight_and_bias(self.get_base_layer())
    reason = reason or _state_reason(self)
    if reason:
        raise ValueError(f"lorakern-patched PEFT module '{name}' cannot run fused: {reason}; "
                         f"unpatch_peft() the model to use PEFT's forward")
    weight, bias = weight_bias
    adapter = active[0]
    dropout = self.lora_dropout[adapter]
    dropout_p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    # PEFT casts x to the adapter dtype for the LoRA term only; lora_linear takes x in
    # the base dtype and computes the rank product in the promoted dtype of x, A, B
    return lora_linear(x, weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                       scale=self.scaling[adapter], bias=bias, dropout_p=dropout_p)


def _fused_embedding(self, ids, active):
    """PEFT's ``Embedding.forward`` for one plain LoRA adapter, as one ``lora_embedding``."""
    base = self.get_base_layer()
    reason = _embedding_base_reason(base) or _state_reason(self)
    if reason:
        raise ValueError(f"lorakern-patched PEFT module '{self._lorakern_name}' cannot run "
                         f"fused: {reason}; unpatch_peft() the model to use PEFT's forward")
    adapter = active[0]
    return lora_embedding(ids, base.weight, self.lora_embedding_A[adapter],
                          self.lora_embedding_B[adapter], self.scaling[adapter],
                          base.padding_idx)


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
    lora_embedding_B, scaling, padding_idx)`` (PEFT applies no dropout there). Parameters, state dict, saving, merging and
    adapter switching stay PEFT's; PEFT's forward runs whenever there is no LoRA
    term (adapters disabled or merged, or no active adapter on the layer).

    Args:
        peft_model: a ``peft.PeftModel``, ``LoraModel``, or any module holding PEFT
            LoRA layers.
        strict: if True (default), any PEFT LoRA layer that cannot run fused raises
            ValueError naming it and why: DoRA or another LoRA variant,
            ``lora_bias``, several active adapters, merged or disabled adapters,
            LoRA on convolutions/attention, scaled or max_norm embeddings,
            quantized or hooked base layers. If False, such layers keep PEFT's forward and a warning lists
            them.
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
    for name, module in layers:
        if _is_patched(module):
            continue
        reason = _unservable(module, fused_classes)
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
    log.info("lorakern: patch_peft: %s", patch_summary(peft_model))
    return peft_model


def patched_modules(model):
    """Names of the modules of ``model`` that ``patch_peft`` switched to the fused kernels."""
    return [name for name, m in model.named_modules() if _is_patched(m)]


class PatchSummary(NamedTuple):
    """Which PEFT LoRA modules of a model run fused, and why the others do not.

    ``fused``: names of the modules on lorakern's kernels (``patched_modules``).
    ``left_to_peft``: {name: reason} for every other PEFT LoRA layer.
    ``str()`` gives one line: the counts, then the modules left to PEFT.
    """
    fused: list
    left_to_peft: dict

    def __str__(self):
        line = (f"{len(self.fused)} PEFT LoRA module(s) on the fused kernels, "
                f"{len(self.left_to_peft)} left on PEFT's forward")
        if self.left_to_peft:
            shown = list(self.left_to_peft.items())[:_SHOWN]
            line += ": " + "; ".join(f"'{name}' ({reason})" for name, reason in shown)
            if len(self.left_to_peft) > _SHOWN:
                line += f"; ... ({len(self.left_to_peft)} in all)"
        return line


def patch_summary(model):
    """The ``PatchSummary`` of ``model`` as it is now (after ``patch_peft``,
    ``unpatch_peft`` or adapter changes): computed from the modules, never stored."""
    fused_classes, lora_layer_cls = _peft_lora_classes()
    fused, left = [], {}
    for name, module in model.named_modules():
        if _is_patched(module):
            fused.append(name)
        elif isinstance(module, lora_layer_cls):
            left[name] = (_unservable(module, fused_classes)
                          or "fusable, not patched (patch_peft patches it)")
    return PatchSummary(fused, left)


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
            restored += 1
    return restored


# ------------------------------------------------------------------------------------------------
# save_adapter: a lorakern model as a PEFT LoRA adapter
# ------------------------------------------------------------------------------------------------

def _lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


def _adapter_keys(name, layer):
    """The state-dict keys PEFT gives this layer's A and B."""
    if isinstance(layer, LoRAEmbedding):
        return PREFIX + name + _EMBEDDING_A_SUFFIX, PREFIX + name + _EMBEDDING_B_SUFFIX
    return PREFIX + name + _A_SUFFIX, PREFIX + name + _B_SUFFIX


def _base_module_names(model, lora_names):
    """Module names as PEFT sees them on a fresh base model: the lorakern model's,
    minus anything inside a LoRA layer."""
    inside = tuple(n + "." for n in lora_names)
    return [n for n, _ in model.named_modules() if n and not n.startswith(inside)]


def _suffix_targets(names, lora_names):
    """PEFT's list form of target_modules (exact name or '.'-suffix) if the last name
    components of the injected layers select exactly them, else None."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in lora_names})
    selected = {n for n in names
                if n in suffixes or any(n.endswith("." + s) for s in suffixes)}
    return suffixes if selected == set(lora_names) else None


def _exact_regex(paths):
    """A regex that PEFT's re.fullmatch matches against exactly these module names."""
    return "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def _uniform(layers, attribute, what):
    values = {getattr(m, attribute) for _, m in layers}
    if len(values) > 1:
        by_value = {}
        for name, m in layers:
            by_value.setdefault(getattr(m, attribute), name)
        listed = ", ".join(f"{v!r} (e.g. '{n}')" for v, n in by_value.items())
        raise ValueError(f"save_adapter: a PEFT LoRA adapter has one {what} for all layers, "
                         f"this model has several: {listed}")
    return values.pop()


def _modules_to_save(model, lora_layers, names, requested):
    """{module path: module} to save whole, as PEFT's modules_to_save does, and the
    config's modules_to_save list.

    By default, every module that directly owns a trainable parameter outside the
    LoRA layers' lora_A/lora_B: whatever was trained must be in the adapter for
    PeftModel.from_pretrained to give the same outputs.
    """
    lora_names = [n for n, _ in lora_layers]
    lora_prefixes = tuple(n + "." for n in lora_names)
    if requested is not None:
        entries = [requested] if isinstance(requested, str) else list(requested)
        # PEFT's matching for modules_to_save: a plain suffix test on the module name
        paths = [n for n in names if any(n.endswith(e) for e in entries)]
        missing = [e for e in entries if not any(n.endswith(e) for n in names)]
        if missing:
            raise ValueError(f"save_adapter: modules_to_save {missing} match no module")
    else:
        paths = []
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            owner, _, leaf = pname.rpartition(".")
            if owner in lora_names:
                if leaf in ("lora_A", "lora_B"):
                    continue
                raise ValueError(
                    f"save_adapter: the base {leaf} of LoRA layer '{owner}' is trainable; a PEFT "
                    f"LoRA adapter with bias='none' holds only lora_A and lora_B (freeze it, or "
                    f"it will not be saved)")
            if owner not in paths:
                paths.append(owner)
        entries = paths
        for path in paths:
            clash = [n for n in names if n != path and n.endswith(path)]
            if not path or clash:
                raise ValueError(
                    f"save_adapter: module '{path}' has trainable parameters but cannot be named "
                    f"for PEFT's modules_to_save (suffix matching would also select {clash} "
                    f"or the whole model); pass modules_to_save=... explicitly")
    for path in paths:
        inner = [n for n in lora_names if n == path or n.startswith(path + ".")]
        if inner or path.startswith(lora_prefixes):
            raise ValueError(f"save_adapter: module '{path}' is both saved whole "
                             f"(modules_to_save) and holds LoRA layers {inner or [path]}")
    return {p: model.get_submodule(p) for p in paths}, (entries or None)


def save_adapter(model, path, modules_to_save=None, task_type=None,
                 base_model_name_or_path=None):
    """Write a lorakern-injected model as a PEFT LoRA adapter.

    ``path`` gets ``adapter_config.json`` and ``adapter_model.safetensors``, keys
    ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT's
    layout, adapter name stripped), so that
    ``peft.PeftModel.from_pretrained(fresh_base_model, path)`` gives this model's
    outputs.

    Args:
        model: a model whose layers were replaced by ``LoRALinear``
            (``inject_lora``).
        path: output directory (created if missing).
        modules_to_save: module names (PEFT's suffix semantics) saved whole; by
            default every module directly owning a trainable parameter besides
            the adapters (what ``inject_lora(modules_to_save=...)`` unfroze).
        task_type: PEFT task type (e.g. "CAUSAL_LM") or None.
        base_model_name_or_path: recorded in the config; by default the model's
            ``name_or_path`` when it has a non-empty one.

    Ranks and alphas that differ between layers go into PEFT's ``rank_pattern``
    / ``alpha_pattern``; ``use_rslora`` and the dropout probability must be the
    same for all layers (ValueError otherwise). Merged layers save the same
    adapter as unmerged ones: A and B, never the base weight, so the adapter
    applies to the original base model either way.

    Both files are written beside their final names and then renamed over the
    old ones: a save that fails (disk full, ...) leaves an adapter already in
    ``path`` as it was, and no temporary files.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: this {type(model).__name__} has no LoRA layers "
                         f"(inject_lora first)")
    use_rslora = _uniform(layers, "use_rslora", "use_rslora")
    # PEFT applies lora_dropout to linear layers only: embeddings do not count here
    linear_layers = [(n, m) for n, m in layers if not isinstance(m, LoRAEmbedding)]
    dropout = _uniform(linear_layers, "dropout", "lora_dropout") if linear_layers else 0.0
    for name, m in layers:
        expected = m.alpha / (math.sqrt(m.r) if m.use_rslora else m.r)
        if not math.isclose(m.scale, expected, rel_tol=1e-12):
            raise ValueError(f"save_adapter: layer '{name}' has scale {m.scale}, not alpha/"
                             f"{'sqrt(r)' if m.use_rslora else 'r'} = {expected} (r={m.r}, "
                             f"alpha={m.alpha}): PEFT would rebuild the latter")
        if m.weight.requires_grad:
            raise ValueError(f"save_adapter: the base weight of LoRA layer '{name}' is trainable; "
                             f"a PEFT LoRA adapter holds only lora_A and lora_B")

    # the most common (r, alpha) is the config's; the others are patterns keyed by
    # the anchored module name (PEFT matches them with re.match(r"(.*\.)?(KEY)$"))
    counts = {}
    for _, m in layers:
        counts[(m.r, m.alpha)] = counts.get((m.r, m.alpha), 0) + 1
    r, alpha = max(counts, key=counts.get)
    rank_pattern = {"^" + re.escape(n): m.r for n, m in layers if m.r != r}
    alpha_pattern = {"^" + re.escape(n): m.alpha for n, m in layers if m.alpha != alpha}

    lora_names = [n for n, _ in layers]
    names = _base_module_names(model, lora_names)
    target_modules = _suffix_targets(names, lora_names) or _exact_regex(lora_names)
    saved_whole, modules_to_save = _modules_to_save(model, layers, names, modules_to_save)

    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    # fields every PEFT >= 0.9 knows (newer ones, e.g. lora_bias or exclude_modules,
    # would make older versions warn); PEFT fills in the defaults of the rest
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "bias": "none",
        "use_rslora": use_rslora,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in linear_layers),
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
    }

    def cpu(t):
        # own storage: safetensors refuses shared or strided tensors
        return t.detach().to("cpu", copy=True).contiguous()

    tensors = {}
    for name, m in layers:
        key_a, key_b = _adapter_keys(name, m)
        tensors[key_a] = cpu(m.lora_A)
        tensors[key_b] = cpu(m.lora_B)
    for module_path, module in saved_whole.items():
        for key, t in module.state_dict().items():
            tensors[f"{PREFIX}{module_path}.{key}"] = cpu(t)

    os.makedirs(path, exist_ok=True)
    _write_adapter_files(path, config, tensors)
    return path


def _write_adapter_files(path, config, tensors):
    """Both files of the adapter replaced, or neither: each is written to a temporary
    file beside it first, and if installing the config fails after the weights went
    in, the old weights are put back (a crash between the two renames is the only
    way to get a mixed pair)."""
    from safetensors.torch import save_file

    weights_file = os.path.join(path, WEIGHTS_NAME)
    config_file = os.path.join(path, CONFIG_NAME)
    weights_tmp = _temporary_name(path, WEIGHTS_NAME)
    config_tmp = _temporary_name(path, CONFIG_NAME)
    backup = None
    try:
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        _fsync(weights_tmp)
        with open(config_tmp, "x", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        backup = _backup_of(weights_file, path)
        os.replace(weights_tmp, weights_file)
        try:
            os.replace(config_tmp, config_file)
        except BaseException:
            _restore(weights_file, backup)
            backup = None
            raise
    finally:
        for leftover in (weights_tmp, config_tmp, backup):
            if leftover is not None and os.path.lexists(leftover):
                os.remove(leftover)
    _fsync_directory(path)


def _temporary_name(directory, name):
    """An unused name beside ``name``: os.replace is then a rename within one
    filesystem, which is atomic. Only a name: whoever writes the file creates it,
    with the usual permissions (mkstemp's would be owner-only)."""
    return os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")


def _backup_of(file, directory):
    """A second name for ``file`` (a hard link, or a copy where links are not
    supported), or None when there is no such file."""
    if not os.path.exists(file):
        return None
    backup = _temporary_name(directory, os.path.basename(file) + ".old")
    try:
        os.link(file, backup)
    except OSError:
        shutil.copy2(file, backup)
    return backup


def _restore(file, backup):
    if backup is None:  # there was no file before this save
        os.remove(file)
    else:
        os.replace(backup, file)


def _fsync(file):
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory):
    """Makes the renames durable where the OS allows syncing a directory (POSIX);
    elsewhere the renames are done all the same, only not flushed yet."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# load_adapter: a PEFT LoRA adapter as LoRALinear layers
# ------------------------------------------------------------------------------------------------

# LoraConfig fields that change what a layer computes or which tensors exist:
# none of them has a LoRALinear equivalent
_UNSUPPORTED_FIELDS = ("use_dora", "lora_bias", "alora_invocation_tokens", "velora_config",
                       "monteclora_config", "kasa_config", "use_bdlora", "arrow_config",
                       "use_qalora", "layer_replication", "target_parameters",
                       "trainable_token_indices", "megatron_config")


# initialisations after which PEFT's base weight is no longer the original one
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _read_adapter(path):
    return _read_config(path), _read_weights(path)


def _read_config(path):
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"load_adapter: no {CONFIG_NAME} in '{path}'")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as err:  # invalid JSON or not UTF-8
        raise ValueError(f"load_adapter: '{config_file}' is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: '{config_file}' holds a JSON {type(config).__name__}, "
                         f"not an object of LoraConfig fields")
    return config


def _read_weights(path):
    weights_file = os.path.join(path, WEIGHTS_NAME)
    bin_file = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(weights_file):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(weights_file)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"load_adapter: '{weights_file}' is not a readable safetensors "
                             f"file (corrupt or truncated?): {err}") from err
    elif os.path.isfile(bin_file):
        weights_file = bin_file
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load's errors on a damaged file have no common type
            raise ValueError(f"load_adapter: '{bin_file}' is not a readable PyTorch weights "
                             f"file (corrupt or truncated?): {type(err).__name__}: {err}"
                             ) from err
    else:
        raise ValueError(f"load_adapter: no {WEIGHTS_NAME} (or adapter_model.bin) in '{path}'")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in state.items()):
        raise ValueError(f"load_adapter: '{weights_file}' is not a mapping of names to tensors")
    return state


def _is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _pattern_problems(config, field, value_ok, wanted):
    pattern = config.get(field)
    if pattern is None:
        return []
    if not isinstance(pattern, dict):
        return [f"{field}={pattern!r} (an object of module-name patterns)"]
    problems = []
    for key, value in pattern.items():
        try:
            re.compile(key)
        except re.error as err:
            problems.append(f"{field} key {key!r} is not a regular expression ({err})")
        if not value_ok(value):
            problems.append(f"{field}[{key!r}]={value!r} ({wanted})")
    return problems


def _field_problems(config):
    """What is malformed among the fields load_adapter uses."""
    problems = []
    r = config.get("r", 8)
    if not _is_integer(r) or r < 1:
        problems.append(f"r={r!r} (an integer >= 1)")
    alpha = config.get("lora_alpha", 8)
    if not _is_finite_number(alpha):
        problems.append(f"lora_alpha={alpha!r} (a finite number)")
    dropout = config.get("lora_dropout", 0.0)
    if dropout is not None and not (_is_finite_number(dropout) and 0.0 <= dropout < 1.0):
        problems.append(f"lora_dropout={dropout!r} (a probability in [0, 1))")
    rslora = config.get("use_rslora", False)
    if rslora is not None and not isinstance(rslora, bool):
        problems.append(f"use_rslora={rslora!r} (true or false)")
    problems += _pattern_problems(config, "rank_pattern",
                                  lambda v: _is_integer(v) and v >= 1, "an integer >= 1")
    problems += _pattern_problems(config, "alpha_pattern", _is_finite_number, "a finite number")
    entries = config.get("modules_to_save")
    if entries is not None and not (isinstance(entries, list)
                                    and all(isinstance(e, str) and e for e in entries)):
        problems.append(f"modules_to_save={entries!r} (a list of module names)")
    return problems


def _check_config(config, path):
    config_file = os.path.join(path, CONFIG_NAME)
    malformed = _field_problems(config)
    if malformed:
        raise ValueError(f"load_adapter: '{config_file}' has invalid values: "
                         f"{'; '.join(malformed)}")
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (only 'LORA' adapters)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (only 'none': trained base biases)")
    for field in _UNSUPPORTED_FIELDS:
        if config.get(field):
            problems.append(f"{field}={config[field]!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={init!r} (this initialisation rewrites the base "
                        f"weight, so the adapter is relative to a changed base; convert it with "
                        f"PEFT's path_initial_model_for_weight_conversion first)")
    if problems:
        raise ValueError(f"load_adapter: '{path}' uses settings lorakern's LoRALinear cannot "
                         f"reproduce: {'; '.join(problems)}")


def _split_state(state, path):
    """({module: {"A": t, "B": t}}, {other state key: t}); ValueError for LoRA tensors
    that LoRALinear has no place for (embedding LoRA, DoRA, lora_bias, ...)."""
    adapters, others, problems = {}, {}, []
    for key, t in state.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"load_adapter: '{path}': key '{key}' lacks PEFT's '{PREFIX}' prefix")
        name = key[len(PREFIX):]
        if name.endswith(_A_SUFFIX):
            adapters.setdefault(name[:-len(_A_SUFFIX)], {})["A"] = t
        elif name.endswith(_B_SUFFIX):
            adapters.setdefault(name[:-len(_B_SUFFIX)], {})["B"] = t
        elif name.endswith(_EMBEDDING_A_SUFFIX):
            adapters.setdefault(name[:-len(_EMBEDDING_A_SUFFIX)], {"embedding": True})["A"] = t
        elif name.endswith(_EMBEDDING_B_SUFFIX):
            adapters.setdefault(name[:-len(_EMBEDDING_B_SUFFIX)], {"embedding": True})["B"] = t
        elif re.search(r"(^|\.)lora_magnitude_vector(\.|$)", name):
            problems.append(f"'{name.split('.lora_magnitude_vector')[0]}': DoRA magnitude")
        elif name.endswith(".lora_B.bias"):
            problems.append(f"'{name[:-len('.lora_B.bias')]}': a bias on lora_B (lora_bias)")
        elif re.search(r"(^|\.)(lora_[^.]*|token_adapter)(\.|$)", name):
            problems.append(f"'{name}': an adapter tensor LoRALinear has no place for")
        else:
            others[name] = t
    if problems:
        raise ValueError(f"load_adapter: '{path}' holds what lorakern's LoRALinear cannot "
                         f"reproduce: {'; '.join(sorted(set(problems)))}")
    return adapters, others


def _layer_settings(model, adapters, config, path):
    """{module name: (r, alpha)} for every adapted layer; ValueError listing every
    module the adapter does not fit."""
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    problems, settings = [], {}
    for name, pair in sorted(adapters.items()):
        problem = _layer_problem(model, name, pair)
        if problem:
            problems.append(f"'{name}'{problem}")
            continue
        r = pair["A"].shape[0]
        expected_r = _pattern_value(config.get("rank_pattern"), name, r_default)
        if r != expected_r:
            problems.append(f"'{name}': lora_A has rank {r}, the config says r={expected_r}")
            continue
        settings[name] = (r, _pattern_value(config.get("alpha_pattern"), name, alpha_default))
    if problems:
        raise ValueError(f"load_adapter: '{path}' cannot be loaded into this model: "
                         f"{'; '.join(problems)}")
    return settings


def _layer_problem(model, name, pair):
    """Why the LoRA pair cannot go on module ``name`` (text after the name), or None."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return f": no such module in this {type(model).__name__}"
    if pair.get("embedding"):
        if not isinstance(module, nn.Embedding):
            return (f" is a {type(module).__name__}, not an nn.Embedding without an adapter "
                    f"(the adapter holds lora_embedding_A/B for it)")
        try:
            embedding_layout(module)
        except TypeError as err:
            return f": {err}"
        in_features, out_features = module.weight.shape
    else:
        if not _is_linear_like(module) or isinstance(module, LoRALayer):
            return (f" is a {type(module).__name__}, not an nn.Linear or Conv1D without an "
                    f"adapter")
        try:
            in_features, out_features, _ = base_layout(module)
        except TypeError as err:
            return f": {err}"
    a, b = pair.get("A"), pair.get("B")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        return (f": lora_A {None if a is None else tuple(a.shape)} and lora_B "
                f"{None if b is None else tuple(b.shape)} are not a LoRA pair of a linear layer")
    if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
        return f": lora_A ({a.dtype}) and lora_B ({b.dtype}) must be floating point"
    if a.shape[1] != in_features or b.shape[0] != out_features:
        return (f": lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit its "
                f"{in_features} inputs and {out_features} outputs")
    return None


def _check_injection_args(settings, dropout, adapter_dtype, path):
    """inject_lora's argument checks, run before anything is changed."""
    for r, alpha in sorted(set(settings.values())):
        try:
            _check_lora_args(r, alpha, dropout, "kaiming", adapter_dtype)
        except ValueError as err:
            raise ValueError(f"load_adapter: '{path}': {err}") from None


def _saved_module_names(model, config, settings, path):
    """modules_to_save as PEFT selects them (a plain suffix test; entries that match
    nothing are ignored, e.g. the "classifier"/"score" pair of SEQ_CLS), by exact
    name; ValueError if one of them holds or is inside an adapted layer."""
    entries = config.get("modules_to_save") or []
    names = [n for n, _ in model.named_modules() if n]
    saved = [n for n in names if any(n.endswith(e) for e in entries)]
    clashes = [f"'{s}' and '{t}'" for t in settings for s in saved
               if t == s or t.startswith(s + ".") or s.startswith(t + ".")]
    if clashes:
        raise ValueError(f"load_adapter: '{path}': modules_to_save {entries} select modules "
                         f"that are (or hold, or are inside) LoRA layers: {'; '.join(clashes)}")
    return saved


def _unwrap_base_layers(others, adapters):
    """PEFT saves the base table of an adapted embedding as '<module>.base_layer.<tensor>'
    (save_embedding_layers): in the base model it is '<module>.<tensor>'."""
    unwrapped = {}
    for key, t in others.items():
        module, sep, tensor = key.partition(".base_layer.")
        unwrapped[f"{module}.{tensor}" if sep and module in adapters else key] = t
    return unwrapped


def _base_tensors(model, others, path):
    """{name: the model's tensor} for the tensors the adapter carries whole
    (modules_to_save, resized embeddings); ValueError for any the model lacks or
    holds in another shape."""
    targets = {n: t for n, t in model.state_dict().items()
               if isinstance(t, torch.Tensor) and not n.endswith("._extra_state")}
    unexpected = sorted(set(others) - set(targets))
    if unexpected:
        raise ValueError(f"load_adapter: '{path}' holds tensors this model lacks: {unexpected}")
    mismatched = [f"'{n}' {tuple(t.shape)} in the adapter, {tuple(targets[n].shape)} in the model"
                  for n, t in others.items() if t.shape != targets[n].shape]
    if mismatched:
        raise ValueError(f"load_adapter: '{path}': shapes differ: {'; '.join(mismatched)}")
    return {n: targets[n] for n in others}


def load_adapter(model, path, adapter_dtype=None):
    """Inject a PEFT LoRA adapter into ``model`` as ``LoRALinear``/``LoRAEmbedding`` layers.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or
    ``adapter_model.bin``) as PEFT's ``save_pretrained`` writes them. The layers
    adapted are those the file holds ``lora_A``/``lora_B`` for, each an
    ``nn.Linear`` or a transformers ``Conv1D`` in ``model`` (a fresh copy of the
    adapter's base model), and those it holds ``lora_embedding_A``/``_B`` for,
    each an ``nn.Embedding`` (``LoRAEmbedding``; a base table PEFT saved beside
    it is loaded into the embedding). They get ``inject_lora`` with the adapter's ``r``,
    ``lora_alpha`` (``rank_pattern``/``alpha_pattern`` per layer),
    ``use_rslora``, ``lora_dropout`` and ``modules_to_save``; A and B are
    loaded, and the tensors of ``modules_to_save`` (and any other base tensors
    the adapter carries, e.g. resized embeddings) are copied into the model.

    Raises ValueError, before the model is changed in any way, naming what it
    cannot reproduce: non-LORA ``peft_type``, ``bias`` other than "none",
    ``use_dora``, ``lora_bias`` and other LoRA variants, LoRA on layers other
    than Linear, Conv1D and Embedding; invalid config values (``r``, ``lora_alpha``,
    ``lora_dropout``, patterns, ``modules_to_save``); tensors that do not fit
    the model; a config file that is not a JSON object, or a weights file that
    cannot be read (both named by path).

    Returns:
        ``model``, in place.
    """
    config, state = _read_adapter(path)
    _check_config(config, path)
    adapters, others = _split_state(state, path)
    if not adapters:
        raise ValueError(f"load_adapter: '{path}' holds no lora_A/lora_B weights")
    others = _unwrap_base_layers(others, adapters)
    if _is_linear_like(model) or isinstance(model, LoRALinear):
        raise ValueError(f"load_adapter: the model is a {type(model).__name__} itself; give the "
                         f"model that holds the adapted layers")
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    settings = _layer_settings(model, adapters, config, path)
    _check_injection_args(settings, dropout, adapter_dtype, path)
    saved = _saved_module_names(model, config, settings, path)
    base_tensors = _base_tensors(model, others, path)

    # everything is checked: from here on the model changes. One inject_lora per
    # (r, alpha): rank_pattern / alpha_pattern give several (inject_lora keeps the
    # adapters of earlier calls trainable)
    groups = {}
    for name, value in settings.items():
        groups.setdefault(value, []).append(name)
    for (r, alpha), group in groups.items():
        inject_lora(model, _exact_regex(group), r=r, alpha=alpha, dropout=dropout,
                    modules_to_save=_exact_regex(saved) if saved else None,
                    use_rslora=use_rslora, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        for name, pair in adapters.items():
            layer = model.get_submodule(name)
            layer.lora_A.copy_(pair["A"])
            layer.lora_B.copy_(pair["B"])
        # the base tensors keep their objects (LoRALinear holds the base layer's own
        # Parameters), so the references taken before injection are still the model's
        for name, t in others.items():
            base_tensors[name].copy_(t)
    return model
