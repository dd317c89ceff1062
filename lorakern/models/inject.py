"""``inject_lora``: put LoRA layers into an existing model in place, PEFT-style.

The matching ``nn.Linear`` (and transformers ``Conv1D``) modules become
``LoRALinear``, the matching ``nn.Embedding`` modules ``LoRAEmbedding``;
everything but the adapters and the ``modules_to_save`` is frozen. A saved
module gets its own copy of any parameter it shares with a module outside it
(an ``lm_head`` tied to the input embedding), as PEFT's ``ModulesToSaveWrapper``
trains a copy. Settings come as keywords or as a ``peft.LoraConfig`` (read by
``config.py``); names match as in PEFT (``targets.py``). Every argument and
target is checked before any module is touched, and a failure while the model
is changed (an allocation on the tenth layer) undoes what was done
(``_Undo``): a refused call leaves the model as it was.
"""
import copy
import re

from torch.nn.utils import parametrize

from ..layers.adapter import LoRALayer, check_lora_args
from ..layers.embedding import LoRAEmbedding, embedding_layout
from ..layers.linear import LoRALinear, base_layout
from ..layers.quantized_linear import QuantizedLoRALinear, check_bnb_linear, is_bnb_linear
from .config import (ALIASES, ALL_LINEAR, CONFIG_ARGUMENTS, SEQ_CLS_HEADS, TASK_HEADS,
                     check_pattern, check_peft_settings, config_settings, init_from_peft,
                     is_config, pattern_key_matches, pattern_value)
from .targets import inside, is_embedding, is_linear, is_target_kind, listing, select


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
                exclude_modules=None, bias=_Default("none"), fan_in_fan_out=_Default(None),
                use_dora=_Default(False)):
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
            full (a classifier head); their parameters are unfrozen in place,
            except one shared with a module outside (a tied ``lm_head``): the
            saved module gets its own trainable copy of it and the other
            module keeps the original, frozen, as PEFT does.
        config: a ``peft.LoraConfig``, or its dict (the contents of an
            ``adapter_config.json``), read as ``get_peft_model`` reads it.
            Fields with no ``LoRALinear`` equivalent (``lora_bias``, ``layers_to_transform``, ``target_parameters``, ...)
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
        use_dora: PEFT's DoRA on the linear targets (``DoRALinear``), as a keyword or
            the config's field; an embedding target with it is refused by name.
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
        fan_in_fan_out=fan_in_fan_out, use_dora=use_dora)
    from_config = config_settings(config) if config is not None else {}
    settings = _merge_settings(from_config, keywords, spelled)
    return _inject(model, **settings)


_DEFAULTS = {"target_modules": None, "r": 8, "alpha": 16, "dropout": 0.0,
             "modules_to_save": None, "use_rslora": False, "init": "kaiming",
             "adapter_dtype": None, "rank_pattern": None, "alpha_pattern": None,
             "exclude_modules": None, "bias": "none", "fan_in_fan_out": None,
             "inference_mode": False, "task_type": None, "from_config": False,
             "use_dora": False}


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
    # PEFT's task models match their heads by plain suffix: "classifier" saves
    # DistilBERT's "pre_classifier" too
    heads = TASK_HEADS.get(task_type, ())
    saved += [name for name in named
              if name not in saved and any(name.endswith(head) for head in heads)]
    return saved


def _heads_peft_would_adapt(named, task_type, output, excluded):
    """The linear modules that "all-linear" and a task model's heads both claim in PEFT:
    saved whole for ending with a head's name ("pre_classifier"), yet adapted, since
    PEFT keeps out of the targets only the modules with the head as a whole component."""
    heads = TASK_HEADS.get(task_type, ())
    return [name for name, module in named.items()
            if is_linear(module) and name != output and name not in excluded
            and any(name.endswith(head) for head in heads)
            and not any(re.match(rf"(^|.*\.){head}($|\..*)", name) for head in heads)]


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
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if all_linear:
        targets = _all_linear(model, named, saved, task_type)
    else:
        targets, unmatched = select(named, target_modules, "target_modules")
        if unmatched:
            raise ValueError(f"target_modules {sorted(unmatched)} matched no module of the "
                             f"model; its linear modules are {listing(linear_names)}")
    excluded = []
    if exclude_modules is not None:
        excluded, unmatched = select(named, exclude_modules, "exclude_modules")
        if unmatched:
            raise ValueError(f"exclude_modules {sorted(unmatched)} matched no module of the "
                             f"model; its linear modules are {listing(linear_names)}")
        targets = [name for name in targets if name not in excluded]
        if not targets:
            raise ValueError(f"exclude_modules {exclude_modules!r} excludes every target of "
                             f"target_modules {target_modules!r}")
    if all_linear:
        _check_heads_not_claimed_twice(model, named, task_type, excluded)
    for name in targets:
        module = named[name]
        parent = named.get(name.rpartition(".")[0])
        if isinstance(module, (LoRALayer, QuantizedLoRALinear)) or isinstance(
                parent, QuantizedLoRALinear):
            owner = module if isinstance(module, (LoRALayer, QuantizedLoRALinear)) else parent
            raise ValueError(f"target module {name!r} is already a {type(owner).__name__}"
                             + ("'s base layer" if owner is parent else ""))
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


def _check_heads_not_claimed_twice(model, named, task_type, excluded):
    claimed = _heads_peft_would_adapt(named, task_type, _output_layer_name(model, task_type),
                                      excluded)
    if claimed:
        raise ValueError(
            f"task_type={task_type!r} saves {claimed} whole (PEFT's task model matches the heads "
            f"{list(TASK_HEADS[task_type])} by plain suffix) and target_modules='all-linear' "
            f"also selects them: PEFT would put a LoRA layer inside the saved module (and then "
            f"refuses it), which lorakern does not build; add exclude_modules={claimed} to "
            f"train them whole, as PEFT and lorakern then both do")


