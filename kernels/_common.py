"""Pieces shared by every lorakern kernel: dtype handling, the tensor-core dot,
program ordering and small launcher helpers. The dropout mask has its own
module (``dropout.py``); each kernel module holds its own config table.

Threads: the launchers may be called from several threads at once (and
autograd runs backwards in its own threads). Every launch goes through
``launching``, which counts it and, under Triton's interpreter only, runs it
alone: an interpreted launch patches ``triton.language`` process-wide and
keeps its program ids on one process-wide builder. Compiled launches are not
serialised; they only enqueue work on the calling thread's current stream.
The caches here (arrival counters, SM counts, capabilities) are safe to share,
see ``arrival_counters``.
"""
import contextlib
import os
import threading
from collections import Counter
from dataclasses import replace

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernels only
    TensorDescriptor = None

# Decided once, like the @triton.jit decorations of this package: the
# interpreter mode of a kernel cannot change after it has been decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Number of launches per kernel name: lets tests prove a kernel really ran.
# Written under _COUNTS_LOCK (``count_launch``); read it while no launch runs.
launch_counts = Counter()
_COUNTS_LOCK = threading.Lock()

# Triton's interpreter runs a launch by patching the functions of triton.language
# (and restoring them after) and by setting the current program id on one
# process-wide builder (triton/runtime/interpreter.py): two interpreted launches
# at once break each other, with InterpreterError or silently wrong program ids.
_INTERPRETED_LAUNCH = threading.Lock()

# When true, every output buffer is filled with NaN before a kernel writes it,
# so an element a kernel forgot to write cannot pass a test by luck.
POISON_OUTPUTS = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def count_launch(*names):
    """One more launch (or launch sequence) under each of ``names``."""
    with _COUNTS_LOCK:
        for name in names:
            launch_counts[name] += 1


@contextlib.contextmanager
def launching(*names):
    """Around one kernel launch (``kernel[grid](...)``, written in the launcher
    itself, whose frame bench/capture.py names the launch by): under the
    interpreter the launch runs while no other interpreted launch does;
    compiled, it is not held back at all. Counted under ``names`` once it has
    returned."""
    if INTERPRET:
        with _INTERPRETED_LAUNCH:
            yield
    else:
        yield
    count_launch(*names)


