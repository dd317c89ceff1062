"""The fused GEMM's TMA build: on sm_90 and later, with 16-bit operands that TMA
descriptors can describe (unit-stride rows, 16-byte aligned row strides and
bases), the forward's y and the backward's dX read x (dY) and W through tensor
descriptors. Everything else takes the pointer build, which the tuner also
times.

Off a GPU the interpreter runs the TMA kernel: ``tma_supported`` is switched on
for CPU tensors here, as a Hopper GPU answers it. On a GPU without TMA these
tests are skipped; the oracle cases of test_fused_kernels.py cover that GPU.
"""
import importlib

import pytest
import torch

from lorakern import kernels
from lorakern.functional import autotune, dispatch
from lorakern.kernels import _common
from test_fused_kernels import make_layer, run_and_check

# the module (lorakern.kernels exports its launcher under the same name)
gemm_module = importlib.import_module("lorakern.kernels.lora_gemm")
TMA_KERNEL = "lora_gemm_tma"


@pytest.fixture
def tma_gpu(device, monkeypatch):
    """The fused strategy on a GPU with TMA (or the interpreter playing one)."""
    if device.type == "cuda":
        if not _common.tma_supported(device):
            pytest.skip("this GPU has no TMA")
    else:
        monkeypatch.setattr(_common, "tma_supported", lambda device: True)
    monkeypatch.setenv("LORAKERN_STRATEGY", "fused")
    monkeypatch.setenv("LORAKERN_AUTOTUNE", "0")  # the table's choice, not the tuner's


def _tma_launches(step):
    before = kernels.launch_counts[TMA_KERNEL], kernels.launch_counts["lora_gemm"]
    step()
    return (kernels.launch_counts[TMA_KERNEL] - before[0],
            kernels.launch_counts["lora_gemm"] - before[1])


# (leading dims, in, out, rank, bias, dropout, dtype, adapter dtype, W trained): in and
# out multiples of 8 (16-byte rows in a 16-bit dtype); M past 128 (where a GPU's table
# takes the large tile) and not a multiple of any tile; ranks below 16 and not powers
# of two, and past one epilogue chunk
ALIGNED = [
    ((150,), 40, 24, 5, True, 0.0, torch.bfloat16, None, False),
    ((3, 50), 64, 48, 16, True, 0.3, torch.float16, None, False),
    ((200,), 24, 40, 100, False, 0.1, torch.bfloat16, None, False),
    ((137,), 32, 16, 3, True, 0.2, torch.float16, torch.float32, False),
    ((129,), 48, 32, 8, True, 0.1, torch.bfloat16, None, True),
]


@pytest.mark.parametrize("lead,k,n,r,bias,dropout_p,dtype,adapter_dtype,train_weight",
                         ALIGNED, ids=lambda v: str(v).replace(" ", ""))
def test_aligned_layers_run_y_and_dx_through_tma_and_match_the_float64_oracle(
        lead, k, n, r, bias, dropout_p, dtype, adapter_dtype, train_weight, device,
        monkeypatch, tma_gpu):
    layer = make_layer(lead, k, n, r, dtype, device, bias=bias, adapter_dtype=adapter_dtype,
                       train_weight=train_weight)
    tma, gemms = _tma_launches(
        lambda: run_and_check(layer, 0.75, dropout_p, "contiguous", dtype, monkeypatch))
    assert (tma, gemms) == (2, 2)


@pytest.mark.parametrize("k,x_layout,grad_layout,tma_launches", [
    (19, "contiguous", "contiguous", 0),   # 38-byte rows of x and W: no descriptor
    (40, "offset", "contiguous", 1),       # x 2 bytes past a 16-byte boundary: the forward
    (40, "sliced", "transposed", 2),       # copied to contiguous rows first: TMA reads both
])
def test_operands_tma_cannot_describe_take_the_pointer_gemm(
        k, x_layout, grad_layout, tma_launches, device, monkeypatch, tma_gpu):
    dtype = torch.bfloat16
    layer = make_layer((140,), k, 24, 6, dtype, device)
    wide = torch.randn(140, 2 * k, dtype=dtype, device=device)
    if x_layout == "sliced":  # every other column of a wider bf16 tensor
        layer["x"] = wide[:, ::2].requires_grad_()
    elif x_layout == "offset":  # unit stride, but the rows start one element in
        layer["x"] = wide[:, 1:k + 1].requires_grad_()
    tma, gemms = _tma_launches(
        lambda: run_and_check(layer, 1.5, 0.2, grad_layout, dtype, monkeypatch))
    assert (tma, gemms) == (tma_launches, 2)