def _check_replaceable(named, targets):
    """TypeError naming the first target that a LoRA layer cannot wrap as it is."""
    for name in targets:
        module = named[name]
        if parametrize.is_parametrized(module):
            # the weight is recomputed from other tensors on every access: a LoRA layer
            # would hold one computed value, frozen, and its parametrization would be lost
            raise TypeError(f"target module {name!r} is parametrized (torch.nn.utils."
                            f"parametrize: {', '.join(module.parametrizations)}); LoRA layers "
                            f"wrap a plain weight Parameter: remove the parametrization first "
                            f"(torch.nn.utils.parametrize.remove_parametrizations)")
        if is_bnb_linear(module):  # QLoRA: ValueError naming it if unreadable
            check_bnb_linear(module, name)
            continue
        try:
            (embedding_layout if is_embedding(module) else base_layout)(module)
        except TypeError as err:
            raise TypeError(f"target module {name!r}: {err}") from None


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
            inference_mode, task_type, from_config, use_dora):
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
    _check_replaceable(named, targets)
    use_dora = bool(use_dora)
    _check_dora_targets(named, targets, use_dora)
    undo = _Undo(model)
    try:
        new_layers = {name: _lora_layer(named[name], settings[name], dropout, use_rslora, init,
                                        adapter_dtype, use_dora, name)
                      for name in targets}
        for name, layer in new_layers.items():
            parent_name, _, child = name.rpartition(".")
            undo.set_module(model.get_submodule(parent_name) if parent_name else model, child,
                            layer)
        for name in saved:
            _untie_saved_module(model, name, undo)
        _set_trainable(model, new_layers.values(), saved, inference_mode)
    except BaseException:
        undo.restore()
        raise
    return model


class _Undo:
    """What inject_lora changes in a model, recorded as it goes: the requires_grad flag
    of every parameter (LoRA layers freeze their base on construction), and each module
    and parameter replaced. ``restore`` puts all of it back."""

    def __init__(self, model):
        self._flags = [(param, param.requires_grad) for param in model.parameters()]
        self._replaced = []

    def set_module(self, parent, name, module):
        self._replaced.append((parent, name, getattr(parent, name)))
        setattr(parent, name, module)

    def set_parameter(self, module, name, param):
        self._replaced.append((module, name, module._parameters[name]))
        setattr(module, name, param)

    def restore(self):
        for owner, name, old in reversed(self._replaced):
            setattr(owner, name, old)
        for param, requires_grad in self._flags:
            param.requires_grad_(requires_grad)


def _own_copy(param):
    """A new Parameter with the values, class and flags of ``param``."""
    return copy.deepcopy(param)


def _untie_saved_module(model, name, undo):
    """Give the saved module ``name`` its own copy of every parameter that a module outside
    it shares (PEFT trains a deepcopy of a saved module: the other module keeps the
    original, frozen). Sharing inside the module is kept, as a deepcopy keeps it."""
    owners = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(param_name.rpartition(".")[0])
    saved = model.get_submodule(name)
    for param in list(saved.parameters()):
        if all(inside(owner, [name]) for owner in owners[id(param)]):
            continue
        own = _own_copy(param)
        for module in saved.modules():
            for attr, held in list(module._parameters.items()):
                if held is param:
                    undo.set_parameter(module, attr, own)


def _set_trainable(model, new_layers, saved, inference_mode):
    """Everything frozen but the adapters (the new ones only when not inference_mode) and,
    unless inference_mode, the saved modules."""
    for param in model.parameters():
        param.requires_grad_(False)
    frozen = {id(layer) for layer in new_layers} if inference_mode else set()
    for module in model.modules():
        if isinstance(module, (LoRALayer, QuantizedLoRALinear)) and id(module) not in frozen:
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if getattr(module, "use_dora", False):
                module.lora_magnitude.requires_grad_(True)
    if not inference_mode:
        for name in saved:
            for param in model.get_submodule(name).parameters():
                param.requires_grad_(True)


def _check_dora_targets(named, targets, use_dora):
    if not use_dora:
        return
    embeddings = [name for name in targets if is_embedding(named[name])]
    if embeddings:
        raise ValueError(f"inject_lora: use_dora=True on embedding targets "
                         f"{sorted(embeddings)}: lorakern's DoRA is for linear layers; "
                         f"exclude them (exclude_modules) or drop use_dora")
    quantised = [name for name in targets if is_bnb_linear(named[name])]
    if quantised:
        raise ValueError(f"inject_lora: use_dora=True on quantised (bitsandbytes) targets "
                         f"{sorted(quantised)}: lorakern's DoRA needs a dense base weight; "
                         f"exclude them (exclude_modules) or drop use_dora")


def _lora_layer(module, rank_and_alpha, dropout, use_rslora, init, adapter_dtype, use_dora,
                name):
    """The LoRA layer around ``module``. Embeddings take PEFT's embedding adapter: no
    dropout, A zeros and B normal whatever ``init`` says."""
    r, alpha = rank_and_alpha
    if is_bnb_linear(module):
        return QuantizedLoRALinear.from_bnb(module, name, r=r, alpha=alpha, dropout=dropout,
                                            use_rslora=use_rslora, init=init,
                                            adapter_dtype=adapter_dtype)
    if is_embedding(module):
        return LoRAEmbedding.from_embedding(module, r=r, alpha=alpha, use_rslora=use_rslora,
                                            adapter_dtype=adapter_dtype)
    return LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout,
                                  use_rslora=use_rslora, init=init, adapter_dtype=adapter_dtype,
                                  use_dora=use_dora)
