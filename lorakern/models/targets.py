"""Which modules of a model a setting names: PEFT's matching rules, in one place.

A list entry matches a module whose name equals it or ends with ``"." + entry``;
a single string is a regular expression that must match the whole module name.
``is_linear`` / ``is_embedding`` say which modules a LoRA layer can replace.
"""
import re

from torch import nn

from ..layers.linear import is_conv1d


_SHOWN_NAMES = 20


def is_linear(module):
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_embedding(module):
    return isinstance(module, nn.Embedding)


def is_target_kind(module):
    """What LoRA layers can replace: linear modules and embeddings."""
    return is_linear(module) or is_embedding(module)


def matches(name, entry):
    return name == entry or name.endswith("." + entry)


def listing(names):
    """Names for an error message: the distinct last components, then the full
    names (the first _SHOWN_NAMES of them)."""
    if not names:
        return "none"
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    shown = ", ".join(names[:_SHOWN_NAMES])
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN_NAMES else ""
    return f"names ending in {', '.join(leaves)}: {shown}{more}"


def select(named, spec, what):
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
    chosen = [name for name in named if any(matches(name, entry) for entry in entries)]
    unmatched = [entry for entry in entries if not any(matches(name, entry) for name in named)]
    return chosen, unmatched


def inside(name, owners):
    return any(name == owner or name.startswith(owner + ".") for owner in owners)


def exact_regex(paths):
    """A regex that PEFT's re.fullmatch matches against exactly these module names."""
    return "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"
