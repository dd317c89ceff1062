"""The static performance report (``python -m bench.static``) and the guards it
gives on the compiled code.

The report compiles the kernels for a GPU, which cannot happen in this
process (conftest sets TRITON_INTERPRET=1, and an interpreted kernel cannot be
compiled): it runs in a subprocess, once for the module, on one case
(4096x4096, M = 8192, r = 16, bf16 base with fp32 adapters -- PEFT's default --,
dropout 0 and 0.1, sm_90).
"""
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root holds bench/

from bench import roofline, sass  # noqa: E402

CASE_ARGS = ["--arch", "sm_90", "--shapes", "4096x4096", "--tokens", "8192", "--ranks", "16",
             "--dropout", "0,0.1"]
LARGE_M = 2048
# Thread instructions the dropout mask may add to one launch, per element of the
# masked input x (M x K). The generator (Philox4x32, 7 rounds, one call for 8
# elements of 16 bits) costs 10 to 17 per element with the threshold compare,
# depending on where it runs and on the triton version (sm_90, 4096x4096, M = 8192:
# rank pass 9.8, dX epilogue 14.8, dA 12.0 with triton 3.9.0; 17.0 in the dX
# epilogue with 3.7.1). A 10-round Philox per element costs about 50 for each
# evaluation: the bound catches a return to it. 8 bits an element (FlashAttention's
# choice) would halve the cost but quantise p to 1/256.
MASK_INSTRUCTIONS_PER_ELEMENT = 20
STRATEGIES = ("fused", "cublas")
# "lorakern" is what the tuner picks: per phase, the faster strategy
LINEAR_PROVIDERS = ("lorakern", "lorakern:fused", "lorakern:cublas", "nn.Linear", "peft")


def _compile_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    command = [sys.executable, "-m", "bench.static", *CASE_ARGS,
               "--json", str(out / "report.json"), "--launches-json", str(out / "launches.json")]
    done = subprocess.run(command, cwd=ROOT, env=_compile_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"stdout": done.stdout,
            "report": json.loads((out / "report.json").read_text()),
            "launches": json.loads((out / "launches.json").read_text())}


def _kernel_launches(static_run):
    return [row for row in static_run["launches"] if "kernel" in row]


# ---- the report

def test_report_json_has_the_documented_schema(static_run):
    report = static_run["report"]
    assert set(report) == {"assumptions", "kernels", "records"}
    assert report["assumptions"]["arch"] == "sm_90"
    assert "predicted" in report["assumptions"]["figures"]
    assert report["assumptions"]["machine"]["tensor_peak"] == 790e12
    kernel_keys = {"name", "arch", "regs", "spills", "shared_bytes", "num_warps", "num_stages",
                   "wgmma", "tma", "sass"}
    assert report["kernels"]
    for kernel in report["kernels"]:
        assert set(kernel) == kernel_keys, kernel["name"]
        assert kernel["arch"] == "sm_90" and kernel["regs"] > 0 and kernel["shared_bytes"] > 0
    record_keys = {"M", "K", "N", "r", "dtype", "adapter_dtype", "dropout", "provider", "mode",
                   "predicted_ms", "bound", "variant", "base"}
    combos = Counter()
    linear = [r for r in report["records"] if r["provider"] in LINEAR_PROVIDERS]
    for record in linear:
        assert set(record) == record_keys
        assert (record["M"], record["K"], record["N"], record["r"], record["dtype"],
                record["adapter_dtype"]) == (8192, 4096, 4096, 16, "bf16", "fp32")
        assert record["predicted_ms"] > 0
        assert record["bound"] in ("tensor", "issue", "hbm", "l2")
        assert record["variant"] == "lora" and record["base"] == "bf16"
        combos[(record["provider"], record["mode"], record["dropout"])] += 1
    assert set(combos) == {(p, m, d) for p in LINEAR_PROVIDERS
                           for m in ("fwd", "bwd", "fwd+bwd") for d in (0.0, 0.1)}
    assert set(combos.values()) == {1}
    assert "PREDICTED" in static_run["stdout"]
    assert "adapters=fp32: " in static_run["stdout"]  # the ratio lines


