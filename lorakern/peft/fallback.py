"""PEFT's own forward for a call that a patched module cannot run fused.

A patched PEFT LoRA module never raises where PEFT would run: a state lorakern
does not fuse (a LoRA variant, a module changed after patching, dropout active on
several stacked adapters, extra forward arguments) runs PEFT's forward for that
call. The first call for each reason logs one WARNING on the ``lorakern`` logger;
every call is counted on the module, and ``patch_summary`` reports the reasons
(``PatchSummary.fell_back``). Where PEFT raises, PEFT's forward raises its own
exception.
"""
import logging
import threading

log = logging.getLogger("lorakern")

_ATTRIBUTE = "_lorakern_fallbacks"
_lock = threading.Lock()


def peft_forward(module, x, *args, **kwargs):
    """PEFT's own forward of the module's class."""
    return type(module).forward(module, x, *args, **kwargs)


def note_fallback(module, reason):
    """Count one call of ``module`` that ran PEFT's forward for ``reason``; log the first."""
    with _lock:
        counts = module.__dict__.setdefault(_ATTRIBUTE, {})
        first = reason not in counts
        counts[reason] = counts.get(reason, 0) + 1
    if first:
        name = getattr(module, "_lorakern_name", type(module).__name__)
        log.warning("lorakern: patched PEFT module '%s' runs PEFT's forward (not fused): %s",
                    name, reason)


def peft_forward_instead(module, reason, x, *args, **kwargs):
    """PEFT's forward for this call, counted and (the first time) logged."""
    note_fallback(module, reason)
    return peft_forward(module, x, *args, **kwargs)


def fallbacks(module):
    """{reason: calls} of the calls of ``module`` that ran PEFT's forward since patching."""
    return dict(module.__dict__.get(_ATTRIBUTE, {}))


def forget_fallbacks(module):
    module.__dict__.pop(_ATTRIBUTE, None)
