"""Put ``LoRALinear`` layers into an existing model, PEFT-style, and report on it.

- ``inject_lora(model, target_modules, ...)``: replace the matching ``nn.Linear``
  (and transformers ``Conv1D``) modules in place, freeze everything but the
  adapters and the ``modules_to_save``.
- ``lora_report(model)`` (prints) / ``format_lora_report(model)`` (the text) /
  ``count_parameters(model)``: what trains.
- ``merge_lora(model)`` / ``unmerge_lora(model)``: every ``LoRALinear`` at once.

Names match as in PEFT: a list entry matches a module whose name equals it or
ends with ``"." + entry``; a single string is a regular expression that must
match the whole module name.
"""
import dataclasses
import enum
import re
from collections.abc import Mapping

from torch import nn

from .embedding import LoRAEmbedding, embedding_layout
from .modules import LoRALayer, LoRALinear, _check_lora_args, _is_conv1d, base_layout

_SHOWN_NAMES = 20


def _is_linear(module):
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_embedding(module):
    return isinstance(module, nn.Embedding)


def _is_target_kind(module):
    """What LoRA layers can replace: linear modules and embeddings."""
    return _is_linear(module) or _is_embedding(module)


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


class _Default:
    """A keyword default that shows as its value in the signature, so that an
    argument left out can be told from one given with the same value."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)


def _given(value):
    return not isinstance(value, _Default)


def _value(value):
    return value.value if isinstance(value, _Default) else value


ALL_LINEAR = "all-linear"

# LoraConfig fields read as inject_lora's arguments (PEFT name -> argument)
_CONFIG_ARGUMENTS = {"target_modules": "target_modules", "r": "r", "lora_alpha": "alpha",
                     "lora_dropout": "dropout", "modules_to_save": "modules_to_save",
                     "use_rslora": "use_rslora", "init_lora_weights": "init",
                     "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
                     "exclude_modules": "exclude_modules", "bias": "bias",
                     "fan_in_fan_out": "fan_in_fan_out", "inference_mode": "inference_mode",
                     "task_type": "task_type"}
# LoraConfig fields that change nothing inject_lora builds: bookkeeping, or settings
# read only when a refused feature is on (megatron_core, qalora_group_size)
_CONFIG_BOOKKEEPING = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                       "revision", "runtime_config", "megatron_core", "qalora_group_size")
# task types whose PeftModel saves a classification head whole (matched as PEFT
# does, by plain suffix; names the model lacks are skipped)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}
_SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's order for the all-linear exclusion
_PLAIN_TASKS = (None, "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")


def inject_lora(model, target_modules=None, r=_Default(8), alpha=_Default(16),
                dropout=_Default(0.0), modules_to_save=None, use_rslora=_Default(False),
                init=_Default("kaiming"), adapter_dtype=None, *, config=None,
                lora_alpha=_Default(None), lora_dropout=_Default(None),
                init_lora_weights=_Default(None), rank_pattern=None, alpha_pattern=None,
                exclude_modules=None, bias=_Default("none"), fan_in_fan_out=_Default(None)):
    """Replace the target linear modules of ``model`` with ``LoRALinear`` in place.

    Args:
        model: any ``nn.Module``; its submodules are replaced, so it must not be
            a linear layer itself (use ``LoRALinear.from_linear`` for that).
        target_modules: a list of module names or name suffixes (``"q_proj"``
            matches ``"layers.0.attn.q_proj"``), each of which must match at
            least one module; or one string, a regex matching whole names; or
            ``"all-linear"``: every ``nn.Linear``/``Conv1D`` but a transformers
            model's output layer (``get_output_embeddings()``), as PEFT.
            Every match must be an ``nn.Linear`` or a transformers ``Conv1D``.
            May also be a ``peft.LoraConfig`` or its dict (``config``).
        r, alpha, dropout, use_rslora, init, adapter_dtype: as ``LoRALinear``.
        modules_to_save: names/suffixes (or a regex) of modules trained in
            full (a classifier head); their parameters are unfrozen in place.
        config: a ``peft.LoraConfig``, or its dict (the contents of an
            ``adapter_config.json``), read as ``get_peft_model`` reads it.
            Fields with no ``LoRALinear`` equivalent (``use_dora``,
            ``lora_bias``, ``layers_to_transform``, ``target_parameters``, ...)
            are refused when set. An argument given both in the config and as
            a keyword is refused.
        lora_alpha, lora_dropout, init_lora_weights: PEFT's names for
            ``alpha``, ``dropout`` and ``init`` (``True`` is ``"kaiming"``,
            ``"gaussian"`` is ``"gaussian"``; ``False`` and the data-driven
            initialisations are refused); giving both names is refused.
        rank_pattern, alpha_pattern: ``{key: r}`` / ``{key: alpha}`` overrides
            per module; a key is a regex that must match the end of the module
            name on a ``.`` boundary (PEFT's ``re.match(rf"(.*\\.)?({key})$")``),
            the first matching key wins, and every key must match a target.
        exclude_modules: names/suffixes or a regex of modules never targeted.
        bias: ``"none"`` only (PEFT's trained base biases are refused).
        fan_in_fan_out: accepted and read from each module instead (a Conv1D
            stores (in, out)), which is what PEFT ends up doing too.
    Every other parameter is frozen, except the adapters of any ``LoRALinear``
    already in the model (a config with ``inference_mode=True`` freezes the new
    adapters too). Nothing is changed when an argument is rejected.
    Returns the model.
    """
    if _is_config(target_modules):
        if config is not None:
            raise ValueError("inject_lora got two configs: one as target_modules, one as config=")
        config, target_modules = target_modules, None
    keywords, spelled = _keyword_settings(
        target_modules=target_modules, r=r, alpha=alpha, dropout=dropout,
        modules_to_save=modules_to_save, use_rslora=use_rslora, init=init,
        adapter_dtype=adapter_dtype, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        init_lora_weights=init_lora_weights, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, exclude_modules=exclude_modules, bias=bias,
        fan_in_fan_out=fan_in_fan_out)
    from_config = _config_settings(config) if config is not None else {}
    settings = _merge_settings(from_config, keywords, spelled)
    return _inject(model, **settings)


_DEFAULTS = {"target_modules": None, "r": 8, "alpha": 16, "dropout": 0.0,
             "modules_to_save": None, "use_rslora": False, "init": "kaiming",
             "adapter_dtype": None, "rank_pattern": None, "alpha_pattern": None,
             "exclude_modules": None, "bias": "none", "fan_in_fan_out": None,
             "inference_mode": False, "task_type": None, "from_config": False}
_ALIASES = (("alpha", "lora_alpha"), ("dropout", "lora_dropout"), ("init", "init_lora_weights"))


def _is_config(value):
    return isinstance(value, Mapping) or (dataclasses.is_dataclass(value)
                                          and not isinstance(value, type))


def _plain(value):
    """An enum member (PEFT's TaskType, PeftType) as its value."""
    return value.value if isinstance(value, enum.Enum) else value


def _init_from_peft(init_lora_weights):
    """PEFT's init_lora_weights as LoRALinear's init."""
    if init_lora_weights is True:
        return "kaiming"
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
        return "gaussian"
    raise ValueError(f"init_lora_weights={init_lora_weights!r} has no LoRALinear equivalent: "
                     f"True (kaiming-uniform A) and 'gaussian' are supported; False (a random, "
                     f"non-zero B) and the data-driven initialisations are not")


def _keyword_settings(**arguments):
    """The arguments the caller gave, under lorakern's names; both names of one
    setting (alpha and lora_alpha) are refused."""
    given = {name: _value(value) for name, value in arguments.items()
             if _given(value) and value is not None}
    spelled = {name: f"{name}={value!r}" for name, value in given.items()}
    for ours, peft_name in _ALIASES:
        if ours in given and peft_name in given:
            raise ValueError(f"inject_lora got both {spelled[ours]} and {spelled[peft_name]}; "
                             f"give one of them")
        if peft_name in given:
            value = given.pop(peft_name)
            given[ours] = _init_from_peft(value) if ours == "init" else value
            spelled[ours] = spelled.pop(peft_name)
    return given, spelled


def _config_settings(config):
    """A LoraConfig (or its dict) as inject_lora's arguments; ValueError naming every
    field set to something LoRALinear cannot reproduce."""
    if isinstance(config, Mapping):
        fields = dict(config)
    else:
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    peft_type = _plain(fields.get("peft_type", "LORA"))
    refused = [] if peft_type == "LORA" else [f"peft_type={peft_type!r} (only LoRA)"]
    settings = {}
    for name, value in fields.items():
        value = _plain(value)
        if name in _CONFIG_ARGUMENTS:
            if value is not None:
                settings[_CONFIG_ARGUMENTS[name]] = value
        elif name not in _CONFIG_BOOKKEEPING and value:
            refused.append(f"{name}={value!r}")
    if refused:
        raise ValueError(f"inject_lora: the config sets what lorakern's LoRALinear cannot "
                         f"reproduce: {'; '.join(refused)}")
    if "init" in settings:
        settings["init"] = _init_from_peft(settings["init"])
    settings["from_config"] = True
    return settings


def _merge_settings(from_config, keywords, spelled):
    both = sorted(set(from_config) & set(keywords))
    if both:
        peft_names = {ours: peft_name for peft_name, ours in _CONFIG_ARGUMENTS.items()}
        listed = ", ".join(f"{peft_names[name]}={from_config[name]!r} in the config and "
                           f"{spelled[name]}" for name in both)
        raise ValueError(f"inject_lora: given both in the config and as a keyword: {listed}; "
                         f"give each setting once")
    return {**_DEFAULTS, **from_config, **keywords}


def _check_peft_settings(bias, fan_in_fan_out, inference_mode, task_type):
    if bias != "none":
        raise ValueError(f"bias={bias!r}: only 'none' is supported (LoRALinear keeps the base "
                         f"bias frozen)")
    for name, value in (("fan_in_fan_out", fan_in_fan_out), ("inference_mode", inference_mode)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {name}={value!r}")
    if task_type not in _PLAIN_TASKS and task_type not in _TASK_HEADS:
        raise ValueError(f"task_type={task_type!r} is not a PEFT task type lorakern knows: "
                         f"{[t for t in _PLAIN_TASKS if t] + list(_TASK_HEADS)}")


def _check_pattern(pattern, what, check_value):
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise ValueError(f"{what} must be a dict of module-name regex -> value, got {pattern!r}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{what} key {key!r} is not a valid regular expression: "
                             f"{err}") from err
        check_value(value)
    return dict(pattern)


def _pattern_value(pattern, name, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of
    ``name`` on a '.' boundary. ``pattern`` may be None (no overrides)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _is_transformers_model(model):
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)


def _output_layer_name(model, task_type):
    """The module that PEFT's "all-linear" leaves out: a transformers model's output
    embedding (its classifier head for a SEQ_CLS model without one), or None."""
    if not _is_transformers_model(model):
        return None
    output = model.get_output_embeddings()
    if output is None and task_type == "SEQ_CLS":
        heads = (getattr(model, n, None) for n in _SEQ_CLS_HEADS)
        output = next((head for head in heads if head is not None), None)
    return next((name for name, m in model.named_modules() if m is output), None)


def _inside(name, owners):
    return any(name == owner or name.startswith(owner + ".") for owner in owners)


def _all_linear(model, named, saved, task_type):
    output = _output_layer_name(model, task_type)
    targets = [name for name, m in named.items()
               if _is_linear(m) and name != output and not _inside(name, saved)]
    if not targets:
        raise ValueError(f"target_modules='all-linear' found no linear module besides the output "
                         f"layer ({output}) and modules_to_save {saved}")
    return targets


def _select_saved(named, modules_to_save, task_type, from_config):
    saved = []
    if modules_to_save is not None:
        saved, unmatched = _select(named, modules_to_save, "modules_to_save")
        if unmatched:
            owners = [name for name, m in named.items()
                      if next(m.parameters(recurse=False), None) is not None]
            raise ValueError(f"modules_to_save {unmatched} matched no module of the model; "
                             f"its modules with parameters are {_listing(owners)}")
        if from_config and not isinstance(modules_to_save, str):
            _check_peft_suffixes(named, modules_to_save, saved)
    heads = _TASK_HEADS.get(task_type, ())
    saved += [name for name in named
              if name not in saved and any(_matches(name, head) for head in heads)]
    return saved


def _check_peft_suffixes(named, entries, saved):
    """PEFT matches modules_to_save by plain suffix ("head" saves "lm_head" too):
    refuse a config whose entries PEFT would read as more modules."""
    extra = [name for name in named
             if name not in saved and any(name.endswith(entry) for entry in entries)]
    if extra:
        raise ValueError(f"modules_to_save {sorted(entries)}: PEFT matches these by plain suffix "
                         f"and would also save {extra}; give whole names or '.'-suffixes that "
                         f"select the same modules both ways")


def _select_targets(model, named, target_modules, exclude_modules, saved, task_type):
    if target_modules is None:
        raise ValueError("target_modules is required: module names, suffixes, a regex or "
                         "'all-linear'")
    linear_names = [name for name, module in named.items() if _is_linear(module)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        targets = _all_linear(model, named, saved, task_type)
    else:
        targets, unmatched = _select(named, target_modules, "target_modules")
        if unmatched:
            raise ValueError(f"target_modules {sorted(unmatched)} matched no module of the "
                             f"model; its linear modules are {_listing(linear_names)}")
    if exclude_modules is not None:
        excluded, unmatched = _select(named, exclude_modules, "exclude_modules")
        if unmatched:
            raise ValueError(f"exclude_modules {sorted(unmatched)} matched no module of the "
                             f"model; its linear modules are {_listing(linear_names)}")
        targets = [name for name in targets if name not in excluded]
        if not targets:
            raise ValueError(f"exclude_modules {exclude_modules!r} excludes every target of "
                             f"target_modules {target_modules!r}")
    for name in targets:
        module = named[name]
        if isinstance(module, LoRALayer):
            raise ValueError(f"target module {name!r} is already a {type(module).__name__}")
        if not _is_target_kind(module):
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; LoRA "
                             f"targets must be nn.Linear, transformers Conv1D or nn.Embedding "
                             f"(linear modules: {_listing(linear_names)})")
    for target in targets:
        for save in saved:
            if _inside(target, [save]) or save.startswith(target + "."):
                raise ValueError(f"module {target!r} is both a LoRA target and (in) "
                                 f"modules_to_save {save!r}; choose one")
    return targets


def _ranks_and_alphas(targets, r, alpha, rank_pattern, alpha_pattern):
    """{target: (r, alpha)}; every pattern key must match a target."""
    for what, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unused = [key for key in pattern if not any(re.match(rf"(.*\.)?({key})$", name)
                                                    for name in targets)]
        if unused:
            raise ValueError(f"{what} keys {unused} match no target module (targets: "
                             f"{_listing(targets)})")
    return {name: (_pattern_value(rank_pattern, name, r),
                   _pattern_value(alpha_pattern, name, alpha))
            for name in targets}


def _inject(model, target_modules, r, alpha, dropout, modules_to_save, use_rslora, init,
            adapter_dtype, rank_pattern, alpha_pattern, exclude_modules, bias, fan_in_fan_out,
            inference_mode, task_type, from_config):
    if _is_target_kind(model) or isinstance(model, LoRALayer):
        raise ValueError(f"inject_lora replaces submodules of the model, but the model is a "
                         f"{type(model).__name__} itself; use LoRALinear.from_linear or "
                         f"LoRAEmbedding.from_embedding")
    _check_peft_settings(bias, fan_in_fan_out, inference_mode, task_type)
    _check_lora_args(r, alpha, dropout, init, adapter_dtype)
    rank_pattern = _check_pattern(rank_pattern, "rank_pattern",
                                  lambda v: _check_lora_args(v, alpha, dropout, init, None))
    alpha_pattern = _check_pattern(alpha_pattern, "alpha_pattern",
                                   lambda v: _check_lora_args(r, v, dropout, init, None))
    named = {name: module for name, module in model.named_modules() if name}
    saved = _select_saved(named, modules_to_save, task_type, from_config)
    targets = _select_targets(model, named, target_modules, exclude_modules, saved, task_type)
    settings = _ranks_and_alphas(targets, r, alpha, rank_pattern, alpha_pattern)

    # every argument and target is checked before any module is touched
    for name in targets:
        try:
            (embedding_layout if _is_embedding(named[name]) else base_layout)(named[name])
        except TypeError as err:
            raise TypeError(f"target module {name!r}: {err}") from None
    new_layers = {name: _lora_layer(named[name], settings[name], dropout, use_rslora, init,
                                    adapter_dtype)
                  for name in targets}
    for name, layer in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)

    for param in model.parameters():
        param.requires_grad_(False)
    frozen = {id(layer) for layer in new_layers.values()} if inference_mode else set()
    for module in model.modules():
        if isinstance(module, LoRALayer) and id(module) not in frozen:
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    if not inference_mode:
        for name in saved:
            for param in model.get_submodule(name).parameters():
                param.requires_grad_(True)
    return model


def _lora_layer(module, rank_and_alpha, dropout, use_rslora, init, adapter_dtype):
    """The LoRA layer around ``module``. Embeddings take PEFT's embedding adapter: no
    dropout, A zeros and B normal whatever ``init`` says."""
    r, alpha = rank_and_alpha
    if _is_embedding(module):
        return LoRAEmbedding.from_embedding(module, r=r, alpha=alpha, use_rslora=use_rslora,
                                            adapter_dtype=adapter_dtype)
    return LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout,
                                  use_rslora=use_rslora, init=init, adapter_dtype=adapter_dtype)


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


def format_lora_report(model):
    """One line per parameter (name, trainable 1/0, elements), then
    ``Total parameters: N, trainable: T (P%)``, as a string."""
    rows = [(name, int(param.requires_grad), param.numel())
            for name, param in model.named_parameters()]
    width = max((len(name) for name, _, _ in rows), default=0)
    lines = [f"{name:<{width}}  {flag}  {numel}" for name, flag, numel in rows]
    total, trainable = count_parameters(model)
    lines.append(f"Total parameters: {total}, trainable: {trainable} "
                 f"({_percent(trainable, total):.4f}%)")
    return "\n".join(lines)


def lora_report(model):
    """Prints ``format_lora_report(model)``. Returns None, so that a REPL or a
    notebook shows the report once; ``format_lora_report`` gives the text."""
    print(format_lora_report(model))


def _lora_layers(model):
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no LoRA layers "
                         f"(LoRALinear, LoRAEmbedding); call inject_lora first")
    return layers


def _merge_all(model, sign):
    layers = _lora_layers(model)
    wrong = [name or "<root>" for name, layer in layers if layer.merged == (sign > 0)]
    if wrong:
        state = "already merged" if sign > 0 else "not merged"
        raise RuntimeError(f"{len(wrong)} LoRA layers are {state}: {wrong}; "
                           f"nothing was changed")
    _check_untied(model, layers)
    # every layer is checked before any weight is written
    for _, layer in layers:
        layer._check_delta(sign, layer._delta_scale(sign))
    for _, layer in layers:
        layer._apply_delta(sign, check=False)
    return model


def _check_untied(model, layers):
    """ValueError if a LoRA layer's base weight is also a parameter of another module
    (tied input and output embeddings): merging would change that module too."""
    owners = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, layer in layers:
        others = [o for o in owners.get(id(layer.weight), [])
                  if o.rsplit(".", 1)[0] != name]
        if others:
            raise ValueError(f"the base weight of LoRA layer '{name}' is tied to {others}: "
                             f"merging its adapter would change those modules too; nothing "
                             f"was changed (untie the weights first, e.g. "
                             f"tie_word_embeddings=False)")


def merge_lora(model):
    """Merge every LoRA layer (``LoRALinear``, ``LoRAEmbedding``) of the model (all or
    none). Returns the model."""
    return _merge_all(model, +1.0)


def unmerge_lora(model):
    """Unmerge every LoRA layer of the model (all or none). Returns the model."""
    return _merge_all(model, -1.0)
