"""Runtime choice between a layer's implementations, timed on the real tensors.

What is tuned: for each direction of a LoRA linear layer (``forward``, and the
backward's ``grad_input``) the callers offer several candidates that compute
the same result: ``cublas`` (torch's matmul with the LoRA term as the GEMM's C
operand) and ``fused:<BMxBNxBK>:w<warps>:s<stages>`` (the Triton GEMMs with the
LoRA term inside, one per tile config). On first use of a key every candidate
is timed and the fastest is kept::

    name = autotune.choose(tuning_key("forward", x, weight, lora_A, lora_B, p),
                           {"cublas": run_cublas, "fused:128x128x64:w8:s4": run_fused},
                           heuristic="fused:128x128x64:w8:s4")

The key (``tuning_key``): direction, GPU name, torch and triton versions, the
dtypes of x and of the adapter, the token count M rounded up to a power of two,
the GEMM's output columns n and reduction depth k, the rank block and whether
dropout is on. A new torch or triton gives new keys, so an upgrade retunes
instead of trusting old timings; old entries stay in the file, unused.

The file: ``$LORAKERN_CACHE_DIR/autotune.json`` (default
``~/.cache/lorakern/autotune.json``)::

    {"format": "lorakern-autotune", "version": 1,
     "entries": {"<json.dumps(key, sort_keys=True)>":
                 {"choice": "<name>", "times_ms": {"<name>": 0.412, ...}}}}

Writes merge with what other processes wrote (under an ``flock`` on
``autotune.json.lock`` where the OS has one) and replace the file atomically.
A corrupt file is ignored with a warning and rewritten; an unwritable
directory leaves the choices in memory, with a warning.

First-call cost: each new key runs every candidate once to warm up (which also
compiles a fused candidate's kernels, if this process has not yet) and then
``DEFAULT_REPS`` = 7 timed times, i.e. candidates x 8 runs of that layer's
forward (or grad-input). With 4 candidates at M = 8192, 4096x4096 that is about
30 runs of 0.3-0.5 ms: ~15 ms per key (~19 ms with the TMA build, the fifth
candidate on sm_90 and later), once per machine, since the choice is kept in
the file.

No timing happens, and ``heuristic`` is returned, when ``LORAKERN_AUTOTUNE=0``,
while a CUDA graph is captured, while torch.compile traces, or when there is a
single candidate. Tuning only calls the candidates: it draws no random numbers
and changes no result.

Threads: ``choose`` may be called from several threads at once. One tuning runs
at a time in the process (the candidates of two keys timed at once on one GPU
would slow each other down), so a key is timed once: a thread that asks for a
key while another times it waits for that choice. A key already chosen is
answered without waiting for a timing in progress; the tuner's memory and its
file are written under locks, the file also under the ``flock`` across
processes.
"""
import contextlib
import json
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent writers may then drop each other's entries
    fcntl = None

log = logging.getLogger("lorakern")

FILE_FORMAT = "lorakern-autotune"
FILE_VERSION = 1
FILE_NAME = "autotune.json"
DEFAULT_REPS = 7
DIRECTIONS = ("forward", "grad_input")
_KEY_SCALARS = (str, int, float, bool)
# Versions are in the key so that upgrades retune, but they are noise in a log line.
_KEYS_LEFT_OUT_OF_SUMMARY = ("torch", "triton")


# ---- the key

def _next_power_of_two(value):
    return 1 if value <= 1 else 1 << (int(value) - 1).bit_length()


@lru_cache(maxsize=None)
def _triton_version():
    from importlib import metadata
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        pass
    try:
        import triton
        return str(triton.__version__)
    except Exception:  # a broken triton install must not stop the reference path
        return "none"


@lru_cache(maxsize=None)
def _cuda_device_name(index):
    return torch.cuda.get_device_name(index)


def _device_label(device):
    if device.type == "cuda":
        return _cuda_device_name(device.index if device.index is not None else
                                 torch.cuda.current_device())
    return str(device.type)


