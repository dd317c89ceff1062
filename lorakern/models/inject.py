"""``inject_lora``: put LoRA layers into an existing model in place, PEFT-style.

The matching ``nn.Linear`` (and transformers ``Conv1D``) modules become
``LoRALinear``, the matching ``nn.Embedding`` modules ``LoRAEmbedding``;
everything but the adapters and the ``modules_to_save`` is frozen. Settings
come as keywords or as a ``peft.LoraConfig`` (read by ``config.py``); names
match as in PEFT (``targets.py``). Every argument and target is checked
before any module is touched.
"""
from ..layers.adapter import LoRALayer, check_lora_args
from ..layers.embedding import LoRAEmbedding, embedding_layout
from ..layers.linear import LoRALinear, base_layout
from .config import (ALIASES, ALL_LINEAR, CONFIG_ARGUMENTS, SEQ_CLS_HEADS, TASK_HEADS,
                     check_pattern, check_peft_settings, config_settings, init_from_peft,
                     is_config, pattern_key_matches, pattern_value)
from .targets import inside, is_embedding, is_linear, is_target_kind, listing, matches, select


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
            are refused at every value PEFT acts on, falsy ones included
            (``layers_to_transform=0``, ``velora_config={}``). An argument
            given both in the config and as a keyword is refused.
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
    if is_config(target_modules):
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
    from_config = config_settings(config) if config is not None else {}
    settings = _merge_settings(from_config, keywords, spelled)
    return _inject(model, **settings)


_DEFAULTS = {"target_modules": None, "r": 8, "alpha": 16, "dropout": 0.0,
             "modules_to_save": None, "use_rslora": False, "init": "kaiming",
             "adapter_dtype": None, "rank_pattern": None, "alpha_pattern": None,
             "exclude_modules": None, "bias": "none", "fan_in_fan_out": None,
             "inference_mode": False, "task_type": None, "from_config": False}


def _keyword_settings(**arguments):
    """The arguments the caller gave, under lorakern's names; both names of one
    setting (alpha and lora_alpha) are refused."""
    given = {name: _value(value) for name, value in arguments.items()
             if _given(value) and value is not None}
    spelled = {name: f"{name}={value!r}" for name, value in given.items()}
    for ours, peft_name in ALIASES:
        if ours in given and peft_name in given:
            raise ValueError(f"inject_lora got both {spelled[ours]} and {spelled[peft_name]}; "
                             f"give one of them")
        if peft_name in given:
            value = given.pop(peft_name)
            given[ours] = init_from_peft(value) if ours == "init" else value
            spelled[ours] = spelled.pop(peft_name)
    return given, spelled


def _merge_settings(from_config, keywords, spelled):
    both = sorted(set(from_config) & set(keywords))
    if both:
        peft_names = {ours: peft_name for peft_name, ours in CONFIG_ARGUMENTS.items()}
        listed = ", ".join(f"{peft_names[name]}={from_config[name]!r} in the config and "
                           f"{spelled[name]}" for name in both)
        raise ValueError(f"inject_lora: given both in the config and as a keyword: {listed}; "
                         f"give each setting once")
    return {**_DEFAULTS, **from_config, **keywords}


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
        heads = (getattr(model, n, None) for n in SEQ_CLS_HEADS)
        output = next((head for head in heads if head is not None), None)
    return next((name for name, m in model.named_modules() if m is output), None)


def _all_linear(model, named, saved, task_type):
    output = _output_layer_name(model, task_type)
    targets = [name for name, m in named.items()
               if is_linear(m) and name != output and not inside(name, saved)]
    if not targets:
        raise ValueError(f"target_modules='all-linear' found no linear module besides the output "
                         f"layer ({output}) and modules_to_save {saved}")
    return targets