def test_the_lora_embedding_case_is_compiled_and_predicted(static_run):
    """vocab 49152, dim 2048, 8192 tokens, r = 16: both embedding kernels compiled for
    sm_90 without spills, and rows for lorakern, nn.Embedding and PEFT in every mode."""
    report = static_run["report"]
    names = {k["name"]: k for k in report["kernels"]}
    for kernel in ("_lora_embedding_forward_kernel", "_lora_embedding_grad_kernel"):
        assert kernel in names and names[kernel]["spills"] == 0, kernel
    rows = {(r["provider"], r["mode"]): r for r in report["records"]
            if r["provider"] in ("lorakern-embedding", "nn.Embedding", "peft-embedding")}
    assert len(rows) == 9
    for row in rows.values():
        assert (row["M"], row["K"], row["N"], row["r"]) == (8192, 49152, 2048, 16)
        assert row["mode"] != "fwd" or row["predicted_ms"] > 0
    floor = rows[("nn.Embedding", "fwd+bwd")]["predicted_ms"]
    assert rows[("lorakern-embedding", "fwd+bwd")]["predicted_ms"] >= floor
    assert "LoRA embedding" in static_run["stdout"]


def test_fwd_plus_bwd_is_the_sum_and_the_base_gemms_are_the_floor(static_run):
    by = {(r["provider"], r["mode"], r["dropout"]): r["predicted_ms"]
          for r in static_run["report"]["records"]}
    for provider in LINEAR_PROVIDERS:
        for p in (0.0, 0.1):
            assert by[(provider, "fwd+bwd", p)] == pytest.approx(
                by[(provider, "fwd", p)] + by[(provider, "bwd", p)], abs=2e-4)
            assert by[(provider, "fwd+bwd", p)] >= by[("nn.Linear", "fwd+bwd", p)]


def test_the_tuned_prediction_is_the_faster_strategy_per_phase(static_run):
    by = {(r["provider"], r["mode"], r["dropout"]): r["predicted_ms"]
          for r in static_run["report"]["records"]}
    for p in (0.0, 0.1):
        for mode in ("fwd", "bwd"):
            assert by[("lorakern", mode, p)] == min(
                by[(f"lorakern:{s}", mode, p)] for s in STRATEGIES)


def test_the_cublas_strategy_runs_torchs_matmul_onto_the_lora_term(static_run):
    """Its launches: the rank pass, the LoRA term kernel and one addmm_ (priced as
    cuBLAS's GEMM) per direction, the backward's term made by dA's tn_matmul (no
    lora_term launch of its own); the fused GEMM never."""
    rows = [r for r in static_run["launches"] if r["strategy"] == "cublas"]
    for phase in ("fwd", "bwd"):
        names = [r["name"] for r in rows if r["phase"] == phase and r["dropout"] == 0.1]
        assert names.count("_lora_term_kernel") == (phase == "fwd"), names
        assert names.count("addmm_") == 1, names
        assert names.count("_tn_matmul_kernel") == (phase == "bwd") * 2, names
        assert not set(BASE_GEMMS) & set(names), names


CAPTURE_SCRIPT = textwrap.dedent("""
    import json, sys
    from bench.capture import capture_case, KernelLaunch
    from bench.cases import Case
    case = Case(*json.loads(sys.argv[1]))
    launches = [item.launcher for items in capture_case(case, 90).values()
                for item in items if isinstance(item, KernelLaunch)]
    print(json.dumps(launches))
""")

INTERPRETED_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from bench.capture import TRAINING_NEEDS, SEED, layer_tensors
    from bench.cases import Case
    from lorakern.functional.fused_linear import fused_backward, fused_forward
    from lorakern.kernels import launch_counts
    case = Case(*json.loads(sys.argv[1]))
    t = {k: v.normal_() for k, v in layer_tensors(case, "cpu").items()}
    seed = SEED if case.dropout > 0 else 0
    _, h = fused_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"],
                         case.scale, case.dropout, seed)
    fused_backward(t["grad_y"], t["x"], t["weight"], t["lora_A"], t["lora_B"], h,
                   case.scale, case.dropout, seed, TRAINING_NEEDS)
    print(json.dumps(dict(launch_counts)))
