"""The provider table: every way a user could compute the same LoRA linear.

Each provider builds a ``Layer`` from one set of ``LayerInputs`` (sharing
their storage: every provider reads the very same tensors) and a ``Case``.
"""
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

import lorakern
from lorakern.functional import dispatch

from .cases import ALPHA_OVER_R, MODES
from .composition import addmm_lora


def installed(module):
    """Whether ``module`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class Layer:
    forward: Callable[[torch.Tensor], torch.Tensor]
    trainable: List[torch.Tensor] = field(default_factory=list)  # .grad reset between calls
    # the fp32 output the forward is checked against; None: lorakern's LoRA reference
    reference: Optional[Callable[[], torch.Tensor]] = None
    # tensors alive anyway beside the inputs (a quantised base): not saved-tensor bytes
    inputs: List[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    build: Callable  # (LayerInputs, Case) -> Layer
    adapter: bool = True           # computes the LoRA branch (False: the floor)
    modes: Tuple[str, ...] = MODES
    dropout: bool = True           # can apply dropout > 0
    requires: Tuple[str, ...] = ()
    compiled: bool = False
    strategy: Optional[str] = None  # lorakern's, forced while built and timed

    def environment(self):
        return dispatch.strategy_forced(self.strategy)

    def unavailable(self):
        """Why this provider cannot run here, or None."""
        missing = [m for m in self.requires if not installed(m)]
        return f"needs {', '.join(missing)} (not installed)" if missing else None

    def runs(self, case, mode):
        return mode in self.modes and (self.dropout or case.dropout == 0.0)


def _frozen_linear(weight, bias=None):
    """An nn.Linear whose frozen weight *is* ``weight`` and whose trained bias *is*
    ``bias`` (no copies; no bias when None)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return linear


def _bias(t):
    """The trained bias, as a list of trainables (empty without one)."""
    return [] if t.bias is None else [t.bias]


class _Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def _peft_layer(t, case):
    """PEFT's own LoRA Linear as ``get_peft_model`` builds it by default for the
    case's adapter dtype (``autocast_adapter_dtype=True``, its default, makes fp32
    adapters on a 16-bit base; False keeps them in the base dtype), its weights
    replaced by the shared inputs (which have that dtype). A bias trains, as in
    every other provider."""
    import peft
    # bias="all": PEFT's own switch for a trained bias (the default freezes it)
    config = peft.LoraConfig(r=case.rank, lora_alpha=ALPHA_OVER_R * case.rank,
                             lora_dropout=case.dropout, target_modules=["proj"],
                             bias="none" if t.bias is None else "all")
    model = peft.get_peft_model(_Holder(_frozen_linear(t.weight, t.bias)), config,
                                autocast_adapter_dtype=case.adapter_dtype == "fp32")
    layer = model.base_model.model.proj
    layer.lora_A["default"].weight = nn.Parameter(t.lora_A)
    layer.lora_B["default"].weight = nn.Parameter(t.lora_B)
    assert layer.scaling["default"] == case.scale, (layer.scaling, case.scale)
    return layer.train()


def build_linear(t, case):
    return Layer(_frozen_linear(t.weight, t.bias), _bias(t))


def build_peft(t, case):
    layer = _peft_layer(t, case)
    return Layer(layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
                 + _bias(t))


def build_peft_compiled(t, case):
    eager = build_peft(t, case)
    return Layer(torch.compile(eager.forward, dynamic=False), eager.trainable)


def build_addmm(t, case):
    return Layer(lambda x: addmm_lora(x, t.weight, t.lora_A, t.lora_B, case.scale, t.bias,
                                      case.dropout), [t.lora_A, t.lora_B] + _bias(t))


def build_merged(t, case):
    with torch.no_grad():
        delta = case.scale * (t.lora_B.float() @ t.lora_A.float())
        merged = (t.weight.float() + delta).to(t.weight.dtype)
    return Layer(_frozen_linear(merged, t.bias), _bias(t))


def build_lorakern(t, case):
    return Layer(lambda x: lorakern.lora_linear(x, t.weight, t.lora_A, t.lora_B, case.scale,
                                                t.bias, case.dropout),
                 [t.lora_A, t.lora_B] + _bias(t))


PROVIDERS = {p.name: p for p in [
    Provider("linear", "nn.Linear alone, W frozen: the floor (no adapter)", build_linear,
             adapter=False),
    Provider("peft", "PEFT LoRA Linear, eager", build_peft, requires=("peft",)),
    Provider("peft-compile", "PEFT LoRA Linear under torch.compile", build_peft_compiled,
             requires=("peft",), compiled=True),
    Provider("addmm", "cuBLAS composition: out.addmm_(x@Aᵀ, Bᵀ), hand-written backward",
             build_addmm),
    Provider("merged", "W + s·B·A merged once: inference forward only", build_merged,
             modes=("forward",), dropout=False),
    Provider("lorakern", "lorakern.lora_linear, strategy chosen by its tuner (the default)",
             build_lorakern, strategy="auto"),
    Provider("lorakern:fused", "lorakern.lora_linear, LORAKERN_STRATEGY=fused: Triton GEMMs "
             "with the LoRA term inside", build_lorakern, strategy="fused"),
    Provider("lorakern:cublas", "lorakern.lora_linear, LORAKERN_STRATEGY=cublas: torch's "
             "matmul onto the LoRA term", build_lorakern, strategy="cublas"),
]}


def lorakern_path(device, dtype):
    """What computes lorakern.lora_linear here, as its dispatch point decides:
    'triton' (compiled kernels), 'triton-interpreter' or 'reference'."""
    x = torch.empty(1, 1, device=device, dtype=dtype)
    backend = dispatch.select_backend(x, x, x, x)
    return "triton-interpreter" if backend == "triton" and x.device.type != "cuda" else backend


def compute_path(provider, t):
    """lorakern_path for lorakern; 'torch' or 'torch.compile' for the others."""
    if provider.name.startswith("lorakern"):
        return lorakern_path(t.x.device, t.x.dtype)
    return "torch.compile" if provider.compiled else "torch"
