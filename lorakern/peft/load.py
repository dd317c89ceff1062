"""``load_adapter``: a PEFT LoRA adapter injected into a base model as lorakern layers.

The config is read and checked (malformed values, settings lorakern cannot
reproduce, a config from another save than the weights'), the tensors are split
into adapters and whole modules and checked against the model's modules, shapes
and devices (no meta tensors), all before the model changes; then
``inject_lora`` builds the layers and the tensors are copied in.
"""
import json
import math
import os
import re

import torch
from torch import nn

from ..layers.adapter import LoRALayer, check_lora_args
from ..layers.embedding import embedding_layout
from ..layers.linear import LoRALinear, base_layout, conv1d_class
from ..layers.quantized_linear import check_bnb_linear, is_bnb_linear
from ..models.config import pattern_value, peft_acts_on
from ..models.inject import inject_lora
from ..models.targets import exact_regex
from .adapter_format import (A_SUFFIX, B_SUFFIX, CONFIG_NAME, EMBEDDING_A_SUFFIX,
                             EMBEDDING_B_SUFFIX, LAYER_SETTINGS, MAGNITUDE_SUFFIX, PREFIX,
                             SETTINGS_METADATA_KEY, WEIGHTS_NAME, layer_settings,
                             max_norm_problem)


def _is_linear_like(module):
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


# LoraConfig fields that change what a layer computes or which tensors exist:
# none of them has a LoRALinear equivalent
_UNSUPPORTED_FIELDS = ("lora_bias", "alora_invocation_tokens", "velora_config",
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


def _recorded_settings(path):
    """The layer settings recorded in the safetensors metadata by save_adapter, or None
    for weights written without them (by PEFT, or as adapter_model.bin)."""
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_file):
        return None
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(weights_file, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"load_adapter: '{weights_file}' is not a readable safetensors "
                         f"file (corrupt or truncated?): {err}") from err
    if SETTINGS_METADATA_KEY not in metadata:
        return None
    try:
        recorded = json.loads(metadata[SETTINGS_METADATA_KEY])
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"load_adapter: '{weights_file}' has a malformed "
                         f"{SETTINGS_METADATA_KEY!r} metadata entry: "
                         f"{metadata[SETTINGS_METADATA_KEY]!r} (a JSON object of layer settings)")
    return recorded