""")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capture_sees_every_launch_an_interpreted_run_makes(dropout, strategy):
    case = json.dumps([48, 40, 32, 4, "fp32", dropout])  # d_in, d_out, tokens, r, dtype, p

    def run(script, env):
        env = dict(env, LORAKERN_STRATEGY=strategy)
        done = subprocess.run([sys.executable, "-c", script, case], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    captured = run(CAPTURE_SCRIPT, _compile_env())
    interpreted = run(INTERPRETED_SCRIPT, dict(_compile_env(), TRITON_INTERPRET="1"))
    assert captured, "no launch captured"
    # launch_counts also counts whole launch sequences (the layer's forward and
    # grad-input) under their own names; the capture sees the kernels' launchers
    interpreted = {name: n for name, n in interpreted.items()
                   if name not in ("lora_forward", "lora_grad_input")}
    assert Counter(captured) == Counter(interpreted)


# ---- the SASS reader, on a hand-made snippet

SNIPPET = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   IMAD.HI.U32 R4, R2, -0x2daee0ad, RZ ;
.L_x_0:
        /*0020*/                   LDGSTS.E.BYPASS.128 [R140], desc[UR14][R4.64], P5 ;
.L_x_1:
        /*0030*/                   IMAD.HI.U32 R4, R23, -0x2daee0ad, RZ ;
        /*0040*/                   LOP3.LUT R18, R4, UR18, RZ, 0x3c, !PT ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0060*/                   FFMA R3, R3, R4, R5 ;
        /*0070*/              @!P5 BRA `(.L_x_1) ;
        /*0080*/                   STG.E.U16 desc[UR4][R2.64], R7 ;
        /*0090*/               @P0 BRA `(.L_x_0) ;
        /*00a0*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*00b0*/                   STL [R1], R9 ;
        /*00c0*/                   EXIT ;
"""


def test_sass_reader_finds_the_innermost_tensor_loop_and_classifies_its_instructions():
    code = sass.parse_sass(SNIPPET)
    assert len(code.instructions) == 13
    assert sorted(code.loops()) == [(0x20, 0x90), (0x30, 0x70)]
    assert code.main_loop() == (0x30, 0x70)
    loop = code.between(*code.main_loop())
    mix = sass.instruction_mix(loop)
    assert (mix["total"], mix["tensor"], mix["integer"], mix["float"], mix["other"]) == \
        (5, 1, 2, 1, 1)
    assert (mix["imad_hi"], mix["HGMMA"], mix["LOP3"], mix["LDGSTS"]) == (1, 1, 1, 0)
    whole = sass.instruction_mix(code.instructions)
    assert (whole["memory"], whole["STL"], whole["HMMA"], whole["imad_hi"]) == (4, 1, 1, 2)
    hgmma, hmma = code.instructions[5], code.instructions[10]
    assert sass.tensor_flops(hgmma, num_warps=8) == 2 * 64 * 128 * 16 * 2  # two warpgroups
    assert sass.tensor_flops(hmma, num_warps=4) == 2 * 16 * 8 * 16 * 4
    assert sass.access_bytes(code.instructions[2]) == 16
    assert sass.access_bytes(code.instructions[8]) == 2


TTIR = """
  tt.func public @k(%x_ptr: !tt.ptr<bf16>, %M: i32 {tt.divisibility = 16 : i32}, %K: i32, %rows_per_split: i32) {
    %c64_i32 = arith.constant 64 : i32 loc(#loc1)
    %pid = tt.get_program_id z : i32 loc(#loc2)
    %start = arith.muli %pid, %rows_per_split : i32 loc(#loc3)
    %end0 = arith.addi %start, %rows_per_split : i32 loc(#loc4)
    %end = arith.minsi %M, %end0 : i32 loc(#loc5)
    %a = scf.for %i = %start to %end step %c64_i32 iter_args(%s = %z) -> (tensor<64x64xf32>)  : i32 {
      %d = tt.dot %p, %q, %s : tensor<64x64xbf16> * tensor<64x64xbf16> -> tensor<64x64xf32>
      scf.yield %d : tensor<64x64xf32>
    } loc(#loc6)
    tt.return
  }
"""


def test_trip_count_is_evaluated_from_the_loop_bounds_for_the_first_program():
    assert sass.main_loop_trips(TTIR, {"M": 8192, "K": 4096, "rows_per_split": 960}) == 15
    assert sass.main_loop_trips(TTIR, {"M": 100, "K": 4096, "rows_per_split": 960}) == 2
    assert sass.main_loop_trips(TTIR.replace("tt.dot", "tt.add"), {"M": 1}) is None


