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
    # sequences, r = 16, bf16, with and without dropout (18 cases)
    "quick": dict(shapes=("4096x4096", "4096x14336", "14336x4096"), tokens=(16, 2048, 8192),
                  ranks=(16,), dtypes=("bf16",), dropout=(0.0, 0.1)),
    # everything in the grid (480 cases; peft-compile compiles anew for each)
    "full": dict(shapes=tuple(SHAPES), tokens=TOKENS, ranks=RANKS, dtypes=("bf16", "fp16"),
                 dropout=(0.0, 0.1)),
    # the Llama-3-8B MLP projections (gate/up and down) at mid to long sequences
    "llama-mlp": dict(shapes=("4096x14336", "14336x4096"), tokens=(2048, 8192, 16384),
                      ranks=(16,), dtypes=("bf16",), dropout=(0.0, 0.1)),
    # the default without CUDA: small enough for CI on two CPU cores
    "cpu-smoke": dict(shapes=("512x768",), tokens=(64, 256), ranks=(8,),
                      dtypes=("fp32", "bf16"), dropout=(0.0, 0.1)),
}


@dataclass(frozen=True)
class Case:
    d_in: int
    d_out: int
    tokens: int
    rank: int
    dtype: str
    dropout: float

    @property
    def shape(self):
        return f"{self.d_in}x{self.d_out}"

    @property
    def scale(self):
        return float(ALPHA_OVER_R)

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    def __str__(self):
        return f"{self.shape} M={self.tokens} r={self.rank} {self.dtype} p={self.dropout:g}"


def parse_shape(text):
    """'4096x14336' -> (4096, 14336)."""
    try:
        d_in, d_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: expected INxOUT, e.g. 4096x14336") from None
    return d_in, d_out


def make_cases(shapes, tokens, ranks, dtypes, dropout):
    """The grid, in a stable order (shape, dtype, rank, dropout, tokens)."""
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cases = []
    for shape, dtype, rank, p, m in itertools.product(shapes, dtypes, ranks, dropout, tokens):
        d_in, d_out = parse_shape(shape)
        cases.append(Case(d_in, d_out, int(m), int(rank), dtype, float(p)))
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

    def tensors(self):
        return [self.x, self.weight, self.lora_A, self.lora_B, self.grad_y]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())


def make_inputs(case, device, seed=0):
    """Random inputs in the case's dtype (adapters too), B nonzero so the
    adapter's contribution is real."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0, grad=False):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std
        return t.to(case.torch_dtype).requires_grad_(grad)

    return LayerInputs(
        x=randn(case.tokens, case.d_in, grad=True),
        weight=randn(case.d_out, case.d_in, std=case.d_in**-0.5),
        lora_A=randn(case.rank, case.d_in, std=case.d_in**-0.5, grad=True),
        lora_B=randn(case.d_out, case.rank, std=case.rank**-0.5, grad=True),
        grad_y=randn(case.tokens, case.d_out),
    )
