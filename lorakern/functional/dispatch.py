"""The one place that decides whether a call runs the Triton kernels or the
PyTorch reference.

- ``LORAKERN_BACKEND=reference``: the reference, on any device.
- CUDA tensors: the kernels; when they cannot serve the call (triton missing,
  float64), the reference, with a warning that says why, once per reason.
- meta tensors: the reference, which gives shapes and dtypes as nn.Linear does.
- CPU tensors: the reference, unless ``TRITON_INTERPRET=1`` or
  ``LORAKERN_BACKEND=triton``, which run the kernels in Triton's interpreter.
  The latter switches the interpreter on only while the kernels (and the modules
  Triton imports at its first launch) are imported: the environment, and so a
  child process's, is left as it was.

For the kernels it also picks the layer's strategy (``fused``: Triton GEMMs
with the LoRA term inside; ``cublas``: torch's matmul with the LoRA term as C,
see kernels/lora_layer.py) and, for ``fused``, the GEMM's tile config:

- ``LORAKERN_STRATEGY=fused|cublas`` forces a strategy, on any device;
- on CUDA the tuner (autotune.py) times the candidates once per shape key and
  caches the fastest (``LORAKERN_AUTOTUNE=0``: the table's choice);
- elsewhere (the interpreter), the table's choice.

Threads: calls may come from several threads at once. The first import of the
kernels for CPU tensors is made by one thread while the others wait for it
(``load_kernels``), a warning said once is said once, and the strategy switch
is the environment variable, the same for every thread (``strategy_forced``).
"""
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
import warnings

import torch

log = logging.getLogger("lorakern")

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("", "auto", "triton", "reference")
_STRATEGIES = ("", "auto", "fused", "cublas")
_said = set()
_said_lock = threading.Lock()


def say_once(message):
    """A slower or unusual path is taken: warn once per distinct message, also
    when several threads take it at once."""
    with _said_lock:
        if message in _said:
            return
        _said.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def requested_backend():
    value = os.environ.get("LORAKERN_BACKEND", "").strip().lower()
    if value not in _BACKENDS:
        raise ValueError(f"LORAKERN_BACKEND={value!r}; expected 'triton', 'reference' or "
                         f"'auto' (unset)")
    return value


def requested_strategy():
    """'auto', 'fused' or 'cublas', from LORAKERN_STRATEGY."""
    value = os.environ.get("LORAKERN_STRATEGY", "").strip().lower()
    if value not in _STRATEGIES:
        raise ValueError(f"LORAKERN_STRATEGY={value!r}; expected 'fused', 'cublas' or "
                         f"'auto' (unset)")
    return value or "auto"


@contextlib.contextmanager
def strategy_forced(strategy):
    """LORAKERN_STRATEGY set to ``strategy`` ('auto', 'fused' or 'cublas') inside,
    and put back after; None leaves it as it is. An environment variable, not a
    thread-local: the backward runs in autograd's threads."""
    if strategy is None:
        yield
        return
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy {strategy!r}; expected 'fused', 'cublas' or 'auto'")
    with _environment_variable_set("LORAKERN_STRATEGY", strategy):
        yield