def test_every_innermost_dot_loop_gets_its_trip_count_in_program_order():
    """A decode GEMM's rank product runs its own K loop after the main loop; the
    roofline prices each loop by its own trip count."""
    loop = TTIR[TTIR.index("    %a = scf.for"):TTIR.index("    tt.return")]
    second = loop.replace("%a = scf.for %i = %start to %end",
                          "%b = scf.for %j = %c0 to %K").replace("%d = tt.dot", "%e = tt.dot")
    two_loops = TTIR.replace("    tt.return", second + "    tt.return").replace(
        "    %pid =", "    %c0 = arith.constant 0 : i32 loc(#loc1)\n    %pid =")
    assert sass.loop_trips(two_loops, {"M": 8192, "K": 4096, "rows_per_split": 960}) == [15, 64]
    assert sass.main_loop_trips(two_loops, {"M": 8192, "K": 4096, "rows_per_split": 960}) == 15


def test_tma_boxes_count_as_the_loop_bytes_they_load():
    """TMA copies are no LDG/LDGSTS instructions: each ``tt.descriptor_load`` in an
    innermost dot loop loads its box once a trip (here 128x64 and 64x128 bf16)."""
    with_tma = TTIR.replace(
        "      %d = tt.dot",
        "      %p = tt.descriptor_load %l_desc[%i, %c0] : !tt.tensordesc<tensor<128x64xbf16>>"
        " -> tensor<128x64xbf16> loc(#loc7)\n"
        "      %q = tt.descriptor_load %r_desc[%c0, %i] : !tt.tensordesc<tensor<64x128xbf16>>"
        " -> tensor<64x128xbf16> loc(#loc8)\n      %d = tt.dot")
    assert sass.descriptor_load_bytes(with_tma) == [2 * 128 * 64 * 2]
    assert sass.descriptor_load_bytes(TTIR) == [0]


# ---- the roofline, on a hand-made kernel

def test_roofline_terms_occupancy_and_tail_on_a_hand_made_kernel():
    machine = roofline.MACHINES[90]
    # 128 regs x 256 threads = 32768: two CTAs per SM by registers; shared 100 KB: two
    assert roofline.ctas_per_sm(machine, regs=128, num_warps=8, shared_bytes=100 * 1024) == 2
    assert roofline.ctas_per_sm(machine, regs=130, num_warps=8, shared_bytes=1024) == 1  # 136
    # 300 CTAs on 132 SMs x 2: one full wave (2 each), 36 left -> the busiest SM runs 3
    assert roofline.busiest_sm_ctas(300, 132, 2) == 3
    work = roofline.KernelWork(programs=300, num_warps=8, regs=128, shared_bytes=100 * 1024,
                               tensor_flops=1e9, instructions=4e6, imads=1e6,
                               global_bytes=1e6, hbm_bytes=3e9, wgmma=True)
    seconds, bound, d = roofline.predict_kernel(machine, work)
    tensor = 3 * 1e9 / (790e12 * 0.85 / 132)
    issue = 3 * max(4e6 / 4, 1e6 / 2) / 1.83e9
    assert d["tensor"] == pytest.approx(tensor)
    assert d["issue"] == pytest.approx(issue)
    assert d["hbm"] == pytest.approx(3e9 / 3.0e12)
    assert d["l2"] == pytest.approx(300 * 1e6 / 10e12)
    assert bound == "issue" and issue > max(tensor, 1e-3, 3e-5)
    assert seconds == pytest.approx(issue + 3e-6)
    assert d["tail_efficiency"] == pytest.approx(300 / (132 * 3))


def test_loops_after_the_main_loop_are_priced_by_their_own_trips():
    from types import SimpleNamespace
    report = sass.KernelReport(
        name="k", arch=90, regs=64, spills=0, spill_instructions=0, shared_bytes=1024,
        num_warps=4, num_stages=2, wgmma=False, tma=False,
        sass={"kernel": {"IMAD": 30}, "main_loop": {"IMAD": 2}},
        main_loop_instructions=10, other_instructions=50, loop_tensor_flops=100,
        other_tensor_flops=7, loop_global_bytes=64, other_global_bytes=8,
        later_loops=[{"instructions": 20, "tensor_flops": 40, "global_bytes": 16, "imads": 3}])
    launch = SimpleNamespace(programs=10, tensors={"x": (1, 4096)})
    work = roofline.kernel_work(report, launch, 32, [32])
    assert work.instructions == (50 + 10 * 32 + 20 * 32) * 4
    assert work.tensor_flops == 7 + 100 * 32 + 40 * 32
    assert work.global_bytes == 8 + 64 * 32 + 16 * 32
    assert work.imads == (30 - 2 + 2 * 32 + 3 * 31) * 4
    # trip counts that do not match the loops found: each later loop counted once
    assert roofline.kernel_work(report, launch, 32, []).instructions == (50 + 320 + 20) * 4