@triton.jit
def promote_pair(a, b):
    """a and b in one dtype, as torch promotes them: the same dtype stays, any
    mix (fp32 with a 16-bit type, or fp16 with bf16) goes to fp32."""
    if a.dtype != b.dtype:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def grouped_tile(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, walking GROUP_M row blocks per column
    block so that neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    UPCAST is set only under the interpreter, whose bf16 ``tl.dot`` is wrong;
    on a GPU the operands stay in their storage dtype for the tensor cores.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _exact_parts(v, narrow):
    """fp32 ``v`` as hi + mid + lo, exactly, each part exact in ``narrow``'s MMA
    type: bf16 (8 significant bits a part: the low 16 bits cleared) for a bf16
    ``narrow``, TF32 (11: the low 13 cleared) for fp16, whose exponent range is too
    small for the parts of small values. Clearing low bits keeps the top bits of v's
    significand, so v - hi is exact, and so is each later difference; three parts
    hold all 24 bits (8 + 8 + 8, or 11 + 11 + 2). An infinite v gives NaN parts."""
    if narrow.dtype == tl.bfloat16:
        hi = (v.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        rest = v - hi
        mid = (rest.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        hi = (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        rest = v - hi
        mid = (rest.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, mid, rest - mid


@triton.jit
def _part_dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b, one operand 16-bit and the other an fp32 part exact in its MMA
    type: bf16 MMAs for a bf16 operand, TF32 ones for fp16 (exact in TF32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")


@triton.jit
def mixed_mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32, the operands promoted as torch promotes them.

    PRECISION "split" (``mixed_precision``'s default for a 16-bit operand with an
    fp32 one): the fp32 operand is cut into three parts that sum to it exactly
    (``_exact_parts``) and each part meets the 16-bit operand on the tensor cores.
    Every product a_k * part is exact in fp32 (8 x 8 or 11 x 11 bits), so the result
    differs from an IEEE fp32 product only by the fp32 accumulation of three terms per
    k instead of one: |error| <= gamma(K + 2) * sum_k |a_k||b_k| (gamma(n) = n u /
    (1 - n u), u = 2^-24 for a round-to-nearest accumulator) against gamma(K) for
    IEEE. Same-dtype operands under "split" (fp32 with fp32) run at IEEE precision.
    """
    if PRECISION == "split" and a.dtype != b.dtype:
        if a.dtype == tl.float32:
            hi, mid, lo = _exact_parts(a, b)
            acc = _part_dot(lo, b, acc, UPCAST)
            acc = _part_dot(mid, b, acc, UPCAST)
            return _part_dot(hi, b, acc, UPCAST)
        else:
            hi, mid, lo = _exact_parts(b, a)
            acc = _part_dot(a, lo, acc, UPCAST)
            acc = _part_dot(a, mid, acc, UPCAST)
            return _part_dot(a, hi, acc, UPCAST)
    else:
        a, b = promote_pair(a, b)
        return mma(a, b, acc, UPCAST, "ieee" if PRECISION == "split" else PRECISION)


@triton.jit
def to_storage(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 ``x`` cast to the storage ``dtype``, rounding to nearest even.

    A GPU rounds this way; the interpreter truncates fp32 -> bf16 (its rounding
    option is ignored), so under it the rounding is done on the bits first,
    and the truncating cast is then exact. NaN is left alone.
    """
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def sum_partials(ptr, offsets, mask, count, stride):
    """fp32 sum of the ``count`` partials at ``ptr + i * stride + offsets``, added
    in the order i = 0, 1, ... (the same bits whichever program adds them).
    Loaded at L2 (.cg): other programs wrote them during this launch."""
    total = tl.load(ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    for i in range(1, count):
        total += tl.load(ptr + i * stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    return total


_ARRIVAL_COUNTERS = {}


def arrival_counters(count, device):
    """``count`` int32 counters, all zero, for the kernels whose last program to
    arrive at a block sums its partials. Each kernel sets every counter it
    counted up back to zero before it ends, so one buffer per device and stream
    serves every launch without a memset (launches on a stream run in order).
    While a CUDA graph is captured a fresh zeroed buffer is made instead: a
    buffer first allocated in the capture would belong to the graph's pool.

    Threads: the buffer is keyed by the calling thread's current stream, so
    threads on different streams never share one, and threads launching on one
    stream share it safely: the stream runs their launches one after another,
    each finding the counters zero. Two threads creating (or growing) a buffer at
    once each get a zeroed one, and the one kept serves later launches; the
    other is freed in stream order after its launch. Under the interpreter every
    thread gets the CPU buffer, used by one launch at a time (``launching``)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (str(device), stream)
    counters = _ARRIVAL_COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _ARRIVAL_COUNTERS[key] = counters
    return counters[:max(count, 1)]


def rank_block(rank):
    """Rank padded to a power of two, at least 16 because ``tl.dot`` needs it."""
    return max(16, triton.next_power_of_2(rank))


def dot_precision(dtype):
    """fp32 operands follow torch's TF32 switch, as nn.Linear does on CUDA."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def tf32_allowed():
    """torch's TF32 switch for matmuls, through whichever API the caller used:
    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee"; "none" defers to
    the legacy flag) or ``allow_tf32`` (reading the legacy flag after the new API was
    used raises in torch, so the new one is read first)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def term_precision(pq_dtype, out_dtype, block_r=16):
    """DOT_PRECISION of a LoRA term h B^T or G A (fp32 operands with fp32 adapters)
    added onto a 16-bit output: Triton's "tf32x3" (three TF32 products, about 2^-21
    relative per product, far below the output's rounding: 2^-9 bf16, 2^-11 fp16)
    where ``mixed_precision`` would split, else what it would pick; onto an fp32
    output ``dot_precision``. Rank blocks past 16 stay IEEE: their tf32x3 builds keep
    registers in the stack frame (120-304 bytes a thread at 32, sm_90)."""
    if pq_dtype != torch.float32 or out_dtype == torch.float32 or block_r > 16:
        return dot_precision(pq_dtype)
    precision = mixed_precision(torch.float32, out_dtype)
    return "tf32x3" if precision == "split" else precision


def mixed_precision(*dtypes):
    """DOT_PRECISION of a rank product over operands of ``dtypes`` (a 16-bit x or dY
    with fp32 adapters, h or G): "split" (tensor-core products as accurate as fp32,
    ``mixed_mma``) unless torch is told otherwise: TF32 allowed -> "tf32";
    ``torch.backends.cuda.matmul.fp32_precision = "ieee"`` -> "ieee" (FMA products).
    Operands of one dtype: ``dot_precision``."""
    if len(set(dtypes)) == 1 or torch.float32 not in dtypes:
        return dot_precision(dtypes[0])
    if tf32_allowed():
        return "tf32"
    if getattr(torch.backends.cuda.matmul, "fp32_precision", "none") == "ieee":
        return "ieee"
    return "split"


def empty(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


# Answers of the GPU, cached per device index: threads filling one at once
# write the same value.
_SM_COUNT = {}


def target_programs(device):
    """How many programs keep the whole device busy (queried on first use)."""
    if INTERPRET or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


_CAPABILITY = {}


def tma_supported(device):
    """Whether the GPU has the Tensor Memory Accelerator (sm_90 and later) and the
    installed Triton takes host tensor descriptors; capability queried on first use."""
    if device.type != "cuda" or TensorDescriptor is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index] >= (9, 0)


def tma_ready(t):
    """Whether a 2-D tensor can back a TMA descriptor as laid out: unit stride
    along its last dim, the other stride and the base 16-byte aligned, no empty
    dim, rows that do not overlap (a descriptor's row stride is at least a row:
    an expanded tensor's stride 0 is not)."""
    return (t.dim() == 2 and t.shape[0] > 0 and t.shape[1] > 0 and t.stride(1) == 1
            and t.stride(0) >= t.shape[1]
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


# Pipelined operand tiles and the epilogue's tiles may use this much shared
# memory: sm_80 has 163 KiB per block (sm_90 227 KiB); the rest is left to the
# compiler's layout changes.
SHARED_MEMORY_BUDGET = 144 * 1024


def fit_stages(cfg, stage_bytes, fixed_bytes=0, min_stages=2):
    """``cfg`` with as many of its stages as fit the budget next to
    ``fixed_bytes`` (never fewer than ``min_stages``)."""
    stages = cfg.num_stages
    while stages > min_stages and stages * stage_bytes + fixed_bytes > SHARED_MEMORY_BUDGET:
        stages -= 1
    return replace(cfg, num_stages=stages)


def lora_dtype(*tensors):
    """The dtype the rank products run in: torch's promotion of x and the
    adapters (fp32 adapters on a 16-bit base compute in fp32, as PEFT does)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
