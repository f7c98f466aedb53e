"""The sweeps of python -m selfattn.bench built on selfattn/bench/contest.py (overhead, dropout, jvp,
bf16, transformers, scoremods) and the ring sweep: each runs tiny and fast on every CPU, and each test checks
that the ratios reported are the per-round ratios of the calls named and that those calls compute
what the sweep says they do (the dtype, the settings, the grad mode, dropout applied, the ranks'
allocator settings).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import selfattn
from selfattn.bench import bf16, cases, dropout, jvp, measure, overhead, scoremods
from selfattn.bench.__main__ import main


@pytest.fixture(autouse=True)
def restore_threads():
    """The sweeps run with --threads 1 (a busy machine makes two threads wait on each other); torch's
    thread count comes back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


SCOREMODS_TINY = ("--shapes", "1x2x16x8", "--dense-shapes", "1x1x8x256", "--dtypes", "float32")


def test_scoremods_sweep_reports_each_target_against_its_calls(tmp_path, capsys):
    """Each contest times the rows its targets name and the sgemm probe; each target row is the
    per-round ratio of the calls it names, passing exactly when its median meets the bound; the
    flex row says why it has no ratio."""
    result, out = run_sweep(tmp_path, capsys, "scoremods", *SCOREMODS_TINY, "--no-flex")
    probe = f"sgemm {scoremods.QUICK_GEMM_SIZE}³"
    mods, dense = "1x2x16x8", "1x1x8x256"
    expected = [f"{s} float32 {c} {m}" for s in (mods, dense) for c in ("not causal", "causal") for m in ("fwd", "fwd+bwd")]
    assert [o["case"] for o in result["outcomes"]] == expected
    targets = {t.label: t for t in (*scoremods.MOD_TARGETS, scoremods.FLEX_TARGET, scoremods.DENSE_TARGET)}
    for t in targets.values():  # a cost is a selfattn row over plain selfattn; a speedup a baseline over selfattn
        assert t.under.startswith("selfattn") and t.over.startswith("selfattn") == t.at_most, t
        assert t.under == scoremods.PLAIN or not t.at_most, t
    seen_labels = set()
    for outcome in result["outcomes"]:
        names = {scoremods.PLAIN, scoremods.SDPA} if outcome["case"].startswith(dense) else {
            scoremods.PLAIN, scoremods.SOFTCAPPED, scoremods.ALIBI, scoremods.SINKS, scoremods.GEMMA2,
            scoremods.GPT_OSS, scoremods.SDPA_ALIBI}
        assert set(outcome["times"]) == names | {probe}, outcome["case"]
        for label in outcome["ratios"]:
            assert_ratio(outcome, label, targets[label].over, targets[label].under)
            seen_labels.add(label)
        assert outcome["extra"]["sgemm GFLOP/s"] > 0 and outcome["extra"]["selfattn % of sgemm"] > 0
    assert seen_labels == set(targets) - {scoremods.FLEX_TARGET.label}
    verdicts = result["targets"]
    assert len(verdicts) == 4 * (len(scoremods.MOD_TARGETS) + 1) + 4
    for v in verdicts:
        t = targets[v["label"]]
        if v["label"] == scoremods.FLEX_TARGET.label:
            assert v["note"] == ("not run: --no-flex" if v["case"].endswith("fwd") else
                                 "FlexAttention's CPU backward raises: selfattn alone"), v
            continue
        assert v["median"] == result["outcomes"][expected.index(v["case"])]["ratios"][v["label"]]["median"]
        assert v["pass"] == (v["median"] <= t.bound if t.at_most else v["median"] >= t.bound), v
        assert v["target"] == ("≤ " if t.at_most else "≥ ") + f"{t.bound:g}×"
    assert result["flex"] == {f"{mods} float32 {c} fwd": "not run: --no-flex" for c in ("not causal", "causal")}
    assert "## Targets" in out and "CPU flags:" in out and f"{probe} in the same rounds: median" in out
    assert "| 1x2x16x8 float32 causal fwd+bwd | sinks cost, t(sinks) / t(plain) |" in out


def math_attention(q, k, v, sinks=None, *, causal, softcap=0.0, slopes=None):
    """The score modifications written out (ops.py's docstring), in the calls' (B, N, H, D) layout."""
    n = q.shape[-2]
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        pos = torch.arange(n, dtype=s.dtype)
        s = s - slopes.to(s.dtype)[:, None, None] * (pos[:, None] - pos[None, :]).abs()
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :n]
    return (p @ v).transpose(1, 2)


SCOREMODS_ROWS = {"softcap": (scoremods.GEMMA2, scoremods.SOFTCAPPED), "sinks": (scoremods.GPT_OSS, scoremods.SINKS),
                  "alibi": (scoremods.SDPA_ALIBI, scoremods.ALIBI)}