FMA_SNIPPET = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   FFMA R8, R4, R5, R8 ;
        /*0030*/                   FFMA R9, R4, R6, R9 ;
        /*0040*/                   IADD3 R2, R2, 0x4, RZ ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
        /*0060*/                   STG.E desc[UR4][R10.64], R8 ;
        /*0070*/                   EXIT ;
"""


def test_a_loop_of_fmas_is_priced_by_its_trips_like_a_tensor_loop():
    """fp32 adapters at IEEE precision: the rank products' ``tl.dot`` is lowered to
    FFMAs, so the SASS loop has no MMA; the Triton IR still says it is the dot loop,
    and its issue time grows with the trips (here 10 and 40: four times the loop)."""
    code = sass.parse_sass(FMA_SNIPPET)
    assert code.tensor_loops() == [] and code.main_loop() is None
    assert code.fma_loops() == [(0x10, 0x50)]
    assert code.dot_loops(expected=1) == [(0x10, 0x50)]
    assert code.dot_loops(expected=None) == []  # no Triton IR said there is a dot
    assert sass.loop_trips(TTIR, {"M": 8192, "K": 4096, "rows_per_split": 960}) == [15]
    machine = roofline.MACHINES[90]
    loop, other, warps = len(code.between(0x10, 0x50)), 3, 4

    def issue(trips):
        from types import SimpleNamespace
        report = sass.KernelReport(
            name="fma", arch=90, regs=32, spills=0, spill_instructions=0, shared_bytes=0,
            num_warps=warps, num_stages=1, wgmma=False, tma=False,
            sass={"kernel": {"IMAD": 0}, "main_loop": {"IMAD": 0}},
            main_loop_instructions=loop, other_instructions=other, loop_tensor_flops=0,
            other_tensor_flops=0, loop_global_bytes=4 * 32 * warps, other_global_bytes=0)
        launch = SimpleNamespace(programs=132, tensors={"x": (1, 4096)})
        return roofline.predict_kernel(machine, roofline.kernel_work(report, launch, trips))[2]

    short, long = issue(10), issue(40)
    per_trip = loop * warps / machine.schedulers_per_sm / machine.clock_hz
    assert short["tensor"] == long["tensor"] == 0
    assert long["issue"] - short["issue"] == pytest.approx(30 * per_trip)
    assert long["issue"] == pytest.approx((other + 40 * loop) * warps / 4 / 1.83e9)


def test_baseline_gemm_is_tensor_bound_at_large_m_and_memory_bound_at_decode():
    machine = roofline.MACHINES[90]
    seconds, bound = roofline.gemm(machine, 8192, 4096, 4096)
    assert bound == "tensor"
    assert seconds == pytest.approx(2 * 8192 * 4096 * 4096 / 790e12 + 3e-6)
    seconds, bound = roofline.gemm(machine, 16, 4096, 4096)
    assert bound == "hbm"
    assert seconds == pytest.approx(2 * (16 * 4096 * 2 + 4096 * 4096) / 3.0e12 + 3e-6)


# ---- guards on today's compiled code (sm_90, the case above)

def test_no_captured_launch_spills_registers(static_run):
    launches = _kernel_launches(static_run)
    assert launches
    spilling = [(r["name"], r["meta"], r["kernel"]["spills"], r["spill_instructions"])
                for r in launches if r["kernel"]["spills"] or r["spill_instructions"]]
    assert not spilling


def _large_m_gemms(static_run):
    return [r for r in _kernel_launches(static_run)
            if r["M"] >= LARGE_M and r["kernel"]["sass"]["main_loop"]]


# The GEMM that carries the base product x W^T (forward) and dY W (backward dX), in
# its pointer and TMA builds; the rank passes and tn_matmul reduce over a rank-sized
# dimension and are memory-bound.
BASE_GEMMS = ("_lora_gemm_kernel", "_lora_gemm_tma_kernel")


def test_every_large_m_gemm_uses_wgmma_with_at_least_three_stages(static_run):
    gemms = [r for r in _large_m_gemms(static_run) if r["name"] in BASE_GEMMS]
    assert {(r["phase"], r["dropout"]) for r in gemms} == {
        (phase, p) for phase in ("fwd", "bwd") for p in (0.0, 0.1)}
    shallow = [(r["phase"], r["dropout"], r["kernel"]["wgmma"], r["kernel"]["num_stages"])
               for r in gemms if not r["kernel"]["wgmma"] or r["kernel"]["num_stages"] < 3]
    assert not shallow


def test_the_large_m_gemm_reads_its_operands_through_tma_on_sm90(static_run):
    """On sm_90 the fused strategy's large-M GEMM is the TMA build (UTMALDG in its
    SASS), and the roofline counts the TMA boxes as L2 traffic: 128x64 tiles of L
    and Rt per K step, 32 KiB a program per trip."""
    gemms = [r for r in _large_m_gemms(static_run) if r["name"] in BASE_GEMMS]
    assert gemms
    assert [r["name"] for r in gemms if not r["kernel"]["tma"]] == []
    assert {r["name"] for r in gemms} == {"_lora_gemm_tma_kernel"}
    for row in gemms:
        assert row["loop_global_bytes"] >= 2 * 128 * 64 * 2, row["loop_global_bytes"]


def test_no_philox_in_any_gemm_main_loop(static_run):
    """The base GEMM's main loop carries no mask work: the forward's mask is made in
    the rank pass, the backward's in the dX epilogue."""
    gemms = [r for r in _kernel_launches(static_run) if r["name"] in BASE_GEMMS]
    assert gemms
    with_philox = [(r["phase"], r["dropout"], r["kernel"]["sass"]["main_loop"]["imad_hi"])
                   for r in gemms if r["kernel"]["sass"]["main_loop"]["imad_hi"]]
    assert not with_philox


