"""``save_adapter``: a model injected with lorakern written as a PEFT LoRA adapter.

The adapter (``adapter_format.py``) holds every LoRA layer's A and B, the
modules trained whole (``modules_to_save``), and a config from which PEFT
rebuilds the same layers: the most common (r, alpha), the others as
``rank_pattern`` / ``alpha_pattern``, target modules by suffix where that
selects exactly the injected layers. Both files are replaced together
(``atomic_files.py``), the weights recording the config's layer settings.

Refused before anything is written: models PEFT would not reproduce (settings
that differ between layers where PEFT has one, LoRA embeddings with
``max_norm``, ...), and PEFT models (their ``save_pretrained`` saves them).
"""
import math
import os
import re
import sys

from ..layers.adapter import LoRALayer
from ..layers.quantized_linear import QuantizedLoRALinear
from ..layers.embedding import LoRAEmbedding
from ..models.targets import exact_regex
from .adapter_format import MAGNITUDE_SUFFIX, PREFIX, adapter_keys, max_norm_problem
from .atomic_files import write_adapter_files
from .sharded import full_tensor, wait_for_writer, writes_files


def _lora_layers(model):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (LoRALayer, QuantizedLoRALinear))]


def _peft_lora_layer_names(model):
    """Names of the PEFT LoRA layers in ``model``; none unless peft was imported, as a
    model cannot hold them otherwise (and saving must not import peft)."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.lora.layer import LoraLayer
    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _refuse_peft_layers(model):
    """save_adapter writes lorakern's layers: PEFT's own are PEFT's to save."""
    peft_layers = _peft_lora_layer_names(model)
    if peft_layers:
        shown = ", ".join(f"'{n}'" for n in peft_layers[:3])
        more = f", ... ({len(peft_layers)} in all)" if len(peft_layers) > 3 else ""
        raise ValueError(f"save_adapter: this {type(model).__name__} holds PEFT LoRA layers "
                         f"({shown}{more}), which save_adapter does not write: save it with "
                         f"PEFT's save_pretrained (model.save_pretrained(path)), patched by "
                         f"patch_peft or not. save_adapter saves the LoRALinear/LoRAEmbedding "
                         f"layers of inject_lora")


def _refuse_max_norm_embeddings(layers):
    for name, m in layers:
        problem = max_norm_problem(m) if isinstance(m, LoRAEmbedding) else None
        if problem:
            raise ValueError(f"save_adapter: LoRA embedding '{name}': {problem}; PEFT would not "
                             f"give this model's outputs from the adapter")


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
                if leaf in ("lora_A", "lora_B", "lora_magnitude"):
                    continue
                raise ValueError(
                    f"save_adapter: the base {leaf} of LoRA layer '{owner}' is trainable; a PEFT "
                    f"LoRA adapter with bias='none' holds only lora_A and lora_B (freeze it, or "
                    f"it will not be saved)")
            if owner not in paths:
                paths.append(owner)
        entries = paths
        for path in paths:
            # a name the suffix also selects is fine when it is saved too (a SEQ_CLS
            # model's pre_classifier beside its classifier)
            clash = [n for n in names if n != path and n.endswith(path) and n not in paths]
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
    same for all layers (ValueError otherwise), and so must DoRA (``DoRALinear``
    layers: ``use_dora`` and each layer's ``lora_magnitude_vector``). Merged layers save the same
    adapter as unmerged ones: A and B, never the base weight, so the adapter
    applies to the original base model either way.

    Also refused (ValueError, nothing written): a LoRA embedding whose base sets
    ``max_norm`` (PEFT renormalises ``lora_embedding_A`` with it, lorakern does
    not; ``patch_peft`` refuses it too), and a model holding PEFT LoRA layers (a
    ``PeftModel``, patched or not: PEFT's ``save_pretrained`` saves it).

    Both files are written beside their final names and then renamed over the
    old ones: a save that fails (disk full, ...) leaves an adapter already in
    ``path`` as it was, and no temporary files. A process killed between the two
    renames leaves the new weights beside the old config: the weights record the
    layer settings (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
    ``use_rslora``, ``lora_dropout``) of the config saved with them, and
    ``load_adapter`` refuses a config that disagrees (PEFT's ``from_pretrained``
    does not check). The temporaries of killed saves are removed by the next
    save into ``path``.

    On a model sharded by FSDP2 (``fully_shard``), every rank calls
    ``save_adapter``: each gathers the whole A and B of every layer
    (``DTensor.full_tensor()``, a collective), rank 0 writes the files, and no rank
    returns before they are written.
    """
    _refuse_peft_layers(model)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: this {type(model).__name__} has no LoRA layers "
                         f"(inject_lora first)")
    use_rslora = _uniform(layers, "use_rslora", "use_rslora")
    # PEFT applies lora_dropout to linear layers only: embeddings do not count here
    linear_layers = [(n, m) for n, m in layers if not isinstance(m, LoRAEmbedding)]
    dropout = _uniform(linear_layers, "dropout", "lora_dropout") if linear_layers else 0.0
    use_dora = _uniform(linear_layers, "use_dora", "use_dora") if linear_layers else False
    _refuse_max_norm_embeddings(layers)
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
    target_modules = _suffix_targets(names, lora_names) or exact_regex(lora_names)
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
        "use_dora": use_dora,
    }

    sources = {}
    for name, m in layers:
        key_a, key_b = adapter_keys(name, m)
        sources[key_a], sources[key_b] = m.lora_A, m.lora_B
        if getattr(m, "use_dora", False):
            sources[f"{PREFIX}{name}{MAGNITUDE_SUFFIX}"] = m.lora_magnitude
    for module_path, module in saved_whole.items():
        for key, t in module.state_dict().items():
            sources[f"{PREFIX}{module_path}.{key}"] = t
    # own storage: safetensors refuses shared or strided tensors; an FSDP2 shard is
    # gathered whole on every rank (in the same key order on all of them)
    tensors = {key: full_tensor(t.detach()).to("cpu", copy=True).contiguous()
               for key, t in sources.items()}

    if writes_files(sources.values()):
        os.makedirs(path, exist_ok=True)
        write_adapter_files(path, config, tensors)
    wait_for_writer(sources.values())
    return path