def _check_same_save(config, path):
    """ValueError if the weights were saved with other layer settings than the config
    beside them holds: the two files come from different saves, and the config would
    give the weights another scale or rank."""
    recorded = _recorded_settings(path)
    if recorded is None:
        return
    current = layer_settings(config)
    differing = [f"{field}: {current[field]!r} in {CONFIG_NAME}, {recorded.get(field)!r} in "
                 f"{WEIGHTS_NAME}" for field in LAYER_SETTINGS
                 if current[field] != recorded.get(field)]
    if differing:
        raise ValueError(f"load_adapter: '{path}': {CONFIG_NAME} and {WEIGHTS_NAME} come from "
                         f"different saves: the weights were saved with other layer settings "
                         f"than the config holds ({'; '.join(differing)}). A save_adapter "
                         f"killed between its two renames leaves such a pair (new weights, old "
                         f"config), as does replacing or editing one of the files; save the "
                         f"adapter again")


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
        # falsy is not off: PEFT turns velora_config={} into a VeloraConfig
        if peft_acts_on(field, config.get(field)):
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
        if name.endswith(A_SUFFIX):
            adapters.setdefault(name[:-len(A_SUFFIX)], {})["A"] = t
        elif name.endswith(B_SUFFIX):
            adapters.setdefault(name[:-len(B_SUFFIX)], {})["B"] = t
        elif name.endswith(EMBEDDING_A_SUFFIX):
            adapters.setdefault(name[:-len(EMBEDDING_A_SUFFIX)], {"embedding": True})["A"] = t
        elif name.endswith(EMBEDDING_B_SUFFIX):
            adapters.setdefault(name[:-len(EMBEDDING_B_SUFFIX)], {"embedding": True})["B"] = t
        elif name.endswith(MAGNITUDE_SUFFIX):
            adapters.setdefault(name[:-len(MAGNITUDE_SUFFIX)], {})["m"] = t
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
        expected_r = pattern_value(config.get("rank_pattern"), name, r_default)
        if r != expected_r:
            problems.append(f"'{name}': lora_A has rank {r}, the config says r={expected_r}")
            continue
        settings[name] = (r, pattern_value(config.get("alpha_pattern"), name, alpha_default))
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
        problem = max_norm_problem(module)
        if problem:
            return f": {problem}"
        in_features, out_features = module.weight.shape
    else:
        if not _is_linear_like(module) or isinstance(module, LoRALayer):
            return (f" is a {type(module).__name__}, not an nn.Linear or Conv1D without an "
                    f"adapter")
        try:
            if is_bnb_linear(module):  # QLoRA: the quantised base is read as it is
                check_bnb_linear(module, name)
                in_features, out_features = module.in_features, module.out_features
            else:
                in_features, out_features, _ = base_layout(module)
        except (TypeError, ValueError) as err:
            return f": {err}"
    a, b = pair.get("A"), pair.get("B")
    magnitude_problem = _magnitude_problem(pair, out_features)
    if magnitude_problem:
        return magnitude_problem
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        return (f": lora_A {None if a is None else tuple(a.shape)} and lora_B "
                f"{None if b is None else tuple(b.shape)} are not a LoRA pair of a linear layer")
    if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
        return f": lora_A ({a.dtype}) and lora_B ({b.dtype}) must be floating point"
    if a.shape[1] != in_features or b.shape[0] != out_features:
        return (f": lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit its "
                f"{in_features} inputs and {out_features} outputs")
    return None


def _magnitude_problem(pair, out_features):
    """Why the pair's DoRA magnitude (or its absence) does not fit, or None."""
    m, use_dora = pair.get("m"), pair.get("use_dora", False)
    if m is None:
        return (": the config says use_dora=True but the adapter holds no "
                "lora_magnitude_vector for it") if use_dora else None
    if pair.get("embedding"):
        return ": DoRA on an embedding, which lorakern does not reproduce"
    if not use_dora:
        return ": a DoRA lora_magnitude_vector, but the config does not set use_dora"
    if tuple(m.shape) != (out_features,) or not m.dtype.is_floating_point:
        return (f": lora_magnitude_vector {tuple(m.shape)} {m.dtype} is not a float "
                f"vector of its {out_features} outputs")
    return None


def _check_injection_args(settings, dropout, adapter_dtype, path):
    """inject_lora's argument checks, run before anything is changed."""
    for r, alpha in sorted(set(settings.values())):
        try:
            check_lora_args(r, alpha, dropout, "kaiming", adapter_dtype)
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


_SHOWN = 8  # tensors listed in one error message


