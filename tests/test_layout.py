"""The package's shape: levels that import one way, no import circle, every package
installed, and the module paths of the flat layout still importable.

Levels, each importing only from itself and the levels before it:

    lorakern.kernels <- lorakern.functional <- lorakern.layers <- lorakern.models
    <- lorakern.peft <- lorakern (the package's own __init__, the aliases, the demo)

Imports inside functions count as much as those at the top of a file: a lazy
import that goes up a level is the same tangle, only found later.
"""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LEVELS = ("lorakern.kernels", "lorakern.functional", "lorakern.layers", "lorakern.models",
          "lorakern.peft", "lorakern")

# The public names each module of the flat layout had, importable from there still.
FLAT_NAMES = {
    "api": ["lora_linear"],
    "function": ["FusedLoRALinear", "draw_seed", "fused_backward", "fused_forward"],
    "ops": ["lora_embedding_backward_op", "lora_embedding_op", "lora_linear_backward_op",
            "lora_linear_compiled", "lora_linear_op"],
    "reference": ["lora_linear", "lora_linear_masked", "lora_linear_unchecked"],
    "autotune": ["CorruptCacheFile", "DEFAULT_REPS", "DIRECTIONS", "FILE_FORMAT", "FILE_NAME",
                 "FILE_VERSION", "Tuner", "canonical_key", "choose", "cuda_event_timer",
                 "default_cache_dir", "default_timer", "default_tuner", "log",
                 "read_cache_file", "reset", "set_timer", "tuning_enabled", "tuning_key",
                 "wall_clock_timer"],
    "_backend": ["choose_plan", "load_kernels", "select_backend", "strategy_forced"],
    "_validation": ["check_base_dtypes", "check_scalars", "check_tensors"],
    "embedding": ["FusedLoRAEmbedding", "ID_DTYPES", "LoRAEmbedding", "check_ids_in_range",
                  "embedding_layout", "fused_embedding_backward", "fused_embedding_forward",
                  "lora_embedding", "reference_lora_embedding"],
    "modules": ["INITS", "LoRALayer", "LoRALinear", "MERGE_CHUNK_ROWS", "base_layout",
                "default_adapter_dtype"],
    "inject": ["ALL_LINEAR", "count_parameters", "format_lora_report", "inject_lora",
               "lora_report", "merge_lora", "unmerge_lora"],
    "peft_interop": ["CONFIG_NAME", "PREFIX", "PatchSummary", "WEIGHTS_NAME", "load_adapter",
                     "log", "patch_peft", "patch_summary", "patched_modules", "save_adapter",
                     "unpatch_peft"],
}


def _source_files():
    """{module name: path} for every module the package installs (kernels/ is
    installed as lorakern.kernels)."""
    files = {}
    for top, package in ((ROOT / "lorakern", "lorakern"), (ROOT / "kernels", "lorakern.kernels")):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package] + parts)] = path
    return files


FILES = _source_files()


def _is_package(module):
    return FILES[module].name == "__init__.py"


def _resolve(module, node):
    """The lorakern modules an import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module
    # "from package import name" names a module when name is one
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in FILES else base
            for alias in node.names]


def _imports(module):
    """The lorakern modules ``module`` imports anywhere in its file, lazily or not."""
    tree = ast.parse(FILES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(name for name in _resolve(module, node)
                         if name == "lorakern" or name.startswith("lorakern."))
    return found - {module}


GRAPH = {module: _imports(module) for module in FILES}


def _level(module):
    for index, prefix in enumerate(LEVELS):
        if module == prefix or module.startswith(prefix + "."):
            return index
    raise AssertionError(f"{module} belongs to no level")


def test_every_module_belongs_to_a_level():
    assert {_level(m) for m in FILES} == set(range(len(LEVELS)))


def test_imports_go_down_the_levels_only():
    upward = [f"{module} ({LEVELS[_level(module)]}) imports {target} ({LEVELS[_level(target)]})"
              for module, targets in GRAPH.items() for target in sorted(targets)
              if _level(target) > _level(module)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    """Depth-first search for a back edge, with the circle spelled out if found."""
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_walk_sees_the_imports_it_judges():
    # the walk resolves relative, package-relative and lazy imports
    assert "lorakern.functional.fused_linear" in GRAPH["lorakern.functional.linear"]
    assert "lorakern.functional.reference" in GRAPH["lorakern.functional"]
    assert "lorakern.models.inject" in GRAPH["lorakern.peft.load"]
    assert "lorakern.functional.autotune" in GRAPH["lorakern.functional.dispatch"]  # lazy


def test_the_kernels_know_nothing_of_the_rest():
    outside = {m: sorted(t for t in targets if _level(t) > 0)
               for m, targets in GRAPH.items() if _level(m) == 0}
    assert not any(outside.values()), outside


def test_nothing_inside_imports_the_flat_paths():
    flat = {f"lorakern.{name}" for name in FLAT_NAMES}
    users = {m: sorted(targets & flat) for m, targets in GRAPH.items() if targets & flat}
    assert not users, users


def test_setup_installs_every_package_of_the_tree():
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    listed = next(ast.literal_eval(k.value) for k in ast.walk(tree)
                  if isinstance(k, ast.keyword) and k.arg == "packages")
    assert sorted(listed) == sorted(m for m in FILES if _is_package(m))


@pytest.mark.parametrize("old", sorted(FLAT_NAMES))
def test_the_flat_module_paths_still_import(old):
    module = importlib.import_module(f"lorakern.{old}")
    missing = [name for name in FLAT_NAMES[old] if not hasattr(module, name)]
    assert not missing, f"lorakern.{old} lost {missing}"


def test_a_flat_path_is_the_new_module_where_one_module_moved():
    import lorakern.function
    import lorakern.functional.fused_linear
    assert lorakern.function is lorakern.functional.fused_linear  # monkeypatches reach it


def test_a_flat_path_imports_first_in_a_fresh_process():
    code = ("from lorakern.peft_interop import patch_peft; from lorakern.modules import "
            "LoRALinear; import lorakern.inject as inject; "
            "assert inject.inject_lora.__module__ == 'lorakern.models.inject'; "
            "assert patch_peft.__module__ == 'lorakern.peft.patch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr


def test_every_public_name_is_importable_from_lorakern():
    import lorakern
    missing = [name for name in lorakern.__all__ if not hasattr(lorakern, name)]
    assert not missing
