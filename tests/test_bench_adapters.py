"""bench's several-adapter cases: the PEFT loop's priced ops and the device driver,
on a tiny case (CPU: the reference path; the numbers are not kernel timings)."""
import pytest

pytest.importorskip("peft")

from bench import multi, static_multi  # noqa: E402
from bench.cases import make_cases  # noqa: E402
from bench.linear import Timing  # noqa: E402


def test_even_split_and_peft_loop_ops_cover_every_row_once():
    split = static_multi.even_split(10, 4)
    assert split == sorted(split) and set(split) == {0, 1, 2, 3}
    assert multi.adapter_names(10, 4) == [f"a{a}" for a in split]
    case = make_cases(shapes=("64x48",), tokens=(10,), ranks=(4,), dtypes=("bf16",),
                      dropout=(0.0,))[0]
    ops = static_multi.peft_mixed_ops(case, 4)
    lora_a = [args for name, _, args in ops if name == "mm lora_A"]
    assert sum(m for m, *_ in lora_a) == 10 and len(lora_a) == 4
    assert ops[0][0].startswith("addmm")  # the base layer once


def test_bench_run_adapters_records_both_providers_and_scenarios(device, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "reference")  # the driver is tested, not kernels
    case = make_cases(shapes=("32x24",), tokens=(8,), ranks=(3,), dtypes=("fp32",),
                      dropout=(0.0,))[0]
    timing = Timing(warmup_ms=0.0, rep_ms=0.0, min_reps=2, max_reps=2)
    records = multi.run_case(case, 3, device, timing, {"device": str(device)})
    assert {(r["provider"], r["scenario"], r["status"]) for r in records} == {
        (p, s, "ok") for p in ("peft", "lorakern") for s in ("mixed", "stacked")}
    assert all(r["adapters"] == 3 for r in records)
    mixed = next(r for r in records if r["provider"] == "lorakern" and r["scenario"] == "mixed")
    assert mixed["max_rel_err_vs_peft"] < 1e-5
    assert "mixed" in multi.table(records)