def _check_not_on_meta(model, settings, others, path):
    """ValueError naming the model's tensors on the meta device that loading would
    write into (or, for an adapted layer's weight, put the new adapters beside):
    a meta tensor has no storage, so copied values would be silently dropped.

    Refused rather than served by assigning real tensors: the model would mix meta
    base weights with real adapters, and the usual next step, ``to_empty()``,
    replaces every tensor, the loaded adapters included, with uninitialised memory.
    """
    state = model.state_dict()
    on_meta = [f"{name}.weight" for name in settings
               if model.get_submodule(name).weight.is_meta]
    on_meta += [name for name in others if name in state and state[name].is_meta]
    if on_meta:
        listed = ", ".join(f"'{n}'" for n in on_meta[:_SHOWN])
        if len(on_meta) > _SHOWN:
            listed += f", ... ({len(on_meta)} in all)"
        raise ValueError(f"load_adapter: '{path}' would go into tensors of this "
                         f"{type(model).__name__} on the meta device (shapes without storage: "
                         f"the loaded values would be lost): {listed}. Materialise the model "
                         f"first, e.g. model.to_empty(device=...) and load its base weights "
                         f"(load_state_dict), or build it with from_pretrained; then "
                         f"load_adapter")


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
    holds in another shape. Called again after injection: a saved module may then
    hold its own copy of a parameter it shared (a tied lm_head)."""
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
    ``use_rslora``, ``lora_dropout``, ``use_dora`` (``DoRALinear``, its
    ``lora_magnitude_vector`` loaded) and ``modules_to_save``; A and B are
    loaded, and the tensors of ``modules_to_save`` (and any other base tensors
    the adapter carries, e.g. resized embeddings) are copied into the model.

    Raises ValueError, before the model is changed in any way, naming what it
    cannot reproduce: non-LORA ``peft_type``, ``bias`` other than "none",
    DoRA on embeddings, ``lora_bias`` and other LoRA variants, LoRA on layers other
    than Linear, Conv1D and Embedding; invalid config values (``r``, ``lora_alpha``,
    ``lora_dropout``, patterns, ``modules_to_save``); tensors that do not fit
    the model; a config file that is not a JSON object, or a weights file that
    cannot be read (both named by path); an embedding whose base sets
    ``max_norm`` (PEFT renormalises ``lora_embedding_A`` with it, LoRAEmbedding
    does not); a config whose layer settings (``r``, ``lora_alpha``, the
    patterns, ``use_rslora``, ``lora_dropout``) differ from those that
    ``save_adapter`` recorded in the weights file (the files come from
    different saves, e.g. a save killed between its two renames; weights
    written by PEFT carry no record and are not compared); a model whose tensors
    that the adapter goes into are on the meta device (materialise it first,
    e.g. ``to_empty`` and its base weights, then load the adapter).

    Returns:
        ``model``, in place.
    """
    config, state = _read_adapter(path)
    _check_config(config, path)
    _check_same_save(config, path)
    adapters, others = _split_state(state, path)
    if not adapters:
        raise ValueError(f"load_adapter: '{path}' holds no lora_A/lora_B weights")
    others = _unwrap_base_layers(others, adapters)
    if _is_linear_like(model) or isinstance(model, LoRALinear):
        raise ValueError(f"load_adapter: the model is a {type(model).__name__} itself; give the "
                         f"model that holds the adapted layers")
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_dora = bool(config.get("use_dora", False))
    for pair in adapters.values():
        pair["use_dora"] = use_dora and not pair.get("embedding")
    settings = _layer_settings(model, adapters, config, path)
    _check_injection_args(settings, dropout, adapter_dtype, path)
    saved = _saved_module_names(model, config, settings, path)
    _check_not_on_meta(model, settings, others, path)
    _base_tensors(model, others, path)  # checked here, looked up after injection

    # everything is checked: from here on the model changes. One inject_lora per
    # (r, alpha): rank_pattern / alpha_pattern give several (inject_lora keeps the
    # adapters of earlier calls trainable)
    groups = {}
    for name, value in settings.items():
        groups.setdefault(value, []).append(name)
    for (r, alpha), group in groups.items():
        inject_lora(model, exact_regex(group), r=r, alpha=alpha, dropout=dropout,
                    modules_to_save=exact_regex(saved) if saved else None,
                    use_rslora=use_rslora, adapter_dtype=adapter_dtype, use_dora=use_dora)
    with torch.no_grad():
        for name, pair in adapters.items():
            layer = model.get_submodule(name)
            layer.lora_A.copy_(pair["A"])
            layer.lora_B.copy_(pair["B"])
            if "m" in pair:
                layer.lora_magnitude.copy_(pair["m"])
        # looked up now: injection gives a saved module its own copy of a tied parameter
        # (the tied module keeps the original), and the copy is what the adapter trained
        for name, tensor in _base_tensors(model, others, path).items():
            tensor.copy_(others[name])
    return model
