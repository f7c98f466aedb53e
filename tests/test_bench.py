"""Smoke tests of the benchmark (python -m selfattn.bench): structure, not speed.

They run its --quick path on tiny shapes with few rounds and a small GEMM, check the JSON and the
table, and check that an implementation whose estimated peak memory exceeds the budget is
reported as skipped, not run. Speed goals live in the benchmark's numbers, not here.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from selfattn.bench import cases, impls, measure, run
from selfattn.bench.__main__ import main

TINY = "1x32x64x2"


@pytest.fixture(autouse=True)
def small_and_serial(monkeypatch):
    """A small GEMM (its rate does not matter here) and one thread (a busy machine makes two
    threads wait on each other), restoring torch's thread count after."""
    monkeypatch.setattr(measure, "CPU_GEMM_SIZE", 256)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_bench(tmp_path, capsys, *extra):
    path = tmp_path / "out.json"
    code = main(["--quick", "--shapes", TINY, "--dtype", "float32", "--causal", "yes", "--repeats", "2",
                       "--threads", "1", "--json", str(path), *extra])
    assert code == 0
    return json.loads(path.read_text()), capsys.readouterr().out


def test_quick_run_structure(tmp_path, capsys):
    result, table = run_bench(tmp_path, capsys, "--no-memory", "--plot", str(tmp_path / "out.png"))
    meta = result["meta"]
    assert meta["levels"] == ["core", "layer"] and meta["modes"] == ["fwd", "fwd+bwd"]
    for key in ("device", "torch", "selfattn_build", "repeats", "memory_budget_bytes", "flop_unit", "wall_s"):
        assert key in meta
    impls = {(r["level"], r["impl"]) for r in result["records"]}
    assert impls == {("core", "selfattn"), ("core", "sdpa"), ("layer", "selfattn"), ("layer", "linear+sdpa"),
                     ("layer", "nn.MultiheadAttention"), ("layer", "eager"), ("layer", "reference")}
    for record in result["records"]:
        assert record["case"] == {"batch": 1, "seq": 32, "embed": 64, "heads": 2, "head_dim": 32, "causal": True,
                                  "dtype": "float32", "timed": True}
        assert record["memory"] == {}  # --no-memory
        for mode in ("fwd", "fwd+bwd"):
            entry = record["modes"][mode]
            assert entry["status"] == "ok", entry
            assert len(entry["times_ms"]) == 2 and entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
            assert entry["flops"] > 0 and entry["flop_rate"] > 0 and entry["pct_gemm"] > 0
            if record["impl"] == "selfattn":
                assert entry["speedup"] is None
            else:
                assert entry["speedup"]["min"] <= entry["speedup"]["median"] <= entry["speedup"]["max"]
    assert len(result["groups"]) == 4 and all(g["gemm_flop_rate"] > 0 for g in result["groups"])
    mha = next(r for r in result["records"] if r["impl"] == "nn.MultiheadAttention")
    assert mha["note"] and mha["modes"]["fwd"]["flops"] > cases.case_flops(
        cases.Case.from_json(mha["case"]), "layer", "fwd")  # its output projection is counted
    assert "| impl |" in table and "## Summary" in table and "nn.MultiheadAttention †" in table
    assert table.rstrip().splitlines()[-1].startswith("| (1, 32, 64, 2) | float32 | yes | 32 |")  # rates last
    assert "## Summary: GFLOP/s of every implementation, fwd / fwd+bwd" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "out.png").stat().st_size > 0


def budget_between(case: cases.Case) -> float:
    """A budget that every layer implementation fits, except the tutorial's reference."""
    layer_impls = [i for i in impls.implementations("cpu") if i.level == "layer"]
    n_sets = run.n_input_sets(case, "layer", 2)
    inputs = n_sets * cases.set_bytes(case, "layer")
    fits = max(i.estimate(case, m) for i in layer_impls if i.name != "reference" for m in cases.MEMORY_MODES) + inputs
    reference = next(i for i in layer_impls if i.name == "reference").estimate(case, "fwd") + inputs
    assert fits < reference
    return (fits + reference) / 2


