"""Pieces shared by every lorakern kernel: dtype handling, the dropout mask, the
tile-config table and small launcher helpers.

Dropout mask
------------
Element (m, k) of the LoRA input is kept when ``uniform(seed, m, k) >= p``. The
uniform number comes from Philox with the column in counter 0 and the row in
counter 1, so the mask is a pure function of (seed, m, k): the forward kernel
and the backward kernels regenerate exactly the same mask and nothing is
stored. Two 32-bit counters cover any M*K without 64-bit Philox arithmetic.
"""
import os
from collections import Counter
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

# Decided once, like the @triton.jit decorations of this package: the
# interpreter mode of a kernel cannot change after it has been decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Number of launches per kernel name: lets tests prove a kernel really ran.
launch_counts = Counter()

# When true, every output buffer is filled with NaN before a kernel writes it,
# so an element a kernel forgot to write cannot pass a test by luck.
POISON_OUTPUTS = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def dropout_keep(seed, rows, cols, dropout_p):
    """Boolean keep-mask for the broadcast of ``rows`` and ``cols`` (int32 indices)."""
    c0 = (cols + rows * 0).to(tl.uint32)
    c1 = (rows + cols * 0).to(tl.uint32)
    zero = c0 * 0
    bits, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(bits) >= dropout_p


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


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def rank_block(rank):
    """Rank padded to a power of two, at least 16 because ``tl.dot`` needs it."""
    return max(16, triton.next_power_of_2(rank))


def dot_precision(dtype):
    """fp32 operands follow torch's TF32 switch, as nn.Linear does on CUDA."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def empty(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


_SM_COUNT = {}


def target_programs(device):
    """How many programs keep the whole device busy (queried on first use)."""
    if INTERPRET or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


# Tile configs of the two row-block GEMMs (forward, grad-input): a tile of
# BLOCK_M rows x BLOCK_N output columns, reducing over BLOCK_K, plus an
# (BLOCK_M x BLOCK_R) rank accumulator. Keyed on the token count M and on the
# rank block, then fitted to shared memory for the operand dtypes. Every config
# the launchers can pick is compiled for sm_80 and sm_90 in the test suite.
ROW_GEMM_INTERPRET = TileConfig(16, 32, 32, num_warps=1, num_stages=1, group_m=2)
ROW_GEMM_DECODE = TileConfig(16, 32, 128, num_warps=4, num_stages=4)
ROW_GEMM_SMALL_M = TileConfig(64, 64, 64, num_warps=4, num_stages=4)
ROW_GEMM_LARGE_M = TileConfig(128, 128, 64, num_warps=8, num_stages=3)
# Ranks of 128 and more: a 128-row rank accumulator next to a 128x128 output
# accumulator would spill registers, so the row block halves.
ROW_GEMM_LARGE_M_WIDE_RANK = TileConfig(64, 128, 32, num_warps=8, num_stages=3)

# Pipelined operand tiles may use this much shared memory: sm_80 has 163 KiB
# per block (sm_90 227 KiB); the rest is left to the epilogue's layout changes.
SHARED_MEMORY_BUDGET = 144 * 1024
RANK_BLOCKS = (16, 32, 64, 128, 256)


def row_gemm_stage_bytes(cfg, block_r, x_bytes, adapter_bytes):
    """Shared memory of one pipeline stage, the larger of the two kernels':
    forward streams x, W^T and A^T tiles over K; grad-input streams dY, W and B
    tiles over N (its BLOCK_N is the reduction)."""
    forward = ((cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * x_bytes
               + cfg.block_k * block_r * adapter_bytes)
    grad_input = ((cfg.block_m * cfg.block_n + cfg.block_n * cfg.block_k) * x_bytes
                  + cfg.block_n * block_r * adapter_bytes)
    return max(forward, grad_input)


def fit_shared_memory(cfg, block_r, x_bytes, adapter_bytes):
    """Fewer stages, then smaller tiles (the larger of BLOCK_K and BLOCK_N
    first, then BLOCK_M), until the pipeline stages fit the budget."""
    def fits(c):
        stage = row_gemm_stage_bytes(c, block_r, x_bytes, adapter_bytes)
        return c.num_stages * stage <= SHARED_MEMORY_BUDGET
    while not fits(cfg) and cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while not fits(cfg) and max(cfg.block_k, cfg.block_n) > 32:
        if cfg.block_k >= cfg.block_n:
            cfg = replace(cfg, block_k=cfg.block_k // 2)
        else:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
    while not fits(cfg) and cfg.block_m > 16:
        cfg = replace(cfg, block_m=cfg.block_m // 2)
    return cfg


def row_gemm_config(m, block_r, x_bytes, adapter_bytes):
    if INTERPRET:
        return ROW_GEMM_INTERPRET
    return row_gemm_config_gpu(m, block_r, x_bytes, adapter_bytes)


def row_gemm_config_gpu(m, block_r, x_bytes, adapter_bytes):
    if m <= 16:
        cfg = ROW_GEMM_DECODE
    elif m <= 128:
        cfg = ROW_GEMM_SMALL_M
    elif block_r >= 128:
        cfg = ROW_GEMM_LARGE_M_WIDE_RANK
    else:
        cfg = ROW_GEMM_LARGE_M
    return fit_shared_memory(cfg, block_r, x_bytes, adapter_bytes)


def row_gemm_candidates(x_bytes, adapter_bytes):
    """Every (config, rank block) pair the launchers can pick on a GPU for
    operands of these element sizes."""
    pairs = {(row_gemm_config_gpu(m, block_r, x_bytes, adapter_bytes), block_r)
             for block_r in RANK_BLOCKS for m in (1, 128, 8192)}
    return sorted(pairs, key=repr)