def tuning_key(direction, x, weight, lora_A, lora_B, dropout_p, *, rank_block=None, tma=False):
    """The dict that names one tuning problem; timings are only reused for an equal key.
    ``tma``: whether the candidates include the TMA builds (aligned operands on
    sm_90+), so aligned and unaligned calls of one shape keep separate choices."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {DIRECTIONS}")
    out_features, in_features = weight.shape[0], weight.shape[1]
    n, k = (out_features, in_features) if direction == "forward" else (in_features, out_features)
    if rank_block is None:
        rank_block = max(16, _next_power_of_two(lora_A.shape[0]))
    return {
        "direction": direction,
        "device": _device_label(x.device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "x_dtype": str(x.dtype),
        "adapter_dtype": str(torch.promote_types(lora_A.dtype, lora_B.dtype)),
        "m_bucket": _next_power_of_two(x.shape[:-1].numel()),
        "n": int(n),
        "k": int(k),
        "rank_block": int(rank_block),
        "dropout": bool(dropout_p > 0),
        "tma": bool(tma),
        # a quantised base (kernels.QuantizedOperand) is timed apart from a dense one
        "base": getattr(weight, "base_kind", "dense"),
        # fp32 products run on the tensor cores (TF32) or the FMA pipes (IEEE), for
        # cuBLAS and the Triton GEMMs alike, and the GEMMs' tiles differ between them
        "tf32": x.dtype == torch.float32 and _tf32_allowed(),
    }


def _tf32_allowed():
    """torch's TF32 switch for matmuls; its new API (``fp32_precision``) read first,
    since reading ``allow_tf32`` after it was used raises."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def canonical_key(key):
    """The key's string in the cache: the same for equal dicts whatever their order."""
    if not isinstance(key, dict):
        raise TypeError(f"a tuning key is a dict, not {type(key).__name__}")
    for name, value in key.items():
        if not isinstance(name, str) or not isinstance(value, _KEY_SCALARS):
            raise TypeError(f"tuning key entry {name!r}: {value!r}; keys are str and values "
                            f"str, int, float or bool")
    return json.dumps(key, sort_keys=True)


def _summary(key):
    return " ".join(f"{name}={value}" for name, value in key.items()
                    if name not in _KEYS_LEFT_OUT_OF_SUMMARY)


# ---- when to tune

def tuning_enabled():
    """LORAKERN_AUTOTUNE: unset, "" or "1" tune; "0" uses the heuristics."""
    value = os.environ.get("LORAKERN_AUTOTUNE", "").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise ValueError(f"LORAKERN_AUTOTUNE={value!r}; expected '1' (tune, the default) or '0' "
                     f"(use the heuristic choice)")


def _must_not_time():
    # Timing inside a graph capture would record the candidates into the graph, and
    # inside torch.compile's tracing it would bake one machine's timings into the graph.
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---- timers

def cuda_event_timer(fn, reps=DEFAULT_REPS):
    """Median seconds of ``reps`` runs of fn between CUDA events, after one warm-up run."""
    fn()  # compiles Triton kernels and lets cuBLAS pick its algorithm outside the timing
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def wall_clock_timer(fn, reps=DEFAULT_REPS):
    """Median seconds of ``reps`` runs of fn by the wall clock, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def default_timer(fn):
    return cuda_event_timer(fn) if torch.cuda.is_available() else wall_clock_timer(fn)


_injected_timer = None


def set_timer(timer):
    """Time candidates with ``timer(fn) -> seconds`` from now on; None restores the
    default. Returns the previous injected timer (None for the default)."""
    global _injected_timer
    previous, _injected_timer = _injected_timer, timer
    return previous


def _current_timer():
    return _injected_timer if _injected_timer is not None else default_timer


# ---- the cache file

class CorruptCacheFile(ValueError):
    pass


def default_cache_dir():
    configured = os.environ.get("LORAKERN_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path("~/.cache/lorakern").expanduser()


def _validated_entries(document):
    if not isinstance(document, dict):
        raise CorruptCacheFile(f"top level is a {type(document).__name__}, not an object")
    if document.get("format") != FILE_FORMAT:
        raise CorruptCacheFile(f"format is {document.get('format')!r}, not {FILE_FORMAT!r}")
    version = document.get("version")
    if type(version) is not int or version != FILE_VERSION:
        raise CorruptCacheFile(f"version is {version!r}, not {FILE_VERSION}")
    entries = document.get("entries")
    if not isinstance(entries, dict):
        raise CorruptCacheFile("'entries' is not an object")
    for canonical, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("choice"), str):
            raise CorruptCacheFile(f"entry {canonical!r} has no string 'choice'")
    return entries


def read_cache_file(path):
    """The file's entries; {} when it does not exist. Raises CorruptCacheFile."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    try:
        document = json.loads(text)
    except ValueError as error:
        raise CorruptCacheFile(f"not JSON ({error})") from None
    return _validated_entries(document)


def _write_atomically(path, document):
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _exclusive_lock(lock_path):
    if fcntl is None:
        yield
        return
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


# ---- the tuner

