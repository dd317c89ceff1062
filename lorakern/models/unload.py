"""``unload``: every lorakern layer of a model turned back into the plain module it replaced.

PEFT's ``merge_and_unload()`` (``merge=True``) and ``unload()`` (``merge=False``):
each ``LoRALinear`` becomes an ``nn.Linear`` (a transformers ``Conv1D`` when it
was built from one), each ``LoRAEmbedding`` an ``nn.Embedding`` with its
``padding_idx``, ``max_norm`` and ``norm_type``; the new module holds the
layer's own base Parameters (no copy, requires_grad left as it is: frozen), the
adapters are dropped. Every layer is checked, and every new module built,
before any weight is written or any module replaced.
"""
import warnings

import torch
from torch import nn

from ..layers.adapter import LoRALayer
from ..layers.embedding import LoRAEmbedding
from ..layers.linear import conv1d_class
from .merge import check_deltas, lora_layers


def unload(model, merge=True):
    """Replace every ``LoRALinear`` / ``LoRAEmbedding`` of ``model`` by the plain module
    it wraps, in place.

    Args:
        model: a model injected with lorakern (``inject_lora``, ``load_adapter``).
        merge: True: each adapter not merged yet is merged into its base weight
            first (``merge_lora``'s checks: no weight tied to another module, no
            non-finite result), so the model computes what it computed with its
            adapters. False: the adapters are dropped, giving the base model back;
            refused while a layer is merged (its weight holds the adapter:
            ``unmerge_lora`` first, or ``merge=True``).

    The modules trained whole (``modules_to_save``) stay as they are, trainable. A
    transformers config saying ``tie_word_embeddings=True`` whose input and output
    embeddings no longer share a weight (a saved ``lm_head`` trained its own copy) is
    set to False with a warning, as PEFT's ``merge_and_unload`` does, so that
    ``from_pretrained`` does not tie them again. A refused call changes nothing.

    Returns:
        ``model``.
    """
    if isinstance(model, LoRALayer):
        raise ValueError(f"unload replaces submodules of the model, but the model is a "
                         f"{type(model).__name__} itself; give the model that holds it")
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be True or False, got merge={merge!r}")
    layers = lora_layers(model, "merge_and_unload() (or unload())")
    if merge:
        to_merge = [(name, layer) for name, layer in layers if not layer.merged]
        check_deltas(model, to_merge, +1.0)
    else:
        to_merge = []
        merged = [name for name, layer in layers if layer.merged]
        if merged:
            raise ValueError(f"unload(merge=False) drops the adapters to give the base model "
                             f"back, but LoRA layers {merged} are merged: their weights hold "
                             f"the adapter; call unmerge_lora(model) first, or "
                             f"unload(model, merge=True) to keep it merged; nothing was changed")
    plain = {name: _plain_module(name, layer) for name, layer in layers}

    for _, layer in to_merge:
        layer._apply_delta(+1.0, check=False)
    for name, module in plain.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    _untie_config_of_diverged_embeddings(model)
    return model


def _plain_module(name, layer):
    """The nn.Embedding / nn.Linear / Conv1D holding ``layer``'s base Parameters. Built on
    the meta device, so that no weight is allocated only to be replaced."""
    with torch.device("meta"):
        if isinstance(layer, LoRAEmbedding):
            module = nn.Embedding(layer.num_embeddings, layer.embedding_dim,
                                  padding_idx=layer.padding_idx, max_norm=layer.max_norm,
                                  norm_type=layer.norm_type)
        elif layer.fan_in_fan_out:
            module = _conv1d(name, layer)
        else:
            module = nn.Linear(layer.in_features, layer.out_features,
                               bias=layer.bias is not None)
    module.weight = layer.weight
    if not isinstance(layer, LoRAEmbedding):
        module.bias = layer.bias
    module.train(layer.training)
    return module


def _conv1d(name, layer):
    conv1d = conv1d_class()
    if conv1d is None:
        raise ValueError(f"LoRA layer '{name}' wraps a transformers Conv1D ((in, out) weight), "
                         f"but transformers cannot be imported to build one; nothing was "
                         f"changed")
    if layer.bias is None:
        raise ValueError(f"LoRA layer '{name}' has an (in, out) weight and no bias: a "
                         f"transformers Conv1D always has one; nothing was changed")
    return conv1d(layer.out_features, layer.in_features)


def _untie_config_of_diverged_embeddings(model):
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        output, input_ = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    output_weight = getattr(output, "weight", None)
    input_weight = getattr(input_, "weight", None)
    # PEFT's test: the same storage, whatever the Parameter objects
    if output_weight is None or input_weight is None or (output_weight.data_ptr()
                                                          == input_weight.data_ptr()):
        return
    config.tie_word_embeddings = False
    warnings.warn("unload: the input and output embeddings no longer share a weight (a saved "
                  "output layer trained its own copy); the model config now says "
                  "tie_word_embeddings=False, so that from_pretrained keeps them apart",
                  stacklevel=3)
