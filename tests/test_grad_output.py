"""The backward's pass over dY (kernels/grad_output.py): G = dY B, dB = s dY^T h and
db = sum dY from one read of dY, against the float64 oracle; and tn_matmul's split
rows summed inside the launch.

Under the interpreter the pass runs with 16 x 16 tiles, so these shapes reach
several row blocks (partials of dB and db) and several column groups (partials
of G), and both together; ``programs`` raises the number of programs the launcher
aims for (more column groups, more row slices for tn_matmul).
"""
import importlib

import pytest
import torch

import lorakern
import lorakern.functional.fused_linear
from lorakern import kernels
from lorakern.kernels import lora_grad_weights
from oracle import assert_matches_oracle
from test_fused_kernels import make_layer, run_and_check

# the module (the package's attribute of that name is its launcher)
grad_output_module = importlib.import_module("lorakern.kernels.grad_output")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE = 0.75


def _grad_y(m, n, layout, dtype, device):
    if layout == "contiguous":
        g = torch.randn(m, n)
    elif layout == "transposed":
        g = torch.randn(n, m).t()
    elif layout == "expanded":  # what y.sum() hands back: stride 0 everywhere
        g = torch.randn(()).expand(m, n)
    else:
        raise ValueError(layout)
    return g.to(device=device, dtype=dtype)


def _inputs(m, n, r, dtype, adapter_dtype, layout, device, seed=0):
    torch.manual_seed(seed)
    rank_dtype = torch.promote_types(dtype, adapter_dtype)
    dy = _grad_y(m, n, layout, dtype, device)
    lora_b = torch.randn(n, r).to(device=device, dtype=adapter_dtype)
    h = torch.randn(m, r).to(device=device, dtype=rank_dtype)
    return dy, lora_b, h


def _run(dy, lora_b, h, bias, need_g=True):
    """(G or None, dB, db or None, the kernels launched) of one call of the launcher."""
    n, r = lora_b.shape
    grad_b = kernels.empty((n, r), lora_b.dtype, dy.device)
    grad_bias = kernels.empty(n, dy.dtype, dy.device) if bias else None
    before = dict(kernels.launch_counts)
    g = kernels.grad_output(dy, lora_b, h, SCALE, grad_b, grad_bias,
                            h.dtype if need_g else None)
    launched = {name: kernels.launch_counts[name] - before.get(name, 0)
                for name in ("grad_output", "rank_product", "tn_matmul")}
    return g, grad_b, grad_bias, launched


def _expected(dy, lora_b, h):
    dy64, b64, h64 = (t.detach().cpu().to(torch.float64) for t in (dy, lora_b, h))
    return dy64 @ b64, SCALE * dy64.t() @ h64, dy64.sum(0)


def _check(dy, lora_b, h, bias, need_g=True):
    g, grad_b, grad_bias, launched = _run(dy, lora_b, h, bias, need_g)
    m, n = dy.shape
    one_pass = grad_output_module.one_pass_fits(m, n, lora_b.shape[1], dy.element_size(),
                                                h.element_size(),
                                                grad_output_module.dy_aligned(dy))
    if one_pass and m and n:
        assert launched == {"grad_output": 1, "rank_product": 0, "tn_matmul": 0}, launched
    elif not one_pass:
        assert launched == {"grad_output": 0, "rank_product": int(need_g), "tn_matmul": 1}, \
            launched
    g_ref, db_ref, bias_ref = _expected(dy, lora_b, h)
    assert grad_b.dtype == lora_b.dtype
    assert_matches_oracle(grad_b.cpu(), db_ref, grad_b.dtype, "dB")
    if need_g:
        assert g.dtype == h.dtype
        assert_matches_oracle(g.cpu(), g_ref, g.dtype, "G")
    else:
        assert g is None
    if bias:
        assert grad_bias.dtype == dy.dtype
        assert_matches_oracle(grad_bias.cpu(), bias_ref, dy.dtype, "db")
    return one_pass