class Tuner:
    """Chooses among candidates by timing them, remembering choices in memory and
    in ``<cache_dir>/autotune.json``. ``cache_dir`` defaults to
    ``$LORAKERN_CACHE_DIR`` or ``~/.cache/lorakern``; ``timer`` to the module's
    (``set_timer``, else CUDA events)."""

    def __init__(self, cache_dir=None, timer=None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else \
            default_cache_dir()
        self.cache_path = self.cache_dir / FILE_NAME
        self._timer = timer
        self._memory = {}          # canonical key -> chosen name
        self._file_entries = None  # the file's entries, read on first need
        self._tuned_here = {}      # entries this tuner owes the file (kept until written)
        self._warned = set()
        # guards the memory, the file's entries as read and the warnings said; held
        # for lookups and bookkeeping, never while candidates run
        self._lock = threading.RLock()

    def choose(self, key, candidates, heuristic):
        """The name of the candidate to run for ``key``: the heuristic when not
        tuning, else the cached or newly timed fastest."""
        if heuristic not in candidates:
            raise ValueError(f"heuristic {heuristic!r} is not among the candidates "
                             f"{list(candidates)}")
        if not tuning_enabled() or len(candidates) == 1 or _must_not_time():
            return heuristic
        canonical = canonical_key(key)
        cached = self._cached_choice(canonical)
        if cached in candidates:
            return cached
        with _one_tuning_at_a_time:
            cached = self._cached_choice(canonical)  # tuned while this thread waited?
            if cached in candidates:
                return cached
            return self._tune(key, canonical, candidates, heuristic)

    def _cached_choice(self, canonical):
        with self._lock:
            return self._choice_in_memory_or_file(canonical)

    def _choice_in_memory_or_file(self, canonical):
        if canonical in self._memory:
            return self._memory[canonical]
        entry = self._entries_on_file().get(canonical)
        return entry["choice"] if entry is not None else None

    def _entries_on_file(self):
        if self._file_entries is None:
            self._file_entries = self._read_file_or_warn()
        return self._file_entries

    def _read_file_or_warn(self):
        try:
            return read_cache_file(self.cache_path)
        except CorruptCacheFile as error:
            self._warn_once(("corrupt", str(error)),
                            f"lorakern: the autotune cache {self.cache_path} is ignored: {error}; "
                            f"it is rewritten at the next tuning")
        except OSError as error:
            self._warn_once(("unreadable", str(error)),
                            f"lorakern: the autotune cache {self.cache_path} is ignored: "
                            f"cannot read it ({error})")
        return {}

    def _tune(self, key, canonical, candidates, heuristic):
        """Times the candidates and records the fastest; the caller holds
        ``_one_tuning_at_a_time``, so ``_tuned_here`` has no other writer."""
        times = self._time_candidates(candidates)
        if not times:
            self._warn_once(("all failed", canonical),
                            f"lorakern: every candidate failed while tuning {_summary(key)}; "
                            f"using {heuristic}")
            with self._lock:  # not in the file: the failure may be transient
                self._memory[canonical] = heuristic
            return heuristic
        choice = min(times, key=times.__getitem__)  # min keeps the first of equal times
        times_ms = {name: seconds * 1e3 for name, seconds in times.items()}
        log.info("lorakern: tuned %s: chose %s", _summary(key), _timings_text(choice, times_ms))
        with self._lock:
            self._memory[canonical] = choice
        self._tuned_here[canonical] = {"choice": choice, "times_ms": times_ms}
        self._save()
        return choice

    def _time_candidates(self, candidates):
        timer = self._timer if self._timer is not None else _current_timer()
        times = {}
        for name, launch in candidates.items():
            try:
                times[name] = float(timer(launch))
            except Exception as error:  # e.g. a tile config that needs more shared memory
                log.debug("lorakern: candidate %s failed while tuning: %r", name, error)
        return times

    def _save(self):
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with _exclusive_lock(self.cache_dir / f"{FILE_NAME}.lock"):
                entries = self._read_file_or_warn()  # keeps other processes' entries
                entries.update(self._tuned_here)
                _write_atomically(self.cache_path, {"format": FILE_FORMAT,
                                                    "version": FILE_VERSION,
                                                    "entries": entries})
        except OSError as error:
            self._warn_once(("unwritable",),
                            f"lorakern: cannot write the autotune cache {self.cache_path} "
                            f"({error}); tuning choices are kept in memory only")
            return
        with self._lock:
            self._file_entries = entries
        self._tuned_here.clear()

    def _warn_once(self, reason, message):
        with self._lock:
            if reason in self._warned:
                return
            self._warned.add(reason)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _timings_text(choice, times_ms):
    others = ", ".join(f"{name} {ms:.3f} ms" for name, ms in
                       sorted(times_ms.items(), key=lambda item: item[1]) if name != choice)
    return f"{choice} ({times_ms[choice]:.3f} ms" + (f"; {others})" if others else ")")


# One tuning at a time in the process, whichever tuner runs it: timings of
# candidates that share a GPU would distort each other, and a thread waiting
# here for a key that another thread is timing finds it chosen after.
_one_tuning_at_a_time = threading.Lock()


# ---- the module-level tuner the layers use

_default_tuner = None
_default_tuner_lock = threading.Lock()


def default_tuner():
    global _default_tuner
    with _default_tuner_lock:
        if _default_tuner is None:
            _default_tuner = Tuner()
        return _default_tuner


def reset():
    """Forget the default tuner (its memory cache and cache dir); the next call
    re-reads LORAKERN_CACHE_DIR and the file."""
    global _default_tuner
    with _default_tuner_lock:
        _default_tuner = None


def choose(key, candidates, heuristic):
    """The candidate name to run for ``key`` (see the module docstring)."""
    return default_tuner().choose(key, candidates, heuristic)
