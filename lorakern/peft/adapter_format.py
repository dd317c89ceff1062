"""PEFT's adapter files: their names and the state-dict keys of a LoRA adapter.

An adapter directory holds ``adapter_config.json`` (the ``LoraConfig`` fields)
and ``adapter_model.safetensors`` (or an older ``adapter_model.bin``); the keys
are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` for a linear
layer and ``base_model.model.<module>.lora_embedding_A`` / ``_B`` for an
embedding, the adapter name stripped. ``save.py`` writes them, ``load.py``
reads them.

A weights file that lorakern writes also records, in its safetensors metadata,
the layer settings of the config written with it (``settings_record``): a config
beside it that disagrees comes from another save. PEFT reads only the
metadata's "format" entry and ignores this one.

PEFT's Embedding looks up ``lora_embedding_A`` with the base embedding's
``max_norm``, renormalising A's columns in place; LoRAEmbedding does not
(``max_norm_problem``), so such adapters are neither saved nor loaded.
"""
import json

from ..layers.embedding import LoRAEmbedding


CONFIG_NAME = "adapter_config.json"

WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT's key prefix for a LoRA model (PeftModel.base_model is the LoraModel,
# whose .model is the wrapped transformers model); the adapter name is stripped
PREFIX = "base_model.model."

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"

# a DoRA linear layer's magnitude m (out,): PEFT's lora_magnitude_vector, saved as
# '<module>.lora_magnitude_vector' (the adapter name and '.weight' stripped)
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"

# an embedding's adapter: PEFT keeps A and B as Parameters, not as nn.Linear modules
EMBEDDING_A_SUFFIX, EMBEDDING_B_SUFFIX = ".lora_embedding_A", ".lora_embedding_B"


def adapter_keys(name, layer):
    """The state-dict keys PEFT gives this layer's A and B."""
    if isinstance(layer, LoRAEmbedding):
        return PREFIX + name + EMBEDDING_A_SUFFIX, PREFIX + name + EMBEDDING_B_SUFFIX
    return PREFIX + name + A_SUFFIX, PREFIX + name + B_SUFFIX


# the safetensors metadata entry holding the layer settings of the config saved
# with the weights (JSON)
SETTINGS_METADATA_KEY = "lorakern_layer_settings"

# the LoraConfig fields that load_adapter builds the layers from (ranks, scales,
# dropout), with PEFT's defaults for a field that is missing or null
LAYER_SETTINGS = {"r": 8, "lora_alpha": 8, "rank_pattern": {}, "alpha_pattern": {},
                  "use_rslora": False, "lora_dropout": 0.0}


def layer_settings(config):
    """{field: value} of the config's LAYER_SETTINGS, PEFT's default where missing or null."""
    return {field: default if config.get(field) is None else config[field]
            for field, default in LAYER_SETTINGS.items()}


def settings_record(config):
    """The metadata value that records the config's layer settings beside the weights."""
    return json.dumps(layer_settings(config), sort_keys=True)


def max_norm_problem(embedding):
    """Why PEFT would compute something else than LoRAEmbedding on this embedding
    (text after the module's name), or None."""
    max_norm = getattr(embedding, "max_norm", None)
    if max_norm is None:
        return None
    return (f"its base embedding sets max_norm={max_norm}: PEFT's Embedding looks up "
            f"lora_embedding_A with it too, renormalising A's columns in place, which "
            f"LoRAEmbedding does not (patch_peft refuses such layers too)")