def scoremods_results(modification, causal, mode):
    """(the baseline's, selfattn's, selfattn-without-it's and the written-out float64 result): the
    (B, N, H, D) output for fwd; for fwd+bwd, the gradients of q, k, v (and sinks) flattened."""
    shape = (1, 2, 16, 8)
    calls = scoremods.mod_calls(shape, torch.float32, causal, mode)
    baseline, ours = SCOREMODS_ROWS[modification]
    q, k, v, grad_out, slopes, sinks = scoremods.inputs(shape, torch.float32, mode)
    leaves = [t.detach().double().requires_grad_() for t in ((q, k, v, sinks) if modification == "sinks" else (q, k, v))]
    mods = {"softcap": {"softcap": scoremods.SOFTCAP}, "alibi": {"slopes": slopes}, "sinks": {}}[modification]
    want = math_attention(*leaves, causal=causal, **mods)
    if mode != "fwd":
        want = torch.autograd.grad(want, leaves, grad_out.double())
    flat = (lambda r: r.float()) if mode == "fwd" else (lambda r: torch.cat([g.flatten().float() for g in r]))
    return flat(calls[baseline]()), flat(calls[ours]()), flat(calls[scoremods.PLAIN]()[:3]) if mode != "fwd" else \
        flat(calls[scoremods.PLAIN]()), flat(want)


@pytest.mark.parametrize("causal", [False, True], ids=["not causal", "causal"])
@pytest.mark.parametrize("mode", scoremods.MODES)
@pytest.mark.parametrize("modification", SCOREMODS_ROWS)
def test_scoremods_baselines_compute_the_modification(modification, causal, mode):
    """Gemma 2's eager softcap, GPT-OSS's eager sinks and SDPA's ALiBi mask give the modification
    written out, outputs (fwd) and gradients (fwd+bwd, sinks' too), and it changes the result: a
    baseline that drops or bends its modification fails here."""
    baseline, _, plain, want = scoremods_results(modification, causal, mode)
    assert baseline.shape == want.shape and torch.allclose(baseline, want, atol=2e-5), (baseline - want).abs().max()
    assert (want[:plain.numel()] - plain).abs().max() > 1e-3  # the modification takes effect


@pytest.mark.parametrize("causal", [False, True], ids=["not causal", "causal"])
@pytest.mark.parametrize("mode", scoremods.MODES)
@pytest.mark.parametrize("modification", ["softcap", "alibi"])
def test_scoremods_selfattn_rows_apply_softcap_and_alibi(modification, causal, mode):
    """selfattn's softcap and ALiBi rows compute the modification, gradients included (a row that
    drops it fails; fwd+bwd needs the CPU backward of b3cd8b1)."""
    _, ours, _, want = scoremods_results(modification, causal, mode)
    assert torch.allclose(ours, want, atol=2e-5), (ours - want).abs().max()


@pytest.mark.parametrize("causal", [False, True], ids=["not causal", "causal"])
@pytest.mark.parametrize("mode", scoremods.MODES)
def test_scoremods_selfattn_sinks_row_applies_the_sinks(causal, mode):
    _, ours, _, want = scoremods_results("sinks", causal, mode)
    assert torch.allclose(ours, want, atol=2e-5), (ours - want).abs().max()


def test_scoremods_calls_return_the_layout_a_model_reads():
    outs = scoremods.mod_calls((1, 2, 16, 8), torch.float32, False, "fwd")
    assert {name: fn().shape for name, fn in outs.items()} == {name: (1, 16, 2, 8) for name in outs}


def test_scoremods_bfloat16_calls_run_in_bfloat16():
    outs = {name: fn() for name, fn in scoremods.mod_calls((1, 2, 16, 8), torch.bfloat16, True, "fwd").items()}
    assert {o.dtype for o in outs.values()} == {torch.bfloat16}
    assert torch.allclose(outs[scoremods.GEMMA2].float(), outs[scoremods.SOFTCAPPED].float(), atol=3e-2)
    assert torch.allclose(outs[scoremods.GPT_OSS].float(), outs[scoremods.SINKS].float(), atol=3e-2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True], ids=["not causal", "causal"])
def test_scoremods_flex_score_mod_is_the_softcap(causal):
    """The flex row's score_mod and block mask (run eagerly here: compiling takes seconds) give
    selfattn's softcap output."""
    q, k, v, _, _, _ = scoremods.inputs((1, 2, 16, 8), torch.float32, "fwd")
    got = scoremods.flex_forward(q, causal, scoremods.SOFTCAP, compiled=False)(q, k, v)
    want = scoremods.mod_calls((1, 2, 16, 8), torch.float32, causal, "fwd")[scoremods.SOFTCAPPED]()
    plain = scoremods.mod_calls((1, 2, 16, 8), torch.float32, causal, "fwd")[scoremods.PLAIN]()
    assert torch.allclose(got, want, atol=2e-5) and not torch.allclose(got, plain, atol=1e-3)


def test_scoremods_sweep_reports_flex_unavailable_with_the_reason(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here\nmore")
    monkeypatch.setattr(scoremods, "flex_forward", broken)
    result, out = run_sweep(tmp_path, capsys, "scoremods", *SCOREMODS_TINY, "--causal", "yes")
    reason = "unavailable: RuntimeError: no C++ compiler here"
    assert result["flex"] == {"1x2x16x8 float32 causal fwd": reason}
    assert [v["note"] for v in result["targets"] if v["label"] == scoremods.FLEX_TARGET.label] == [
        reason, "FlexAttention's CPU backward raises: selfattn alone"]
    assert scoremods.FLEX not in result["outcomes"][0]["times"] and reason in out
