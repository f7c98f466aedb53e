"""Smoke tests of the benchmark (python -m selfattn.bench): structure, not speed.

They run its --quick path on tiny shapes with few rounds and a small GEMM, check the JSON and the
table, and check that an implementation whose estimated peak memory exceeds the budget is
reported as skipped, not run. Speed goals live in the benchmark's numbers, not here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

import selfattn
from selfattn.bench import bf16, cases, dropout, impls, isa, jvp, measure, overhead, run, variants
from selfattn.bench import __main__ as bench_main
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


@pytest.mark.parametrize("native", [False, True], ids=["no bf16 arithmetic", "bf16 arithmetic"])
def test_quick_leaves_bf16_out_where_the_cpu_has_no_bf16_arithmetic(tmp_path, capsys, monkeypatch, native):
    """--quick runs the sweep's bfloat16 cases only on a CPU with bf16 arithmetic (pretended here
    either way), and says when it skipped them; --dtype bfloat16 runs them anyway."""
    monkeypatch.setattr(bench_main, "bf16_arithmetic", lambda: native)
    path = tmp_path / "out.json"
    tiny = ["--quick", "--shapes", TINY, "--causal", "yes", "--level", "core", "--modes", "fwd", "--repeats", "2",
            "--threads", "1", "--no-memory", "--no-plot", "--json", str(path)]
    assert main(tiny) == 0
    out = capsys.readouterr().out
    assert {r["case"]["dtype"] for r in json.loads(path.read_text())["records"]} == (
        {"float32", "bfloat16"} if native else {"float32"})
    assert ("--quick skips bfloat16: this CPU" in out and "no bf16 arithmetic" in out) != native
    assert main(tiny + ["--dtype", "bfloat16"]) == 0
    assert {r["case"]["dtype"] for r in json.loads(path.read_text())["records"]} == {"bfloat16"}
    assert "--quick skips" not in capsys.readouterr().out


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


# ---------------------------------------------------------------------------------------------
# The masks sweep (issue 9's cases)

MASK_VARIANTS = ("padding", "varlen", "gqa", "window", "random")
TINY_MASKS = "2x64x64x4"  # H = 4, D = 16: GQA's Hk = 1; the window (left 255) spans every row


def _varlen_by_calls(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """A stand-in for selfattn.attention_varlen (FlashAttention's packed layout), one call per sequence."""
    outs = []
    for s in range(len(cu_q) - 1):
        rows_q, rows_k = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        out = selfattn.attention(*(t[r].transpose(0, 1) for t, r in ((q, rows_q), (k, rows_k), (v, rows_k))),
                                 causal=causal)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture(params=["built", "missing"])
def varlen(request, monkeypatch):
    """Runs a test with selfattn.attention_varlen (the real one, else the stand-in) and without it."""
    if request.param == "missing":
        monkeypatch.delattr(selfattn, "attention_varlen", raising=False)
    elif not hasattr(selfattn, "attention_varlen"):
        monkeypatch.setattr(selfattn, "attention_varlen", _varlen_by_calls, raising=False)
    return request.param


def test_masks_sweep_rows_and_ratios(tmp_path, capsys, varlen):
    path = tmp_path / "out.json"
    assert main(["--sweep", "masks", "--quick", "--shapes", TINY_MASKS, "--repeats", "2", "--threads", "1",
                 "--json", str(path), "--no-plot"]) == 0
    table = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["meta"]["levels"] == ["masks"] and result["meta"]["modes"] == ["fwd", "fwd+bwd"]
    by_variant = {}
    for record in result["records"]:
        by_variant.setdefault(record["case"]["variant"], {})[record["impl"]] = record
    assert tuple(by_variant) == MASK_VARIANTS
    summary = table[table.index("## Summary: masked variants"):].splitlines()
    for variant, rows in by_variant.items():
        expected = {"selfattn", "selfattn plain", "sdpa"} | ({"selfattn separate"} if variant == "varlen" else set())
        assert set(rows) == expected, variant
        assert any(line.startswith(f"| {variant} |") for line in summary), variant
        if variant == "varlen" and varlen == "missing":
            for record in rows.values():
                for mode in ("fwd", "fwd+bwd"):
                    assert record["modes"][mode]["status"] == "unavailable"
                    assert "attention_varlen" in record["modes"][mode]["reason"]
            continue
        ours = rows["selfattn"]["modes"]
        for name, record in rows.items():
            for mode in ("fwd", "fwd+bwd"):
                entry = record["modes"][mode]
                assert entry["status"] == "ok", (variant, name, mode, entry)
                assert len(entry["times_ms"]) == 2 and all(t > 0 for t in entry["times_ms"])
                assert entry["flops"] > 0 and math.isfinite(entry["flop_rate"])
                if name != "selfattn":
                    ratios = [t / s for t, s in zip(entry["times_ms"], ours[mode]["times_ms"])]
                    assert all(math.isfinite(r) and r > 0 for r in ratios)
                    assert entry["speedup"]["min"] <= entry["speedup"]["median"] <= entry["speedup"]["max"]
                    assert math.isfinite(entry["speedup"]["median"])
    summary_rows = [line for line in summary if line.startswith("| ") and not line.startswith("| variant")]
    assert len(summary_rows) == len(MASK_VARIANTS)
    assert not any(word in line for line in summary_rows for word in ("nan", "inf"))


def _rows(case):
    """Each masks-level row of a case, built and run forward once on one input set."""
    inputs = impls.make_inputs(case, "masks", torch.device("cpu"), grads=False)
    outs = {}
    for impl in impls.implementations("cpu"):
        if impl.level == "masks" and impl.applies(case):
            built = impl.build(case, torch.device("cpu"), inputs)
            step = impls.make_step(built, [inputs], [], "fwd")
            outs[impl.name] = step()
    return outs


def _real_rows(out, case):
    """An output, (B, H, N, D), packed (T, H, D) or one (1, H, n, D) per sequence, as (B, H, N, D)
    with the rows past each sequence's length zeroed."""
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        out = variants.pack(out, case)
    parts = out if isinstance(out, list) else variants.unpack_views(out, case)
    padded = torch.zeros(case.shape.batch, case.shape.heads, case.shape.seq, case.shape.head_dim)
    for b, part in enumerate(parts):
        padded[b, :, :part.shape[2]] = part[0]
    return padded


@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_masks_rows_compute_their_problem(variant, monkeypatch):
    """selfattn's row really runs the variant: it gives SDPA's row's output (SDPA with the same mask,
    or enable_gqa) and differs from the plain row's, which runs without it (except GQA, where plain
    gets k and v repeated: the same result); its credited FLOPs are the variant's visible pairs."""
    if not hasattr(selfattn, "attention_varlen"):
        monkeypatch.setattr(selfattn, "attention_varlen", _varlen_by_calls, raising=False)
    # The window case: N > left + 1 = 256, so that the window hides keys.
    shape = cases.Shape(1, 300, 32, 2) if variant == "window" else cases.Shape(2, 64, 64, 4)
    case = cases.Case(shape, variant == "window", "float32", variant)
    outs = _rows(case)
    ours, sdpa, plain = outs["selfattn"], outs["sdpa"], outs["selfattn plain"]
    if variant == "varlen":  # SDPA and plain ran the padded batch: compare the sequences' rows
        ours, sdpa, plain = (_real_rows(out, case) for out in (ours, sdpa, plain))
        assert torch.allclose(_real_rows(outs["selfattn separate"], case), ours, atol=1e-5)
    assert torch.allclose(ours, sdpa, atol=1e-5, rtol=1e-4), (ours - sdpa).abs().max()
    if variant == "gqa":
        assert torch.allclose(ours, plain, atol=1e-5, rtol=1e-4)
    else:
        assert not torch.allclose(ours, plain, atol=1e-3), "the variant changed nothing: is it applied?"
    level = cases.case_flops(case, "masks", "fwd")
    plain_flops = next(i for i in impls.IMPLEMENTATIONS if i.name == "selfattn plain").flops(case, "fwd")
    assert level == 4 * shape.head_dim * variants.VARIANTS[variant].pairs(case)
    assert (level == plain_flops) if variant == "gqa" else (level < plain_flops)


def test_masks_visible_pairs():
    n, left = 300, 255
    case = cases.Case(cases.Shape(1, n, 64, 2), True, "float32", "window")
    assert variants.window_pairs(case) == 2 * sum(min(i, left) + 1 for i in range(n))
    assert variants.plain_pairs(case) == 2 * n * (n + 1) // 2
    lengths = variants.lengths(8, 512)
    assert lengths == variants.lengths(8, 512) and all(256 <= m <= 512 for m in lengths)
    case = cases.Case(cases.Shape(8, 512, 512, 8), False, "float32", "padding")
    assert variants.padding_pairs(case) == 8 * 512 * sum(lengths)
    assert variants.varlen_pairs(case) == 8 * sum(m * m for m in lengths)
    assert variants.padding_mask(case, torch.device("cpu")).sum() == sum(lengths)
    packed = variants.pack(torch.randn(8, 8, 512, 64), case)
    assert packed.shape == (sum(lengths), 8, 64)
    assert [v.shape[2] for v in variants.unpack_views(packed, case)] == list(lengths)


@pytest.mark.skipif(not isa.cpu_flags(), reason="no /proc/cpuinfo flags to tell the caps this CPU can run")
def test_isa_sweep_caps_both_sides_and_says_what_ran(tmp_path, capsys):
    """--sweep isa with the baseline cap (every x86-64 CPU runs it): the probe finds ATen and
    selfattn both on DEFAULT, and the run's tables come back under the cap's heading."""
    path = tmp_path / "isa.json"
    assert main(["--sweep", "isa", "--caps", "default", "--probe-size", "64", "--quick", "--shapes", TINY,
                 "--dtype", "float32", "--causal", "no", "--level", "core", "--modes", "fwd", "--repeats", "2",
                 "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    (only,) = result["runs"]
    assert only["cap"] == "default" and only["env"]["ATEN_CPU_CAPABILITY"] == "default"
    assert only["probe"]["aten"] == "DEFAULT" and only["probe"]["selfattn"] == "DEFAULT"
    assert set(only["probe"]["rates"]) == {"sgemm", "bf16 matmul"}
    assert {r["impl"] for r in only["result"]["records"]} == {"selfattn", "sdpa"}
    assert "cap default (`SELFATTN_CPU_CAPABILITY=default`" in out and "ran: ATen DEFAULT, selfattn DEFAULT" in out
    assert "| selfattn |" in out


def test_isa_cap_check_names_the_side_that_runs_another_set():
    assert isa.check_cap("avx2", {"aten": "AVX2", "selfattn": "AVX2"}) is None
    assert isa.check_cap("avx512", {"aten": "AVX2", "selfattn": "AVX512"}) == "capped to avx512, but aten runs AVX2"
    assert isa.check_cap("amx", {"aten": "AVX512", "selfattn": "AVX512"}) is None


def test_blocking_sweep_times_each_block_and_names_the_models(capsys):
    """--sweep blocking: a row per query block and SDPA for each shape, causal and not; the
    model's block on this machine marked; the caches restored afterwards."""
    caches = torch.ops.selfattn._cpu_caches()
    assert main(["--sweep", "blocking", "--rounds", "1", "--shapes", "1x2x96x32", "--blocks", "32,64",
                 "--gemm-size", "64"]) == 0
    out = capsys.readouterr().out
    assert out.count("**1x2x96x32, non-causal**") == 1 and out.count("**1x2x96x32, causal**") == 1
    own = torch.ops.selfattn._cpu_forward_query_block(caches, 32, 32, 4, 16 if
                                                      selfattn.build_info().cpu_capability == "AVX512" else 8)
    assert out.count(f"the model's block here: {own};") == 2
    for label in ("| 32", "| 64", "| SDPA |"):
        assert out.count(label) == 2, label
    assert torch.ops.selfattn._cpu_caches() == caches
    with pytest.raises(SystemExit, match="cannot give a query block of 20"):
        main(["--sweep", "blocking", "--rounds", "1", "--shapes", "1x2x96x32", "--blocks", "20"])


# ---------------------------------------------------------------------------------------------
# The small sweeps (selfattn/bench/contest.py and its users): tiny, fast on every CPU, and each
# checks that its ratios are the per-round ratios of the calls it names and that those calls
# compute what the sweep says they do.


def run_sweep(tmp_path, capsys, sweep, *args):
    path = tmp_path / f"{sweep}.json"
    assert main(["--sweep", sweep, "--quick", "--repeats", "2", "--threads", "1", "--json", str(path), *args]) == 0
    return json.loads(path.read_text()), capsys.readouterr().out


def assert_ratio(outcome, label, over, under):
    """The reported ratio is the median (min-max) of the per-round t_over / t_under."""
    ratios = [a / b for a, b in zip(outcome["times"][over]["times_ms"], outcome["times"][under]["times_ms"])]
    reported = outcome["ratios"][label]
    assert len(ratios) == 2 and reported["median"] == pytest.approx(statistics.median(ratios))
    assert (reported["min"], reported["max"]) == pytest.approx((min(ratios), max(ratios)))


def test_overhead_sweep_times_both_calls_in_each_grad_mode(tmp_path, capsys, monkeypatch):
    seen, real_calls = [], overhead.calls

    def recording(shape, mode):  # each call notes whether autograd was on when it ran
        fns = real_calls(shape, mode)
        return {name: (lambda fn=fn: seen.append((mode, torch.is_grad_enabled(), fn().shape)))
                for name, fn in fns.items()}
    monkeypatch.setattr(overhead, "calls", recording)
    result, out = run_sweep(tmp_path, capsys, "overhead", "--shapes", "1x1x1x8,1x2x3x8")
    assert [o["case"] for o in result["outcomes"]] == [f"{s} {m}" for s in ("(1, 1, 1, 8)", "(1, 2, 3, 8)")
                                                       for m in ("no grad", "grad")]
    for outcome in result["outcomes"]:
        assert set(outcome["times"]) == {"selfattn", "sdpa"}
        assert_ratio(outcome, "selfattn speedup over SDPA", "sdpa", "selfattn")
    assert {(mode, grad) for mode, grad, _ in seen} == {("no grad", False), ("grad", True)}
    assert {shape for _, _, shape in seen} == {(1, 1, 1, 8), (1, 2, 3, 8)}
    assert "| (1, 2, 3, 8) grad | selfattn speedup over SDPA |" in out and "CPU flags:" in out


@pytest.mark.parametrize("mode", overhead.MODES)
def test_overhead_calls_are_the_same_attention(mode):
    outs = {name: fn() for name, fn in overhead.calls((1, 2, 3, 8), mode).items()}
    assert torch.allclose(outs["selfattn"], outs["sdpa"], atol=1e-6)
    assert all(out.requires_grad == (mode == "grad") for out in outs.values())


def test_dropout_sweep_reports_each_cost_and_the_speedup(tmp_path, capsys):
    result, out = run_sweep(tmp_path, capsys, "dropout", "--shapes", "1x2x16x8", "--p", "0.25")
    assert result["p"] == 0.25 and [o["case"] for o in result["outcomes"]] == ["(1, 2, 16, 8) fwd",
                                                                                "(1, 2, 16, 8) fwd+bwd"]
    for outcome in result["outcomes"]:
        assert set(outcome["times"]) == {"selfattn p=0.0", "selfattn p=0.25", "sdpa p=0.0", "sdpa p=0.25"}
        assert_ratio(outcome, "selfattn dropout cost, t(p) / t(0)", "selfattn p=0.25", "selfattn p=0.0")
        assert_ratio(outcome, "SDPA dropout cost, t(p) / t(0)", "sdpa p=0.25", "sdpa p=0.0")
        assert_ratio(outcome, "selfattn speedup over SDPA at p=0.25", "sdpa p=0.25", "selfattn p=0.25")
    assert "selfattn speedup over SDPA at p=0.25" in out


def test_dropout_calls_drop_at_p_only():
    """The p calls really drop (their results differ from p = 0), the p = 0 ones agree, and fwd+bwd
    returns the three input gradients."""
    fwd = {name: fn() for name, fn in dropout.calls((1, 2, 16, 8), 0.5, "fwd").items()}
    assert torch.allclose(fwd["selfattn p=0.0"], fwd["sdpa p=0.0"], atol=1e-6)
    for name in ("selfattn p=0.5", "sdpa p=0.5"):
        assert not torch.allclose(fwd[name], fwd["sdpa p=0.0"], atol=1e-3), name
    grads = dropout.calls((1, 2, 16, 8), 0.5, "fwd+bwd")["selfattn p=0.0"]()
    assert len(grads) == 3 and all(g.shape == (1, 2, 16, 8) for g in grads)


def test_jvp_sweep_times_both_and_their_tangents_agree(tmp_path, capsys):
    result, out = run_sweep(tmp_path, capsys, "jvp", "--shapes", "1x2x16x8")
    assert [o["case"] for o in result["outcomes"]] == ["(1, 2, 16, 8) not causal", "(1, 2, 16, 8) causal"]
    for outcome in result["outcomes"]:
        assert set(outcome["times"]) == {"selfattn", "sdpa math"}
        assert_ratio(outcome, "selfattn speedup over SDPA math", "sdpa math", "selfattn")
        assert 0 <= outcome["extra"]["max_tangent_difference"] < 1e-4
    assert "largest tangent difference" in out


def test_jvp_calls_compute_a_tangent_that_depends_on_causal():
    (out, tangent), (_, math_tangent) = (fn() for fn in jvp.calls((1, 2, 16, 8), True).values())
    full = jvp.calls((1, 2, 16, 8), False)["selfattn"]()[1]
    assert tangent.shape == out.shape == (1, 2, 16, 8)
    assert torch.allclose(tangent, math_tangent, atol=1e-5) and not torch.allclose(tangent, full, atol=1e-3)


@pytest.mark.parametrize("native", [False, True], ids=["no bf16 arithmetic", "bf16 arithmetic"])
def test_bf16_sweep_rows_probes_and_skips(tmp_path, capsys, monkeypatch, native):
    """Every row against selfattn-bf16, the probes at the size asked for; without bf16 arithmetic
    (as on this CPU or pretended) the same-code rows, the bf16 matmul probe and, in --quick, the
    layer level are skipped and the output says so. (Pretending bf16 arithmetic only adds rows:
    they run the float32 path where the CPU has none.)"""
    monkeypatch.setattr(bf16, "bf16_arithmetic", lambda: native)
    size = ["--gemm-size", "64"] if native else []  # without: --quick's own size (a bf16 matmul would be slow)
    result, out = run_sweep(tmp_path, capsys, "bf16", "--shapes", "1x32x32x2", *size)
    assert result["gemm_size"] == (64 if native else bf16.QUICK_GEMM_SIZE) and result["bf16_arithmetic"] == native
    assert result["levels"] == (["core", "layer"] if native else ["core"])
    assert len(result["outcomes"]) == len(result["levels"]) * 4
    other = f"selfattn-bf16 ({bf16.other_tile_gemm()})"
    rows = {"selfattn-bf16", "sdpa-bf16", "selfattn-fp32"} | ({other, "selfattn-bf16 (fp32 path)"} if native else set())
    probes = {f"sgemm {result['gemm_size']}³"} | ({"bf16 matmul 64³"} if native else set())
    for outcome in result["outcomes"]:
        assert set(outcome["times"]) == rows | probes, outcome["case"]
        for name in rows - {"selfattn-bf16"}:
            assert_ratio(outcome, f"selfattn-bf16 speedup over {name}", name, "selfattn-bf16")
        assert {f"% of {p}" for p in probes} | {"selfattn-bf16 GFLOP/s"} == set(outcome["extra"])
    assert ("no bf16 arithmetic" in out and "layer level are not timed" in out) != native


def test_bf16_calls_run_their_dtype_and_settings(monkeypatch):
    """Each row computes attention in its dtype, with its settings in force during the call."""
    seen = []
    real = selfattn.attention

    def recording(*args, **kwargs):
        seen.append((args[0].dtype, os.environ.get("SELFATTN_BF16_KERNELS"), os.environ.get("SELFATTN_BF16_GEMM")))
        return real(*args, **kwargs)
    monkeypatch.setattr(selfattn, "attention", recording)
    monkeypatch.delenv("SELFATTN_BF16_KERNELS", raising=False)
    monkeypatch.delenv("SELFATTN_BF16_GEMM", raising=False)
    fns = bf16.calls(cases.Shape(1, 32, 32, 2), True, "core", "fwd", native=True)
    outs = {}
    for name, fn in fns.items():
        seen.clear()
        outs[name] = fn()
        assert seen or name == "sdpa-bf16", name
        dtype, kernels, gemm = seen[0] if seen else (None, None, None)
        assert (dtype, kernels, gemm) == {
            "selfattn-bf16": (torch.bfloat16, None, None), "selfattn-fp32": (torch.float32, None, None),
            "selfattn-bf16 (fp32 path)": (torch.bfloat16, "0", None), "sdpa-bf16": (None, None, None),
            f"selfattn-bf16 ({bf16.other_tile_gemm()})": (torch.bfloat16, None, bf16.other_tile_gemm())}[name], name
    assert outs["selfattn-bf16"].dtype == outs["sdpa-bf16"].dtype == torch.bfloat16
    assert torch.allclose(outs["selfattn-bf16"].float(), outs["sdpa-bf16"].float(), atol=3e-2)
    assert "SELFATTN_BF16_KERNELS" not in os.environ  # restored


def test_ring_sweep_runs_each_world_size_with_its_allocator_settings(tmp_path, capsys):
    """--sweep ring starts W ranks per world size; each reports a peak per rank that holds at least
    the three input gradients it made, under the fixed mmap threshold and one thread."""
    path = tmp_path / "ring.json"
    assert main(["--sweep", "ring", "--world-sizes", "1,2", "--seq", "512", "--heads", "4", "--repeats", "2",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    runs = json.loads(path.read_text())["runs"]
    assert [r["world"] for r in runs] == [1, 2] and [r["rows_per_rank"] for r in runs] == [512, 256]
    for run_ in runs:
        assert run_["rank_env"] == {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        assert len(run_["peak_bytes"]) == run_["world"] and len(run_["wall_s"]) == 2
        gradients = run_["input_bytes_per_rank"]  # dq, dk, dv: as large as q, k, v
        assert all(median >= gradients and peak >= median for median, peak in run_["peak_bytes"]), run_
        assert run_["cpu_s_all_ranks"] > 0 and all(t > 0 for t in run_["wall_s"])
    assert out.count("| 1 | 512 |") == 1 and out.count("| 2 | 256 |") == 1 and "MALLOC_MMAP_THRESHOLD_=65536" in out


def test_ring_sweep_refuses_a_length_the_zigzag_cannot_split():
    with pytest.raises(SystemExit, match="zigzag"):
        main(["--sweep", "ring", "--world-sizes", "4", "--seq", "100"])


def test_transformers_sweep_says_it_needs_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import of it raises ImportError
    with pytest.raises(SystemExit, match="needs Hugging Face transformers, which is not installed"):
        main(["--sweep", "transformers", "--quick"])


def test_import_selfattn_and_its_benchmark_never_import_transformers():
    code = ("import sys, selfattn, selfattn.bench.__main__, selfattn.bench.transformers; "
            "assert 'transformers' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=measure.child_env())
    assert done.returncode == 0, done.stderr[-2000:]


def test_transformers_sweep_times_both_models(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from selfattn.bench import transformers as hf_sweep
    monkeypatch.setattr(hf_sweep, "QUICK", {"batch": 2, "seq": 16, "layers": 1})
    sdpa, ours = hf_sweep.models(hf_sweep.QUICK, torch.float32)
    assert (sdpa.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", "selfattn")
    for padded in (False, True):
        batch = hf_sweep.inputs(hf_sweep.QUICK, padded)
        with torch.no_grad():
            expected, got = (hf_sweep.step(m.eval(), batch, "forward")() for m in (sdpa, ours))
        real = batch["attention_mask"].bool()
        assert torch.allclose(got[real], expected[real], atol=1e-4)
    result, out = run_sweep(tmp_path, capsys, "transformers")
    assert [o["case"] for o in result["outcomes"]] == [f"{p} {m}" for p in ("unpadded (is_causal)", "left-padded (mask)")
                                                       for m in ("forward", "forward+backward")]
    for outcome in result["outcomes"]:
        assert set(outcome["times"]) == {"sdpa", "selfattn"}
        assert_ratio(outcome, "selfattn speedup over sdpa", "sdpa", "selfattn")
