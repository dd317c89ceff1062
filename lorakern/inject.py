"""Put ``LoRALinear`` layers into an existing model, PEFT-style, and report on it.

- ``inject_lora(model, target_modules, ...)``: replace the matching ``nn.Linear``
  (and transformers ``Conv1D``) modules in place, freeze everything but the
  adapters and the ``modules_to_save``.
- ``lora_report(model)`` / ``count_parameters(model)``: what trains.
- ``merge_lora(model)`` / ``unmerge_lora(model)``: every ``LoRALinear`` at once.

Names match as in PEFT: a list entry matches a module whose name equals it or
ends with ``"." + entry``; a single string is a regular expression that must
match the whole module name.
"""
import re

from torch import nn

from .modules import LoRALinear, _check_lora_args, _is_conv1d, base_layout

_SHOWN_NAMES = 20


def _is_linear(module):
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _matches(name, entry):
    return name == entry or name.endswith("." + entry)


def _listing(names):
    """Names for an error message: the distinct last components, then the full
    names (the first _SHOWN_NAMES of them)."""
    if not names:
        return "none"
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    shown = ", ".join(names[:_SHOWN_NAMES])
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN_NAMES else ""
    return f"names ending in {', '.join(leaves)}: {shown}{more}"


def _select(named, spec, what):
    """Names among ``named`` (name -> module, root excluded) matched by spec: a
    list of names/suffixes (each must match something) or a regex string."""
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{what}={spec!r} is not a valid regular expression: {err}") from err
        chosen = [name for name in named if pattern.fullmatch(name)]
        return chosen, ([] if chosen else [spec])
    entries = list(spec)
    if not entries:
        raise ValueError(f"{what} is empty; give module names, suffixes or a regex string")
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"{what} entries must be non-empty strings, got {entry!r}")
    chosen = [name for name in named if any(_matches(name, entry) for entry in entries)]
    unmatched = [entry for entry in entries if not any(_matches(name, entry) for name in named)]
    return chosen, unmatched


def inject_lora(model, target_modules, r=8, alpha=16, dropout=0.0, modules_to_save=None,
                use_rslora=False, init="kaiming", adapter_dtype=None):
    """Replace the target linear modules of ``model`` with ``LoRALinear`` in place.

    Args:
        model: any ``nn.Module``; its submodules are replaced, so it must not be
            a linear layer itself (use ``LoRALinear.from_linear`` for that).
        target_modules: a list of module names or name suffixes (``"q_proj"``
            matches ``"layers.0.attn.q_proj"``), each of which must match at
            least one module; or one string, a regex matching whole names.
            Every match must be an ``nn.Linear`` or a transformers ``Conv1D``.
        r, alpha, dropout, use_rslora, init, adapter_dtype: as ``LoRALinear``.
        modules_to_save: names/suffixes (or a regex) of modules trained in
            full (a classifier head); their parameters are unfrozen in place.
    Every other parameter is frozen, except the adapters of any ``LoRALinear``
    already in the model. Nothing is changed when an argument is rejected.
    Returns the model.
    """
    if _is_linear(model) or isinstance(model, LoRALinear):
        raise ValueError(f"inject_lora replaces submodules of the model, but the model is a "
                         f"{type(model).__name__} itself; use LoRALinear.from_linear")
    if target_modules is None:
        raise ValueError("target_modules is required: module names, suffixes or a regex")
    named = {name: module for name, module in model.named_modules() if name}
    linear_names = [name for name, module in named.items() if _is_linear(module)]

    targets, unmatched = _select(named, target_modules, "target_modules")
    if unmatched:
        raise ValueError(f"target_modules {unmatched} matched no module of the model; its "
                         f"linear modules are {_listing(linear_names)}")
    for name in targets:
        module = named[name]
        if isinstance(module, LoRALinear):
            raise ValueError(f"target module {name!r} is already a LoRALinear")
        if not _is_linear(module):
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; LoRA "
                             f"targets must be nn.Linear or transformers Conv1D (linear "
                             f"modules: {_listing(linear_names)})")

    saved = []
    if modules_to_save is not None:
        saved, unmatched = _select(named, modules_to_save, "modules_to_save")
        if unmatched:
            owners = [name for name, m in named.items()
                      if next(m.parameters(recurse=False), None) is not None]
            raise ValueError(f"modules_to_save {unmatched} matched no module of the model; "
                             f"its modules with parameters are {_listing(owners)}")
        for target in targets:
            for save in saved:
                if (target == save or target.startswith(save + ".")
                        or save.startswith(target + ".")):
                    raise ValueError(f"module {target!r} is both a LoRA target and (in) "
                                     f"modules_to_save {save!r}; choose one")

    # every argument and target is checked before any module is touched
    _check_lora_args(r, alpha, dropout, init, adapter_dtype)
    for name in targets:
        try:
            base_layout(named[name])
        except TypeError as err:
            raise TypeError(f"target module {name!r}: {err}") from None
    new_layers = {name: LoRALinear.from_linear(named[name], r=r, alpha=alpha, dropout=dropout,
                                               use_rslora=use_rslora, init=init,
                                               adapter_dtype=adapter_dtype)
                  for name in targets}
    for name, layer in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)

    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    for name in saved:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return model


def count_parameters(model):
    """(total, trainable) element counts, each shared parameter counted once."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return total, trainable


def _percent(part, whole):
    return 100.0 * part / whole if whole else 0.0


def lora_report(model):
    """Prints and returns one line per parameter (name, trainable 1/0, elements),
    then ``Total parameters: N, trainable: T (P%)``."""
    rows = [(name, int(param.requires_grad), param.numel())
            for name, param in model.named_parameters()]
    width = max((len(name) for name, _, _ in rows), default=0)
    lines = [f"{name:<{width}}  {flag}  {numel}" for name, flag, numel in rows]
    total, trainable = count_parameters(model)
    lines.append(f"Total parameters: {total}, trainable: {trainable} "
                 f"({_percent(trainable, total):.4f}%)")
    report = "\n".join(lines)
    print(report)
    return report


def _lora_layers(model):
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no LoRALinear layers; "
                         f"call inject_lora first")
    return layers


def _merge_all(model, sign):
    layers = _lora_layers(model)
    wrong = [name or "<root>" for name, layer in layers if layer.merged == (sign > 0)]
    if wrong:
        state = "already merged" if sign > 0 else "not merged"
        raise RuntimeError(f"{len(wrong)} LoRALinear layers are {state}: {wrong}; "
                           f"nothing was changed")
    # every layer is checked before any weight is written
    for _, layer in layers:
        layer._check_delta(sign, layer._delta_scale(sign))
    for _, layer in layers:
        layer._apply_delta(sign, check=False)
    return model


def merge_lora(model):
    """Merge every ``LoRALinear`` of the model (all or none). Returns the model."""
    return _merge_all(model, +1.0)


def unmerge_lora(model):
    """Unmerge every ``LoRALinear`` of the model (all or none). Returns the model."""
    return _merge_all(model, -1.0)