def test_fp32_layers_and_decode_keep_the_pointer_gemm(device, monkeypatch, tma_gpu):
    fp32 = make_layer((140,), 32, 24, 4, torch.float32, device)
    assert _tma_launches(lambda: run_and_check(fp32, 1.0, 0.1, "contiguous", torch.float32,
                                               monkeypatch)) == (0, 2)
    decode = make_layer((gemm_module.DECODE_M,), 32, 24, 4, torch.float16, device)
    assert _tma_launches(lambda: run_and_check(decode, 1.0, 0.1, "contiguous", torch.float16,
                                               monkeypatch)) == (0, 2)


def test_rows_that_overlap_are_not_described_by_tma(device):
    """A descriptor's row stride must cover a row: an x expanded over its rows
    (stride 0) goes to the pointer build."""
    lhs = torch.randn(1, 64, dtype=torch.bfloat16, device=device).expand(32, 64)
    w = torch.randn(48, 64, dtype=torch.bfloat16, device=device)
    assert gemm_module.tma_operands(lhs, w.t()) is None
    assert gemm_module.tma_operands(lhs.contiguous(), w.t())[1] is True


def test_a_tma_config_on_operands_it_cannot_describe_is_refused_before_any_launch(device):
    lhs = torch.randn(20, 19, dtype=torch.float16, device=device)
    rhs_t = torch.randn(19, 24, dtype=torch.float16, device=device)
    p, q = torch.randn(20, 4, dtype=torch.float16), torch.randn(4, 24, dtype=torch.float16)
    tma_config = gemm_module.lora_gemm_tuning_configs(64, 2, 16, 2, tma=True)[0]
    assert tma_config.tma
    before = sum(kernels.launch_counts.values())
    with pytest.raises(ValueError, match=r"TMA needs .*lhs \(20, 19\) strides \(19, 1\)"):
        gemm_module.lora_gemm(lhs, rhs_t, p.to(device), q.to(device), None, 1.0,
                              config=tma_config)
    assert sum(kernels.launch_counts.values()) == before


def test_tma_builds_lead_the_fused_plans_only_where_the_gpu_has_tma(device, monkeypatch):
    x = torch.empty(8192, 64, dtype=torch.bfloat16, device=device)
    weight = torch.empty(48, 64, dtype=torch.bfloat16, device=device)
    adapters = (torch.empty(8, 64, dtype=torch.bfloat16, device=device),
                torch.empty(48, 8, dtype=torch.bfloat16, device=device))

    def fused_names():
        return [plan.name for plan in kernels.layer_plans(8192, x, *adapters, weight)
                if plan.strategy == "fused"]

    monkeypatch.setattr(_common, "tma_supported", lambda device: False)
    without = fused_names()
    assert not any(name.endswith(":tma") for name in without)
    monkeypatch.setattr(_common, "tma_supported", lambda device: True)
    with_tma = fused_names()
    assert with_tma[0].endswith(":tma")
    # the pointer build of every tile stays a candidate for the tuner
    assert set(without) <= set(with_tma)


def test_aligned_and_unaligned_calls_keep_separate_tuning_choices(device, monkeypatch):
    """The tuning key says whether the TMA builds were candidates, so a cached
    choice of a TMA plan is never looked up for operands TMA cannot read."""
    monkeypatch.setattr(_common, "tma_supported", lambda device: True)
    keys = []
    monkeypatch.setattr(dispatch, "tunes_on", lambda device: True)
    monkeypatch.setattr(autotune, "choose",
                        lambda key, candidates, heuristic: keys.append(key) or heuristic)
    monkeypatch.delenv("LORAKERN_STRATEGY", raising=False)
    weight = torch.empty(24, 40, dtype=torch.float16, device=device)
    adapters = (torch.empty(4, 40, dtype=torch.float16, device=device),
                torch.empty(24, 4, dtype=torch.float16, device=device))
    aligned = torch.empty(300, 40, dtype=torch.float16, device=device)
    sliced = torch.empty(300, 80, dtype=torch.float16, device=device)[:, ::2]
    for x in (aligned, sliced):
        dispatch.choose_plan("forward", kernels, x, weight, *adapters, 0.0, run=None)
    assert [key["tma"] for key in keys] == [True, False]
    assert {k: v for k, v in keys[0].items() if k != "tma"} == {
        k: v for k, v in keys[1].items() if k != "tma"}
