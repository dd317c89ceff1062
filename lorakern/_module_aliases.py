"""The flat module paths of lorakern 0.1's first layout, kept importable.

``lorakern.api``, ``lorakern.function``, ``lorakern.ops``, ``lorakern.reference``,
``lorakern.autotune`` (and the private ``_backend`` and ``_validation``) are the
modules that now live in ``lorakern.functional`` (the same module objects, so a
monkeypatch through the old path still takes effect); ``lorakern.embedding``, ``lorakern.modules``,
``lorakern.inject`` and ``lorakern.peft_interop`` were split by job, and each
old path is a module holding the public names it had, taken from their new
homes. Nothing inside lorakern imports these paths.
"""
import importlib
import sys
import types

# old path -> the module it now is
SAME_MODULE = {
    "api": "functional.linear",
    "function": "functional.fused_linear",
    "ops": "functional.ops",
    "reference": "functional.reference",
    "autotune": "functional.autotune",
    "_backend": "functional.dispatch",
    "_validation": "functional.validation",
}

# old path -> {public name it had: the module that holds it now}
SPLIT_MODULE = {
    "embedding": {
        "ID_DTYPES": "functional.validation", "check_ids_in_range": "functional.validation",
        "reference_lora_embedding": ("functional.reference", "lora_embedding"),
        "fused_embedding_forward": "functional.fused_embedding",
        "fused_embedding_backward": "functional.fused_embedding",
        "FusedLoRAEmbedding": "functional.fused_embedding",
        "lora_embedding": "functional.embedding",
        "LoRAEmbedding": "layers.embedding", "embedding_layout": "layers.embedding",
    },
    "modules": {
        "MERGE_CHUNK_ROWS": "layers.adapter", "INITS": "layers.adapter",
        "default_adapter_dtype": "layers.adapter", "LoRALayer": "layers.adapter",
        "base_layout": "layers.linear", "LoRALinear": "layers.linear",
    },
    "inject": {
        "ALL_LINEAR": "models.config", "inject_lora": "models.inject",
        "count_parameters": "models.report", "format_lora_report": "models.report",
        "lora_report": "models.report", "merge_lora": "models.merge",
        "unmerge_lora": "models.merge",
    },
    "peft_interop": {
        "log": "peft.patch", "CONFIG_NAME": "peft.adapter_format",
        "WEIGHTS_NAME": "peft.adapter_format", "PREFIX": "peft.adapter_format",
        "patch_peft": "peft.patch", "patched_modules": "peft.patch",
        "PatchSummary": "peft.patch", "patch_summary": "peft.patch",
        "unpatch_peft": "peft.patch", "save_adapter": "peft.save", "load_adapter": "peft.load",
        # patched modules pickle their forward by this name (torch.save of a whole model)
        "_fused_forward": "peft.patch",
    },
}


def _module(path):
    return importlib.import_module(f"{__package__}.{path}")


def _split_module(old, names):
    module = types.ModuleType(f"{__package__}.{old}",
                              f"The names of the former ``lorakern.{old}``; see their modules.")
    for name, source in names.items():
        path, attribute = source if isinstance(source, tuple) else (source, name)
        setattr(module, name, getattr(_module(path), attribute))
    module.__all__ = sorted(names)
    return module


def install(package):
    """Registers every old path in sys.modules and as an attribute of ``package``."""
    for old, new in SAME_MODULE.items():
        _register(package, old, _module(new))
    for old, names in SPLIT_MODULE.items():
        _register(package, old, _split_module(old, names))


def _register(package, old, module):
    sys.modules[f"{__package__}.{old}"] = module
    setattr(package, old, module)
