"""PEFT's ``LoraConfig`` read as ``inject_lora``'s settings.

The config's field names and their lorakern equivalents (``lora_alpha`` is
``alpha``, ``init_lora_weights`` is ``init``, ...), the fields that change
nothing lorakern builds, which values of the other fields PEFT acts on
(``peft_acts_on``: ``layers_to_transform=0`` does, ``velora_config={}`` does),
the task types and the classification heads their PeftModel saves whole (by
plain name suffix), and PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup.
Nothing here touches a model: ``inject.py`` and the adapter-file reader
(``lorakern/peft/load.py``) apply what this module reads.
"""
import dataclasses
import enum
import re
from collections.abc import Mapping


ALL_LINEAR = "all-linear"

# LoraConfig fields read as inject_lora's arguments (PEFT name -> argument)
CONFIG_ARGUMENTS = {"target_modules": "target_modules", "r": "r", "lora_alpha": "alpha",
                     "lora_dropout": "dropout", "modules_to_save": "modules_to_save",
                     "use_rslora": "use_rslora", "init_lora_weights": "init",
                     "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
                     "exclude_modules": "exclude_modules", "bias": "bias",
                     "fan_in_fan_out": "fan_in_fan_out", "inference_mode": "inference_mode",
                     "task_type": "task_type", "use_dora": "use_dora"}

# LoraConfig fields that change nothing inject_lora builds: bookkeeping, or settings
# read only when a refused feature is on (megatron_core, qalora_group_size)
CONFIG_BOOKKEEPING = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                       "revision", "runtime_config", "megatron_core", "qalora_group_size")

# task types whose PeftModel saves a classification head whole (matched as PEFT
# does, by plain suffix; names the model lacks are skipped)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}

SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's order for the all-linear exclusion

# LoraConfig fields that PEFT acts on whenever they are not None, falsy or not: a sub-config
# given as {} becomes a config object and selects its LoRA variant, and PEFT tests the
# token lists with `is not None` (trainable_token_indices=[] still wraps the embedding)
ON_UNLESS_NONE = ("trainable_token_indices", "alora_invocation_tokens", "velora_config",
                  "monteclora_config", "kasa_config", "arrow_config", "use_bdlora")

PLAIN_TASKS = (None, "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")

ALIASES = (("alpha", "lora_alpha"), ("dropout", "lora_dropout"), ("init", "init_lora_weights"))


def is_config(value):
    return isinstance(value, Mapping) or (dataclasses.is_dataclass(value)
                                          and not isinstance(value, type))


def _plain(value):
    """An enum member (PEFT's TaskType, PeftType) as its value."""
    return value.value if isinstance(value, enum.Enum) else value


def peft_acts_on(name, value):
    """Whether PEFT acts on the LoraConfig field ``name`` set to ``value``: None never is;
    ``layers_to_transform`` is unless it is an empty list (0 selects layer 0, and an empty
    tuple selects no layer at all); the ON_UNLESS_NONE fields always are; any other field
    is when it is truthy, as PEFT tests it (``if config.use_dora:``)."""
    if value is None:
        return False
    if name == "layers_to_transform":
        return not (isinstance(value, list) and not value)
    if name in ON_UNLESS_NONE:
        return True
    return bool(value)


def init_from_peft(init_lora_weights):
    """PEFT's init_lora_weights as LoRALinear's init."""
    if init_lora_weights is True:
        return "kaiming"
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
        return "gaussian"
    raise ValueError(f"init_lora_weights={init_lora_weights!r} has no LoRALinear equivalent: "
                     f"True (kaiming-uniform A) and 'gaussian' are supported; False (a random, "
                     f"non-zero B) and the data-driven initialisations are not")


def config_settings(config):
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
        if name in CONFIG_ARGUMENTS:
            if value is not None:
                settings[CONFIG_ARGUMENTS[name]] = value
        elif name not in CONFIG_BOOKKEEPING and peft_acts_on(name, value):
            refused.append(f"{name}={value!r}")
    if refused:
        raise ValueError(f"inject_lora: the config sets what lorakern's LoRALinear cannot "
                         f"reproduce: {'; '.join(refused)}")
    if "init" in settings:
        settings["init"] = init_from_peft(settings["init"])
    settings["from_config"] = True
    return settings


def check_peft_settings(bias, fan_in_fan_out, inference_mode, task_type):
    if bias != "none":
        raise ValueError(f"bias={bias!r}: only 'none' is supported (LoRALinear keeps the base "
                         f"bias frozen)")
    for name, value in (("fan_in_fan_out", fan_in_fan_out), ("inference_mode", inference_mode)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {name}={value!r}")
    if task_type not in PLAIN_TASKS and task_type not in TASK_HEADS:
        raise ValueError(f"task_type={task_type!r} is not a PEFT task type lorakern knows: "
                         f"{[t for t in PLAIN_TASKS if t] + list(TASK_HEADS)}")


def check_pattern(pattern, what, check_value):
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


def pattern_key_matches(key, name):
    """Whether a rank_pattern/alpha_pattern key matches the end of ``name`` on a '.'
    boundary, as PEFT matches it."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_value(pattern, name, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches
    (``pattern_key_matches``). ``pattern`` may be None (no overrides)."""
    for key, value in (pattern or {}).items():
        if pattern_key_matches(key, name):
            return value
    return default