@contextlib.contextmanager
def _environment_variable_set(name, value):
    """``os.environ[name] = value`` inside, and the variable as it was after."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def tunes_on(device):
    """Whether calls on ``device`` are tuned: CUDA only (the interpreter's timings
    say nothing about a GPU)."""
    return device.type == "cuda"


def choose_plan(direction, kernels, lhs, weight, lora_A, lora_B, dropout_p, run, strategy=None):
    """The plan (strategy and config) for a forward (``lhs`` = x) or grad-input
    (``lhs`` = dY) call; ``run(plan)`` launches that call, for the tuner.
    ``strategy``: the only strategy the base can take (else LORAKERN_STRATEGY's)."""
    plans = kernels.layer_plans(lhs.shape[0], lhs, lora_A, lora_B, weight)
    requested = strategy or requested_strategy()
    if requested != "auto":
        plans = [plan for plan in plans if plan.strategy == requested]
    if not tunes_on(lhs.device) or len(plans) == 1:
        return plans[0]
    from . import autotune

    by_name = {plan.name: plan for plan in plans}
    tma = any(plan.gemm is not None and plan.gemm.tma for plan in plans)
    key = autotune.tuning_key(direction, lhs, weight, lora_A, lora_B, dropout_p, tma=tma)
    chosen = autotune.choose(key, {name: (lambda plan=plan: run(plan))
                                   for name, plan in by_name.items()}, plans[0].name)
    return by_name[chosen]


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unsupported_dtypes(tensors):
    return sorted({str(t.dtype) for t in tensors if t.dtype not in KERNEL_DTYPES})


def select_backend(x, *others):
    """'triton' or 'reference' for a call on these (validated) tensors."""
    requested = requested_backend()
    requested_strategy()  # a bad value is refused on every path, not only the kernels'
    if requested == "reference" or x.device.type == "meta":
        # meta tensors carry shapes only (models built empty): nothing runs either way
        return "reference"
    tensors = (x,) + tuple(t for t in others if t is not None)
    on_cpu_by_request = x.device.type == "cpu" and (requested == "triton" or _interpreting())
    if x.device.type != "cuda" and not on_cpu_by_request:
        if requested == "triton":
            raise ValueError(f"LORAKERN_BACKEND=triton, but the Triton kernels run on CUDA "
                             f"tensors (or CPU under the interpreter), got {x.device}")
        return "reference"
    bad_dtypes = _unsupported_dtypes(tensors)
    if bad_dtypes:
        reason = (f"lorakern: the Triton kernels take float16, bfloat16 and float32, got "
                  f"{', '.join(bad_dtypes)}")
        if requested == "triton":
            raise TypeError(reason + " with LORAKERN_BACKEND=triton")
        say_once(reason + "; this call runs the slower PyTorch reference")
        return "reference"
    if importlib.util.find_spec("triton") is None:
        if requested == "triton" or on_cpu_by_request:
            raise RuntimeError("lorakern: the Triton kernels were requested but triton is "
                               "not installed")
        say_once("lorakern: triton is not installed; CUDA calls run the slower PyTorch "
                 "reference")
        return "reference"
    return "triton"


def _interpret_triton_helpers():
    """Give Triton's own jitted helpers (``tl.zeros``, ``tl.cdiv``, ``tl.philox``, ...)
    the interpreted form an import under ``TRITON_INTERPRET=1`` would have given them.

    They are decorated once, when ``triton.language`` is first imported; if something
    imported triton before the interpreter was switched on (peft does), they were built
    for the GPU and an interpreted kernel cannot call them.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    converted = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language"
                                  or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in converted:
                    converted[id(value)] = InterpretedFunction(value.fn)
                setattr(module, attr, converted[id(value)])
    return len(converted)


# Modules Triton imports at its first kernel launch (the specializer imports gluon,
# the interpreter libdevice), not with triton.language. Gluon wraps Triton's helpers
# when it is imported and asserts that they match the interpreter's mode then: they
# are imported with the kernels, in the same mode. Those a Triton lacks are skipped.
_IMPORTED_BY_THE_FIRST_LAUNCH = ("triton.compiler.code_generator",
                                 "triton.language.extra.libdevice",
                                 "triton.experimental.gluon")


@contextlib.contextmanager
def _interpreter_switched_on():
    """TRITON_INTERPRET=1 inside, and the environment as it was after.

    Triton reads the variable when a function is decorated or wrapped (``triton.jit``
    in triton/runtime/jit.py and gluon's wrappers, through ``knobs.runtime.interpret``,
    which reads the environment each time); an interpreted kernel does not consult it
    again to run. Left set, it would reach every child process, and any kernel
    decorated later in this process would be interpreted too.
    """
    with _environment_variable_set("TRITON_INTERPRET", "1"):
        yield


def _module_exists(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _import_kernels_interpreted(name):
    """The kernels, decorated in interpreter mode (with Triton's own helpers, if triton
    was imported before), the environment left as it was."""
    if "triton.language" in sys.modules and torch.cuda.is_available():
        # converting Triton's helpers would break GPU kernels in this process
        raise RuntimeError("lorakern: running the Triton kernels on CPU tensors needs "
                           "Triton's interpreter, which must be on before triton is first "
                           "imported, and triton was imported already (peft imports it) "
                           "in a process that also has CUDA. Start Python with "
                           "TRITON_INTERPRET=1 set (e.g. `TRITON_INTERPRET=1 python "
                           "train.py`), or move the tensors to the GPU")
    with _interpreter_switched_on():
        if "triton.language" in sys.modules:
            _interpret_triton_helpers()
        kernels = importlib.import_module(name)
        for module in _IMPORTED_BY_THE_FIRST_LAUNCH:
            if _module_exists(module):
                importlib.import_module(module)
    log.info("lorakern: running the Triton kernels on CPU in Triton's interpreter")
    return kernels


# Held by the thread that imports the kernels in interpreter mode: another thread
# must neither find them half imported nor save and put back the environment
# around the first thread's switch.
_interpreted_import_lock = threading.Lock()


def load_kernels(device):
    """Import ``lorakern.kernels``; for CPU tensors, in interpreter mode.

    Triton fixes a kernel's mode when it is decorated, so the interpreter is
    switched on for the first import of the kernels, or not at all; the
    environment is put back after that import, so child processes do not inherit
    the interpreter. Threads calling at once get the kernels imported once.
    """
    name = "lorakern.kernels"
    if device.type != "cpu":
        return importlib.import_module(name)
    with _interpreted_import_lock:
        # inside the lock: TRITON_INTERPRET=1 may be another thread's switch, on
        # only while it imports
        if _interpreting():
            return importlib.import_module(name)
        if name not in sys.modules:
            return _import_kernels_interpreted(name)
        loaded = importlib.import_module(name)  # waits for an import still running
    if not loaded._common.INTERPRET:
        raise RuntimeError("lorakern: the Triton kernels were compiled for the GPU in this "
                           "process; set TRITON_INTERPRET=1 before importing lorakern to "
                           "run them on CPU tensors")
    return loaded
