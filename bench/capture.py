"""Record every launch lorakern's forward and backward make, without running one.

``lorakern.functional.fused_linear.fused_forward`` / ``fused_backward`` hold the launch
sequence; here they run on *meta* tensors of the real shapes (no memory, no
arithmetic) while ``JITFunction.run`` is replaced by a recorder. The recorder
binds the arguments with Triton's own binder for the target GPU, so each
record carries exactly the signature, constexprs, specialization attributes
(pointers and sizes divisible by 16, unit strides folded to constants) and
options a real launch on aligned contiguous tensors would compile. The torch
operations the launchers run between kernels (the sums of split partials, for
one) are recorded too, through a ``TorchDispatchMode``.

New kernels, launchers and configs are followed without a change here: nothing
names a kernel. This module must run without ``TRITON_INTERPRET`` (an
interpreted kernel cannot be compiled).
"""
import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SM_COUNT = {90: 132, 80: 108}  # H100 SXM, A100: the grids of a real launch use them


@dataclass
class KernelLaunch:
    """One Triton launch: what it compiles and how many programs it starts."""
    fn: object                      # the JITFunction
    name: str
    signature: dict
    constexprs: dict                # argument path (a tuple) -> value, as triton keys them
    attrs: dict
    options: dict                   # the backend's parsed options (num_warps, ...)
    grid: tuple
    tensors: dict = field(default_factory=dict)  # argument name -> (key, bytes)
    ints: dict = field(default_factory=dict)     # integer arguments by name (sizes, strides)
    launcher: str = ""                           # the Python function that launched it

    @property
    def programs(self):
        total = 1
        for g in self.grid:
            total *= g
        return total

    @property
    def meta(self):
        """The constexprs by argument name (specialized unit strides included)."""
        names = self.fn.arg_names
        return {names[path[0]]: value for path, value in self.constexprs.items()
                if len(path) == 1}

    def compile_key(self):
        return (self.name, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items(), key=repr)),
                repr(sorted(self.attrs.items(), key=repr)),
                repr(sorted(self.options.items(), key=repr)))


@dataclass
class TorchOp:
    """A torch operation run by a launcher (on the GPU: one kernel, memory-bound
    but for the matmuls of the cublas strategy, which ``shapes`` lets be priced)."""
    name: str
    read_bytes: int
    write_bytes: int
    shapes: tuple = ()  # of the tensor arguments, in order


def _tensor_key(t):
    base = t._base if t._base is not None else t
    return id(base)


def _nbytes(t):
    return t.numel() * t.element_size()


