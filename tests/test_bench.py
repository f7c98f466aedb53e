"""Smoke tests of the benchmark (python -m selfattn.bench): structure, not speed.

They run its --quick path on tiny shapes with few rounds and a small GEMM, check the JSON and the
table, and check that an implementation whose estimated peak memory exceeds the budget is
reported as skipped, not run. Speed goals live in the benchmark's numbers, not here. The sweeps
with options of their own built on contest.py, and the ring sweep: tests/test_bench_sweeps.py.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import selfattn
from selfattn.bench import __main__ as bench_main
from selfattn.bench import cases, impls, isa, measure, run, variants
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


def test_quick_times_the_tutorials_module_on_small_shapes_only():
    """--quick's reference_max_seq skips the reference (seconds a call at N = 1024) past it, saying
    why, and nothing else; at or under it the reference runs."""
    layer_impls = [i for i in impls.implementations("cpu") if i.level == "layer"]
    long, short = (cases.Case(cases.Shape(1, n, 64, 2), False, "float32") for n in (257, 256))
    skips = run.plan_skips(layer_impls, long, "layer", ("fwd", "fwd+bwd"), 2, 1e15, reference_max_seq=256)
    assert set(skips) == {("reference", "fwd"), ("reference", "fwd+bwd")}
    assert "--quick" in skips[("reference", "fwd")].reason and "256" in skips[("reference", "fwd")].reason
    assert run.plan_skips(layer_impls, short, "layer", ("fwd",), 2, 1e15, reference_max_seq=256) == {}
    assert run.plan_skips(layer_impls, long, "layer", ("fwd",), 2, 1e15) == {}


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