# (M, N, r, bias, dY layout): every M in {0, 1, 7, 33, 300}, N in {1, 23, 64, 130},
# r in {1, 3, 16, 20, 64, 100}, bias on and off and each dY layout appears
CASES = [
    (1, 1, 1, True, "contiguous"),
    (1, 130, 16, False, "contiguous"),
    (7, 23, 3, True, "transposed"),
    (7, 64, 20, False, "expanded"),
    (33, 130, 3, True, "contiguous"),
    (33, 23, 16, True, "expanded"),
    (33, 64, 64, True, "contiguous"),
    (300, 64, 16, True, "contiguous"),
    (300, 130, 1, False, "transposed"),
    (300, 23, 20, True, "contiguous"),
    (300, 1, 3, True, "contiguous"),
    (7, 130, 100, True, "contiguous"),
    (0, 23, 3, True, "contiguous"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,r,bias,layout", CASES, ids=lambda v: str(v))
def test_g_db_and_db_match_the_oracle(m, n, r, bias, layout, dtype, device):
    _check(*_inputs(m, n, r, dtype, dtype, layout, device), bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,r", [(7, 130, 3), (33, 64, 16), (300, 130, 16), (300, 23, 20)])
def test_fp32_adapters_on_a_half_base_give_fp32_g_and_db(m, n, r, dtype, device):
    """PEFT's default: G and h fp32, the products in fp32, dB in B's fp32, db in dY's dtype."""
    _check(*_inputs(m, n, r, dtype, torch.float32, "contiguous", device), True)


def test_an_unaligned_dy_takes_narrower_tiles_and_the_one_pass_while_they_fit():
    """A dY read element by element (odd column count, offset view) gets 128 x 32
    tiles, whose partials the budget reckons: the one pass at rank block 16 on
    4096 columns, two passes at 32, where the aligned tiles still fit."""
    aligned = grad_output_module.grad_output_config_gpu(32, 2, 2)
    unaligned = grad_output_module.grad_output_config_gpu(32, 2, 2, aligned=False)
    assert (aligned.block_m, aligned.block_n) == (256, 64)
    assert (unaligned.block_m, unaligned.block_n) == (128, 32)
    fits = grad_output_module.one_pass_fits
    assert fits(8192, 4096, 16, 2, 2, aligned=False) and fits(8192, 4096, 32, 2, 2)
    assert not fits(8192, 4096, 32, 2, 2, aligned=False)
    dy = torch.empty(8, 50257, dtype=torch.bfloat16)
    assert not grad_output_module.dy_aligned(dy)
    assert grad_output_module.dy_aligned(torch.empty(8, 4096, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,r", [(33, 130, 16), (300, 64, 3), (7, 130, 20)])
def test_many_column_groups_and_row_blocks_at_once(m, n, r, dtype, device, monkeypatch):
    """Up to one column group per column block (G summed over groups by the last
    program of each row block) beside several row blocks (dB and db summed by the
    last program of each column block): the partial budget lifted, as many
    programs as the blocks allow."""
    monkeypatch.setattr(grad_output_module, "target_programs", lambda device: 256)
    monkeypatch.setattr(grad_output_module, "PARTIAL_SHARE", 1e9)
    cfg = grad_output_module.GRAD_OUTPUT_INTERPRET
    groups, _ = grad_output_module.column_groups(m, n, 32, cfg, 4, 4, device)
    assert groups >= 4
    _check(*_inputs(m, n, r, dtype, dtype, "contiguous", device), True)


@pytest.mark.parametrize("bias", [True, False])
def test_without_g_only_db_and_db_are_made(bias, device):
    dy, lora_b, h = _inputs(33, 64, 5, torch.float32, torch.float32, "contiguous", device)
    _check(dy, lora_b, h, bias, need_g=False)


def test_ranks_past_the_partial_budget_take_two_passes(device):
    """Rank blocks over 32, or partials over half of dY's bytes, take the rank pass
    and tn_matmul; ranks 16 and 20 at 300 tokens of bf16 take the one pass."""
    for r, one_pass in [(16, True), (20, True), (64, False), (100, False)]:
        inputs = _inputs(300, 64, r, torch.bfloat16, torch.bfloat16, "contiguous", device)
        assert _check(*inputs, True) is one_pass, r
    # fp32 adapters on bf16: 128-row blocks, rank block 32 passes the budget at 300 rows
    inputs = _inputs(300, 64, 20, torch.bfloat16, torch.float32, "contiguous", device)
    assert _check(*inputs, True) is False


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_runs_are_bit_identical(dtype, device, monkeypatch):
    """Partials are summed in a fixed order whichever program sums them."""
    monkeypatch.setattr(grad_output_module, "target_programs", lambda device: 64)
    monkeypatch.setattr(grad_output_module, "PARTIAL_SHARE", 1e9)  # G's partials too
    inputs = _inputs(300, 130, 16, dtype, dtype, "contiguous", device, seed=3)
    first, second = _run(*inputs, True)[:3], _run(*inputs, True)[:3]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_m_zero_gives_zero_db_and_db_and_an_empty_g(device):
    dy, lora_b, h = _inputs(0, 23, 3, torch.float32, torch.float32, "contiguous", device)
    g, grad_b, grad_bias, _ = _run(dy, lora_b, h, True)
    assert g.shape == (0, 3)
    assert torch.equal(grad_b, torch.zeros_like(grad_b))
    assert torch.equal(grad_bias, torch.zeros_like(grad_bias))


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
def test_one_backward_reads_dy_once(strategy, device, monkeypatch):
    """dX, dA, dB and db: the pass over dY runs once and the rank pass does not
    (the forward's h is its only launch); tn_matmul runs for dA only (in cublas
    it also makes dX's LoRA term: no lora_term launch of its own)."""
    monkeypatch.setenv("LORAKERN_STRATEGY", strategy)
    monkeypatch.setattr(lorakern.functional.fused_linear, "draw_seed", lambda: 5)
    layer = make_layer((300,), 48, 130, 16, torch.float32, device)
    y = lorakern.lora_linear(layer["x"], layer["weight"], layer["lora_A"], layer["lora_B"],
                             0.5, layer["bias"], 0.25)
    names = ("grad_output", "rank_product", "tn_matmul", "lora_grad_input", "lora_term")
    before = dict(kernels.launch_counts)
    y.sum().backward()
    ran = {k: kernels.launch_counts[k] - before.get(k, 0) for k in names}
    assert ran == {"grad_output": 1, "rank_product": 0, "tn_matmul": 1,
                   "lora_grad_input": 1, "lora_term": 0}, ran


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r,grad_layout", [
    ((300,), 19, 128, 20, "contiguous"), ((3, 11), 70, 23, 3, "transposed"),
    ((300,), 40, 64, 16, "expanded"), ((1,), 19, 130, 1, "contiguous")])
def test_the_layer_with_the_one_pass_matches_the_oracle(lead, k, n, r, grad_layout, dtype,
                                                         strategy, device, monkeypatch):
    """Every gradient of the layer (dX and dA use the one pass's G) at shapes where
    it runs with several row blocks and column groups."""
    monkeypatch.setenv("LORAKERN_STRATEGY", strategy)
    torch.manual_seed(17)
    layer = make_layer(lead, k, n, r, dtype, device)
    before = kernels.launch_counts["grad_output"]
    run_and_check(layer, 0.75, 0.2, grad_layout, dtype, monkeypatch)
    assert kernels.launch_counts["grad_output"] == before + 1


# ---- tn_matmul: row slices summed by the last program of each tile

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("colsum,dropout_p", [(True, 0.0), (False, 0.3)])
def test_tn_matmul_sums_its_row_slices_in_the_launch(colsum, dropout_p, dtype, device,
                                                     monkeypatch):
    """Many row slices (one program each per output tile): the result matches the
    oracle, two runs are bit-identical, and no torch op sums the partials."""
    monkeypatch.setattr(lora_grad_weights, "target_programs", lambda device: 64)
    torch.manual_seed(8)
    m, p, q = 300, 23, 20
    lhs = torch.randn(m, p).to(device=device, dtype=dtype)
    rhs = torch.randn(m, q).to(device=device, dtype=dtype)
    keep = torch.ones(m, p, dtype=torch.bool)
    if dropout_p:
        keep = kernels.dropout_keep_mask(m, p, dropout_p, 11, device).cpu()

    def run():
        out = kernels.empty((p, q), dtype, device)
        sums = kernels.empty(p, dtype, device) if colsum else None
        kernels.tn_matmul(lhs, rhs, out, 1.5, rank_block=32, colsum=sums,
                          dropout_p=dropout_p, seed=11)
        return out, sums

    splits, _ = lora_grad_weights._split_rows(m, 16, 2, device)
    assert splits > 4
    out, sums = run()
    lhs64 = lhs.cpu().to(torch.float64)
    assert_matches_oracle(out.cpu(), 1.5 * (lhs64 * keep).t() @ rhs.cpu().to(torch.float64),
                          dtype, "out")
    if colsum:
        assert_matches_oracle(sums.cpu(), lhs64.sum(0), dtype, "colsum")
    again, sums_again = run()
    assert torch.equal(out, again)
    if colsum:
        assert torch.equal(sums, sums_again)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                   (torch.float16, torch.float16),
                                                   (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("r", [5, 16, 20])
def test_tn_matmul_writes_the_grad_inputs_lora_term_with_da(r, dropout_p, dtype, adapter_dtype,
                                                            device, monkeypatch):
    """dA^T = c (x m)^T G and, from the same launch, dX0 = c (G A) m: the mask of
    each element once for both, every element of dX0 written once (row slices,
    odd widths), rounded once to dX0's dtype; against the float64 oracle. Past
    ``term_fits`` (fp32 G at rank block 32) refused before any launch."""
    monkeypatch.setattr(lora_grad_weights, "target_programs", lambda device: 64)
    torch.manual_seed(9)
    m, k = 300, 37
    rank_dtype = torch.promote_types(dtype, adapter_dtype)
    x = torch.randn(m, k).to(device=device, dtype=dtype)
    g = torch.randn(m, r).to(device=device, dtype=rank_dtype)
    lora_a = torch.randn(r, k).to(device=device, dtype=adapter_dtype)
    keep = torch.ones(m, k, dtype=torch.bool)
    if dropout_p:
        keep = kernels.dropout_keep_mask(m, k, dropout_p, 13, device).cpu()
    grad_a = torch.full((r, k), float("nan"), dtype=adapter_dtype, device=device)
    dx0 = torch.full((m, k), float("nan"), dtype=dtype, device=device)
    before = dict(kernels.launch_counts)
    if not lora_grad_weights.term_fits(kernels.rank_block(r), rank_dtype.itemsize):
        with pytest.raises(ValueError, match="rank block 32"):
            kernels.tn_matmul(x, g, grad_a.t(), 1.25, rank_block=kernels.rank_block(r),
                              dropout_p=dropout_p, seed=13, term_rhs=lora_a, term_out=dx0)
        assert kernels.launch_counts["tn_matmul"] == before.get("tn_matmul", 0)
        assert dx0.isnan().all()  # nothing written
        return
    kernels.tn_matmul(x, g, grad_a.t(), 1.25, rank_block=kernels.rank_block(r),
                      dropout_p=dropout_p, seed=13, term_rhs=lora_a, term_out=dx0)
    assert {n: kernels.launch_counts[n] - before.get(n, 0) for n in ("tn_matmul", "lora_term")} \
        == {"tn_matmul": 1, "lora_term": 0}
    x64, g64, a64 = (t.cpu().to(torch.float64) for t in (x, g, lora_a))
    assert_matches_oracle(grad_a.cpu(), 1.25 * g64.t() @ (x64 * keep), adapter_dtype, "dA")
    assert_matches_oracle(dx0.cpu(), 1.25 * (g64 @ a64) * keep, dtype, "dX0")


def test_tn_matmul_refuses_a_term_it_cannot_write_in_one_rank_block(device):
    x, g = torch.randn(8, 4, device=device), torch.randn(8, 40, device=device)
    with pytest.raises(ValueError, match="rank block"):
        kernels.tn_matmul(x, g, torch.empty(4, 40, device=device), 1.0, rank_block=64,
                          term_rhs=torch.randn(40, 4, device=device),
                          term_out=torch.empty(8, 4, device=device))


def _kept_counters():
    from lorakern.kernels import _common
    return list(_common._ARRIVAL_COUNTERS.values())


def test_the_kernels_leave_their_arrival_counters_at_zero(device, monkeypatch):
    """The counters of the in-launch sums live in one kept buffer per device and
    stream, with no memset between launches: every launch that counts on them
    (column blocks and row blocks of the one pass, row slices of tn_matmul)
    sets each back to zero, and the next launch sums correctly."""
    monkeypatch.setattr(grad_output_module, "target_programs", lambda device: 256)
    monkeypatch.setattr(grad_output_module, "PARTIAL_SHARE", 1e9)  # G's counters too
    monkeypatch.setattr(lora_grad_weights, "target_programs", lambda device: 64)
    inputs = _inputs(300, 130, 16, torch.float32, torch.float32, "contiguous", device, seed=4)
    for _ in range(2):  # the second launch finds the counters as the first left them
        _check(*inputs, True)
    lhs, rhs = inputs[0], inputs[2]
    out = kernels.empty((130, 16), torch.float32, device)
    kernels.tn_matmul(lhs, rhs, out, 1.0, rank_block=16)
    counters = _kept_counters()
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)
