"""The row layout the kernels are compiled for, and the copies that give it.

Every kernel build is compiled and checked for operands whose last dimension
has unit stride (tests/compile_kernels.py). ``unit_rows`` hands the kernels
such rows, copying any other layout once per call and saying so once per
tensor role on the ``lorakern`` logger (once also when several threads copy
at once).
"""
import logging
import threading

log = logging.getLogger("lorakern")

_copied = set()
_copied_lock = threading.Lock()


def flatten(t):
    """``t`` as a 2-D (rows, last dim) tensor."""
    # reshape(-1, 0) is ambiguous: a layer with no inputs or no outputs has a zero last dim
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def unit_rows(t, name):
    """``t`` with unit stride along its last dim. Another layout (a transposed or
    sliced x, the expanded dY of ``y.sum().backward()``) is copied to contiguous
    rows, one read and one write of it, and a log line says so once per tensor
    role (``name``)."""
    if t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    if _first_copy_of(name):
        log.info("lorakern: %s of shape %s has stride %s along its last dim; it is copied "
                 "to contiguous rows for the kernels (said once)", name, tuple(t.shape),
                 t.stride(-1))
    return t.contiguous()


def _first_copy_of(name):
    with _copied_lock:
        first = name not in _copied
        _copied.add(name)
    return first
