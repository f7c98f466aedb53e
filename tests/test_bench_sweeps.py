"""The sweeps of python -m selfattn.bench built on selfattn/bench/contest.py (overhead, dropout, jvp,
bf16, transformers) and the ring sweep: each runs tiny and fast on every CPU, and each test checks
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
from selfattn.bench import bf16, cases, dropout, jvp, measure, overhead
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