def test_plan_skips_skips_what_does_not_fit():
    case = cases.Case(cases.Shape(1, 256, 64, 2), False, "float32")
    layer_impls = [i for i in impls.implementations("cpu") if i.level == "layer"]
    budget = budget_between(case)
    skips = run.plan_skips(layer_impls, case, "layer", ("fwd", "fwd+bwd"), 2, budget)
    assert set(skips) == {("reference", "fwd"), ("reference", "fwd+bwd")}
    assert skips[("reference", "fwd")].status == "skipped"
    assert skips[("reference", "fwd")].estimate_bytes > budget
    # The broadcast really is B·H·N²·D elements: 1·2·256²·32 float32 = 16 MiB at least.
    assert skips[("reference", "fwd")].estimate_bytes >= 16 * cases.MIB


def test_memory_measured_and_skip_reported(tmp_path, capsys):
    case = cases.Case(cases.Shape(1, 256, 64, 2), True, "float32")
    budget_gb = budget_between(case) / cases.GIB
    path = tmp_path / "out.json"
    assert main(["--quick", "--shapes", "1x256x64x2", "--dtype", "float32", "--causal", "yes", "--level",
                       "layer", "--repeats", "2", "--threads", "1", "--memory-budget-gb", str(budget_gb), "--json", str(path),
                       "--no-plot"]) == 0
    records = {r["impl"]: r for r in json.loads(path.read_text())["records"]}
    for mode in ("fwd", "fwd+bwd"):
        assert records["reference"]["modes"][mode]["status"] == "skipped"
        assert records["reference"]["memory"][mode]["status"] == "skipped"
        for name in ("selfattn", "linear+sdpa", "eager"):
            memory = records[name]["memory"][mode]
            assert memory["status"] == "ok", memory
            assert 0 <= memory["peak_bytes"] <= memory["estimate_bytes"]
    # eager holds B·H·N² scores: more than selfattn, which holds O(N) per head.
    assert records["eager"]["memory"]["fwd"]["peak_bytes"] > records["selfattn"]["memory"]["fwd"]["peak_bytes"]
    assert "skipped (est." in capsys.readouterr().out


def test_flop_counts():
    shape = cases.Shape(2, 128, 64, 4)
    full = 4 * 2 * 4 * 128 * 128 * 16
    assert cases.attention_flops(shape, False, "fwd") == full
    assert cases.attention_flops(shape, True, "fwd") == full / 2
    assert cases.attention_flops(shape, False, "fwd+bwd") == 3.5 * full
    assert cases.projection_flops(shape, "fwd") == 6 * 2 * 128 * 64 * 64
    assert cases.projection_flops(shape, "bwd") == 2 * cases.projection_flops(shape, "fwd")


def test_parse_shapes():
    assert cases.parse_shapes("8x512x512x8, 1x16x32x2") == (cases.Shape(8, 512, 512, 8), cases.Shape(1, 16, 32, 2))
    for bad in ("8x512x512", "8x512x510x8", "ax1x1x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="shape"):
            cases.parse_shapes(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_without_gpu_fails_gracefully():
    with pytest.raises(SystemExit, match="cuda"):
        main(["--device", "cuda", "--quick"])


def test_forced_sdpa_backends_report_unavailable(tmp_path, capsys, monkeypatch):
    """The CUDA rows (SDPA per forced backend), run on CPU: flash runs there, the others are
    reported unavailable with SDPA's reason, and the run goes on."""
    monkeypatch.setattr(run, "implementations", lambda device_type: impls.implementations("cuda"))
    result, table = run_bench(tmp_path, capsys, "--level", "core", "--no-memory", "--no-plot")
    modes = {r["impl"]: r["modes"] for r in result["records"]}
    assert modes["sdpa[flash]"]["fwd"]["status"] == "ok"
    assert modes["sdpa[flash]"]["fwd"]["backend"] == "forced flash_attention"
    refused = set(modes) & {"sdpa[efficient]", "sdpa[cudnn]"}
    assert refused, "no forced SDPA backend besides flash ran: the loop below would check nothing"
    for name in refused:
        assert modes[name]["fwd"]["status"] == "unavailable" and modes[name]["fwd"]["reason"]
        assert f"- {name} unavailable: " in table