def _thread_instructions(row):
    warps = row["kernel"]["num_warps"]
    per_warp = (row["other_instructions"] + row["main_loop_instructions"] * (row["trips"] or 1)
                + row["later_loop_instructions"])
    return per_warp * warps * 32 * row["programs"]


def test_dropout_mask_costs_a_bounded_number_of_instructions_per_element(static_run):
    """Each launch that evaluates the mask does so once per element of x (M x K) at most
    MASK_INSTRUCTIONS_PER_ELEMENT thread instructions each; the launches that need no
    mask add none."""
    for strategy in STRATEGIES:
        launches = [r for r in _kernel_launches(static_run) if r["strategy"] == strategy]
        without = [r for r in launches if r["dropout"] == 0.0]
        with_dropout = [r for r in launches if r["dropout"] > 0.0]
        assert [r["name"] for r in without] == [r["name"] for r in with_dropout]
        elements = 8192 * 4096  # x, M x K
        cost = {}
        for index, (off, on) in enumerate(zip(without, with_dropout)):
            extra = _thread_instructions(on) - _thread_instructions(off)
            cost[f"{strategy} {index}: {on['phase']} {on['name']}"] = round(extra / elements, 1)
        assert all(c <= MASK_INSTRUCTIONS_PER_ELEMENT for c in cost.values()), cost
        masked = [name for name, c in cost.items() if c > 0.5]
        # the forward's rank pass, dX's epilogue (fused), and the dA reduction: three
        # per step; cublas makes dX's LoRA term in the dA reduction's launch: two
        assert len(masked) == {"fused": 3, "cublas": 2}[strategy], cost


def test_fp32_adapter_rank_products_run_on_the_tensor_cores_and_take_two_passes(static_run):
    """With fp32 adapters (the report's default) the rank pass and tn_matmul meet the
    16-bit x or dY with the fp32 operand's three exact parts on the tensor cores: their
    main loops hold MMAs and are priced per trip; the backward takes two passes over dY
    (rank pass for G, tn_matmul for dB and db), predicted cheaper than the one pass."""
    launches = _kernel_launches(static_run)
    assert not [r for r in launches if r["name"] == "_grad_output_kernel"]
    for name in ("_rank_product_kernel", "_tn_matmul_kernel"):
        rows = [r for r in launches if r["name"] == name and r["strategy"] == "cublas"]
        assert len(rows) == {"_rank_product_kernel": 4, "_tn_matmul_kernel": 4}[name], name
        for row in rows:
            loop = row["kernel"]["sass"]["main_loop"]
            assert loop and loop["HGMMA"] + loop["HMMA"] >= 3, (name, loop)
            assert row["trips"] > 1, name
            clocks = (row["main_loop_instructions"] * row["trips"] * row["kernel"]["num_warps"]
                      / roofline.MACHINES[90].schedulers_per_sm)
            assert row["terms_us"]["issue"] >= 0.99 * clocks / 1.83e9 * 1e6, name