def _select_saved(named, modules_to_save, task_type, from_config):
    saved = []
    if modules_to_save is not None:
        saved, unmatched = select(named, modules_to_save, "modules_to_save")
        if unmatched:
            owners = [name for name, m in named.items()
                      if next(m.parameters(recurse=False), None) is not None]
            raise ValueError(f"modules_to_save {unmatched} matched no module of the model; "
                             f"its modules with parameters are {listing(owners)}")
        if from_config and not isinstance(modules_to_save, str):
            _check_peft_suffixes(named, modules_to_save, saved)
    heads = TASK_HEADS.get(task_type, ())
    saved += [name for name in named
              if name not in saved and any(matches(name, head) for head in heads)]
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
    linear_names = [name for name, module in named.items() if is_linear(module)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        targets = _all_linear(model, named, saved, task_type)
    else:
        targets, unmatched = select(named, target_modules, "target_modules")
        if unmatched:
            raise ValueError(f"target_modules {sorted(unmatched)} matched no module of the "
                             f"model; its linear modules are {listing(linear_names)}")
    if exclude_modules is not None:
        excluded, unmatched = select(named, exclude_modules, "exclude_modules")
        if unmatched:
            raise ValueError(f"exclude_modules {sorted(unmatched)} matched no module of the "
                             f"model; its linear modules are {listing(linear_names)}")
        targets = [name for name in targets if name not in excluded]
        if not targets:
            raise ValueError(f"exclude_modules {exclude_modules!r} excludes every target of "
                             f"target_modules {target_modules!r}")
    for name in targets:
        module = named[name]
        if isinstance(module, LoRALayer):
            raise ValueError(f"target module {name!r} is already a {type(module).__name__}")
        if not is_target_kind(module):
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; LoRA "
                             f"targets must be nn.Linear, transformers Conv1D or nn.Embedding "
                             f"(linear modules: {listing(linear_names)})")
    for target in targets:
        for save in saved:
            if inside(target, [save]) or save.startswith(target + "."):
                raise ValueError(f"module {target!r} is both a LoRA target and (in) "
                                 f"modules_to_save {save!r}; choose one")
    return targets


def _ranks_and_alphas(targets, r, alpha, rank_pattern, alpha_pattern):
    """{target: (r, alpha)}; every pattern key must match a target."""
    for what, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unused = [key for key in pattern
                  if not any(pattern_key_matches(key, name) for name in targets)]
        if unused:
            raise ValueError(f"{what} keys {unused} match no target module (targets: "
                             f"{listing(targets)})")
    return {name: (pattern_value(rank_pattern, name, r),
                   pattern_value(alpha_pattern, name, alpha))
            for name in targets}


def _inject(model, target_modules, r, alpha, dropout, modules_to_save, use_rslora, init,
            adapter_dtype, rank_pattern, alpha_pattern, exclude_modules, bias, fan_in_fan_out,
            inference_mode, task_type, from_config):
    if is_target_kind(model) or isinstance(model, LoRALayer):
        raise ValueError(f"inject_lora replaces submodules of the model, but the model is a "
                         f"{type(model).__name__} itself; use LoRALinear.from_linear or "
                         f"LoRAEmbedding.from_embedding")
    check_peft_settings(bias, fan_in_fan_out, inference_mode, task_type)
    check_lora_args(r, alpha, dropout, init, adapter_dtype)
    rank_pattern = check_pattern(rank_pattern, "rank_pattern",
                                  lambda v: check_lora_args(v, alpha, dropout, init, None))
    alpha_pattern = check_pattern(alpha_pattern, "alpha_pattern",
                                   lambda v: check_lora_args(r, v, dropout, init, None))
    named = {name: module for name, module in model.named_modules() if name}
    saved = _select_saved(named, modules_to_save, task_type, from_config)
    targets = _select_targets(model, named, target_modules, exclude_modules, saved, task_type)
    settings = _ranks_and_alphas(targets, r, alpha, rank_pattern, alpha_pattern)

    # every argument and target is checked before any module is touched
    for name in targets:
        try:
            (embedding_layout if is_embedding(named[name]) else base_layout)(named[name])
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
    if is_embedding(module):
        return LoRAEmbedding.from_embedding(module, r=r, alpha=alpha, use_rslora=use_rslora,
                                            adapter_dtype=adapter_dtype)
    return LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout,
                                  use_rslora=use_rslora, init=init, adapter_dtype=adapter_dtype)
