"""What is benchmarked: layer shapes, token counts, ranks, dtypes, dropout,
the named presets, and the inputs of one case.

A shape is ``INxOUT`` (in_features x out_features), e.g. ``4096x14336``.
"""
import itertools
from dataclasses import dataclass

import torch

# in_features x out_features of the Llama-3-8B projections, and a square 8192
SHAPES = {
    "4096x4096": "Llama-3-8B q_proj / o_proj",
    "4096x1024": "Llama-3-8B k_proj / v_proj",
    "4096x14336": "Llama-3-8B gate_proj / up_proj",
    "14336x4096": "Llama-3-8B down_proj",
    "8192x8192": "square 8192",
}
TOKENS = (1, 16, 128, 2048, 8192, 16384)
RANKS = (8, 16, 64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("forward", "fwd+bwd", "backward")

# every scale is alpha / r with alpha = 2 r, PEFT's most common choice
ALPHA_OVER_R = 2

PRESETS = {
    # the default on a GPU: the largest Llama projections at short, mid and long
    # sequences, r = 16, bf16, with and without dropout, fp32 adapters (PEFT's
    # default) and adapters in the base dtype (36 cases)
    "quick": dict(shapes=("4096x4096", "4096x14336", "14336x4096"), tokens=(16, 2048, 8192),
                  ranks=(16,), dtypes=("bf16",), dropout=(0.0, 0.1),
                  adapter_dtypes=("fp32", "base")),
    # everything in the grid (480 cases; peft-compile compiles anew for each)
    "full": dict(shapes=tuple(SHAPES), tokens=TOKENS, ranks=RANKS, dtypes=("bf16", "fp16"),
                 dropout=(0.0, 0.1), adapter_dtypes=("fp32",)),
    # the Llama-3-8B MLP projections (gate/up and down) at mid to long sequences
    "llama-mlp": dict(shapes=("4096x14336", "14336x4096"), tokens=(2048, 8192, 16384),
                      ranks=(16,), dtypes=("bf16",), dropout=(0.0, 0.1),
                      adapter_dtypes=("fp32",)),
    # the default without CUDA: small enough for CI on two CPU cores
    "cpu-smoke": dict(shapes=("512x768",), tokens=(64, 256), ranks=(8,),
                      dtypes=("fp32", "bf16"), dropout=(0.0, 0.1),
                      adapter_dtypes=("fp32", "base")),
}


@dataclass(frozen=True)
class Case:
    d_in: int
    d_out: int
    tokens: int
    rank: int
    dtype: str
    dropout: float
    adapter_dtype: str = "base"  # "fp32" (PEFT's default) or "base" (the layer's dtype)

    @property
    def shape(self):
        return f"{self.d_in}x{self.d_out}"

    @property
    def scale(self):
        return float(ALPHA_OVER_R)

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def adapter_torch_dtype(self):
        return torch.float32 if self.adapter_dtype == "fp32" else self.torch_dtype

    @property
    def adapter_label(self):
        """The records' "adapter_dtype": fp32 adapters on a 16-bit base are "fp32",
        on an fp32 base "fp32-base"; adapters in a 16-bit base's dtype that dtype."""
        return adapter_label(self.dtype, self.adapter_dtype)

    def __str__(self):
        return (f"{self.shape} M={self.tokens} r={self.rank} {self.dtype} p={self.dropout:g}"
                f" adapters={self.adapter_label}")


ADAPTER_DTYPES = ("fp32", "base")


def adapter_label(dtype, adapter_dtype):
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter dtype {adapter_dtype!r}: expected one of "
                         f"{', '.join(ADAPTER_DTYPES)}")
    if dtype == "fp32":
        return "fp32-base"
    return "fp32" if adapter_dtype == "fp32" else dtype


def parse_shape(text):
    """'4096x14336' -> (4096, 14336)."""
    try:
        d_in, d_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: expected INxOUT, e.g. 4096x14336") from None
    return d_in, d_out


def make_cases(shapes, tokens, ranks, dtypes, dropout, adapter_dtypes=("fp32",)):
    """The grid, in a stable order (shape, dtype, adapter dtype, rank, dropout, tokens).
    An fp32 base has one adapter dtype: "fp32" and "base" are the same case there."""
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cases, seen = [], set()
    for shape, dtype, adapters, rank, p, m in itertools.product(
            shapes, dtypes, adapter_dtypes, ranks, dropout, tokens):
        d_in, d_out = parse_shape(shape)
        case = Case(d_in, d_out, int(m), int(rank), dtype, float(p),
                    "base" if dtype == "fp32" else adapters)
        adapter_label(dtype, adapters)  # a bad adapter dtype is named
        if case not in seen:
            seen.add(case)
            cases.append(case)
    return cases


@dataclass
class LayerInputs:
    """One set of inputs: x [M, in] and lora_A [r, in], lora_B [out, r] need
    grad; weight [out, in] is frozen; grad_y [M, out] is the incoming gradient."""
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    grad_y: torch.Tensor
    bias: torch.Tensor = None  # trained, when the case has one

    def tensors(self):
        return [t for t in (self.x, self.weight, self.lora_A, self.lora_B, self.grad_y,
                            self.bias) if t is not None]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())


def make_inputs(case, device, seed=0, bias=False):
    """Random inputs in the case's dtype (adapters in the case's adapter dtype),
    B nonzero so the adapter's contribution is real; with ``bias`` a trained bias."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0, grad=False, dtype=case.torch_dtype):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std
        return t.to(dtype).requires_grad_(grad)

    adapters = case.adapter_torch_dtype
    return LayerInputs(
        x=randn(case.tokens, case.d_in, grad=True),
        weight=randn(case.d_out, case.d_in, std=case.d_in**-0.5),
        lora_A=randn(case.rank, case.d_in, std=case.d_in**-0.5, grad=True, dtype=adapters),
        lora_B=randn(case.d_out, case.rank, std=case.rank**-0.5, grad=True, dtype=adapters),
        grad_y=randn(case.tokens, case.d_out),
        # a Parameter, so that every provider's module holds this very tensor
        bias=torch.nn.Parameter(randn(case.d_out, std=0.1)) if bias else None,
    )