class _TorchOpRecorder(TorchDispatchMode):
    """Records aten ops that move data; views and allocations are free."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        name = schema.name.split("::")[-1]
        views = any(r.alias_info is not None and not r.alias_info.is_write
                    for r in schema.returns)
        moves_data = any(isinstance(o, torch.Tensor) for o in torch.utils._pytree.tree_leaves(out))
        if moves_data and not views and not name.startswith(("empty", "new_empty")):
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)]
            outputs = [o for o in torch.utils._pytree.tree_leaves(out)
                       if isinstance(o, torch.Tensor)]
            written = {id(o) for o in outputs}
            read = sum(_nbytes(a) for a in inputs if id(a) not in written)
            self.sink.append(TorchOp(name, read, sum(_nbytes(o) for o in outputs),
                                     tuple(tuple(a.shape) for a in inputs)))
        return out


def _launch_recorder(arch, sink):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders = {}

    def run(self, *args, grid, warmup, **kwargs):
        # frame 1 is the lambda that ``kernel[grid]`` returns; frame 2 the launcher
        launcher = sys._getframe(2).f_code.co_name
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound, specialization, options)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        # a TMA descriptor reads the tensor it describes
        operands = {name: getattr(v, "base", v) for name, v in bound.items()}
        tensors = {name: (_tensor_key(v), _nbytes(v)) for name, v in operands.items()
                   if isinstance(v, torch.Tensor)}
        ints = {name: v for name, v in bound.items()
                if isinstance(v, int) and not isinstance(v, bool)}
        sink.append(KernelLaunch(self, self.fn.__name__, signature, constexprs, attrs,
                                 dict(options.__dict__), grid, tensors, ints, launcher))
        return None

    return run


@contextlib.contextmanager
def recording(arch):
    """Inside: Triton launches and torch ops are appended to the yielded list
    instead of running, and the launchers size their grids for ``arch``'s SM count."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("bench.capture needs TRITON_INTERPRET unset: interpreted kernels "
                           "cannot be compiled")
    if arch not in SM_COUNT:
        raise ValueError(f"arch {arch!r}: expected one of {sorted(SM_COUNT)}")
    from triton.runtime.jit import JITFunction

    import lorakern.kernels  # noqa: F401  (decorated now, without the interpreter)

    from lorakern.kernels._common import arrival_counters

    # the steady state: the kept counter buffer of the in-launch sums exists (its one
    # zeroing, at a process's first backward, is not a per-step cost)
    arrival_counters(1 << 16, torch.device("meta"))
    sink = []
    original_run = JITFunction.run
    patched = _patch_target_programs(2 * SM_COUNT[arch])
    # the launchers ask the GPU whether it has TMA: the target arch answers
    from lorakern.kernels import _common
    patched.append((_common, "tma_supported", _common.tma_supported))
    _common.tma_supported = lambda device, _tma=arch >= 90: _tma and \
        _common.TensorDescriptor is not None
    JITFunction.run = _launch_recorder(arch, sink)
    try:
        with _TorchOpRecorder(sink):
            yield sink
    finally:
        JITFunction.run = original_run
        for module, name, value in patched:
            setattr(module, name, value)


def _patch_target_programs(programs):
    """Every module of lorakern.kernels that imported ``target_programs`` sees
    the target GPU's count (the launchers query the SM count only on CUDA)."""
    from lorakern.kernels import _common

    original = _common.target_programs
    patched = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("lorakern.kernels") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                patched.append((module, attr, value))
                setattr(module, attr, lambda device, _n=programs: _n)
    return patched


def layer_tensors(case, device="meta"):
    """The training case's tensors on ``device``: W frozen, bias trained, adapters
    in the case's adapter dtype."""
    dtype, adapters = case.torch_dtype, case.adapter_torch_dtype
    return dict(x=torch.empty(case.tokens, case.d_in, dtype=dtype, device=device),
                weight=torch.empty(case.d_out, case.d_in, dtype=dtype, device=device),
                lora_A=torch.empty(case.rank, case.d_in, dtype=adapters, device=device),
                lora_B=torch.empty(case.d_out, case.rank, dtype=adapters, device=device),
                bias=torch.empty(case.d_out, dtype=dtype, device=device),
                grad_y=torch.empty(case.tokens, case.d_out, dtype=dtype, device=device))


# dX, dW, dA, dB, db: the frozen-base training case
TRAINING_NEEDS = (True, False, True, True, True)
SEED = 1234


def capture_case(case, arch, strategy=None):
    """{'fwd': [...], 'bwd': [...]}: the launches and torch ops of one case, in
    ``strategy`` ('fused' or 'cublas'; None: the dispatch point's choice)."""
    from lorakern.functional.dispatch import strategy_forced

    with strategy_forced(strategy):
        return _capture_case(case, arch)


def _capture_case(case, arch):
    from lorakern.functional.fused_linear import fused_backward, fused_forward

    t = layer_tensors(case)
    seed = SEED if case.dropout > 0 else 0
    with recording(arch) as fwd:
        _, h = fused_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"],
                             case.scale, case.dropout, seed)
    with recording(arch) as bwd:
        fused_backward(t["grad_y"], t["x"], t["weight"], t["lora_A"], t["lora_B"], h,
                       case.scale, case.dropout, seed, TRAINING_NEEDS)
    return {"fwd": fwd, "bwd": bwd}