# ---- QLoRA bases (--base)

QLORA_PROVIDERS = ("lorakern QLoRA", "lorakern QLoRA:fused", "lorakern QLoRA:cublas",
                   "dequant+cuBLAS", "nn.Linear", "peft QLoRA")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("static_qlora") / "report.json"
    command = [sys.executable, "-m", "bench.static", "--base", "nf4", "--shapes", "4096x4096",
               "--tokens", "16,8192", "--ranks", "16", "--dropout", "0.1", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=_compile_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"stdout": done.stdout, "report": json.loads(out.read_text())}


def _qlora_ms(report, provider, m, mode):
    (ms,) = [r["predicted_ms"] for r in report["records"]
             if r["provider"] == provider and r["M"] == m and r["mode"] == mode]
    return ms


def test_a_quantised_base_is_priced_for_every_provider_with_its_base_recorded(qlora_run):
    records = qlora_run["report"]["records"]
    assert {r["provider"] for r in records} == set(QLORA_PROVIDERS)
    assert all(r["base"] == "nf4" and r["adapter_dtype"] == "fp32" for r in records)
    for m in (16, 8192):
        for provider in QLORA_PROVIDERS:
            fwd, bwd, total = (_qlora_ms(qlora_run["report"], provider, m, mode)
                               for mode in ("fwd", "bwd", "fwd+bwd"))
            assert total == pytest.approx(fwd + bwd, abs=2e-4) and fwd > 0  # 4 digits
    assert "QLoRA ratios (predicted)" in qlora_run["stdout"]
    assert "base nf4 (bitsandbytes):" in qlora_run["stdout"]


def test_the_quantised_strategies_are_the_dequantising_gemm_and_a_buffer(qlora_run):
    kernels = {k["name"] for k in qlora_run["report"]["kernels"]}
    assert {"_qlora_gemm_kernel", "_dequant_4bit_kernel"} <= kernels
    report = qlora_run["report"]
    # the tuned figure is the faster strategy per phase: fused at decode, the
    # buffer and cuBLAS at M = 8192 (each program would dequantise its slice again)
    for m, faster in ((16, "lorakern QLoRA:fused"), (8192, "lorakern QLoRA:cublas")):
        assert _qlora_ms(report, "lorakern QLoRA", m, "fwd") == _qlora_ms(report, faster, m,
                                                                           "fwd")
    # PEFT QLoRA dequantises W in both directions, as the buffer strategy does, and
    # runs its fp32 LoRA branch: slower than lorakern at both token counts
    for m in (16, 8192):
        assert _qlora_ms(report, "peft QLoRA", m, "fwd+bwd") > \
            _qlora_ms(report, "lorakern QLoRA", m, "fwd+bwd")


def test_peft_qlora_pricing_dequantises_in_each_direction():
    from bench.cases import make_cases
    from bench.static_qlora import peft_qlora_ops

    (case,) = make_cases(shapes=("4096x4096",), tokens=(8192,), ranks=(16,), dropout=(0.1,),
                         dtypes=("bf16",), adapter_dtypes=("fp32",))
    for base in ("nf4", "int8"):
        ops = peft_qlora_ops(case, base)
        names = {phase: [name for name, _, _ in phase_ops] for phase, phase_ops in ops.items()}
        if base == "nf4":
            assert names["fwd"].count("dequantize_4bit") == 1
            assert "addmm x W^T + b" in names["fwd"]
        else:
            assert "int8 GEMM (int32 out)" in names["fwd"]
        assert "mm dX = dY W" in names["bwd"]
        assert any(name.startswith(("dequantize_4bit", "CB.mul_")) for name in names["bwd"])
        assert "mm h = drop(x) A^T (fp32)" in names["fwd"]  # PEFT's fp32 LoRA branch
