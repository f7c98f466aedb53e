"""The CPU decode path (csrc/cpu/attention_decode.cpp): few query rows against a long key/value
cache, the keys split over work items and merged by lse.

The forward takes it when Nq · (Hq / Hk) <= 64; SELFATTN_DECODE_SPLITS forces the number of key
splits (0 turns the path off). The oracle is tests/test_masks.py's: an explicit float64 softmax
over a dense mask built here from the arguments' meaning, k and v repeated over each group.
"""

from __future__ import annotations

import math

import pytest
import torch

import selfattn

# The scale is 1/sqrt(D), as in real use: the oracle's default 0.37 gives scores large enough that
# the (unchanged) backward's gradients pass the tolerance narrowly, and fail it in a few draws out of
# a hundred, on the tiled kernel too — which this path matches bit for bit at S = 1.
from tests.test_masks import band_visible, check_against_oracle, dense_mask, inputs

ops = torch.ops.selfattn
SPLITS = ["auto", "1", "2", "7"]


@pytest.fixture
def decode_splits(monkeypatch):
    """Sets SELFATTN_DECODE_SPLITS for the test ("auto": unset)."""
    def set_splits(splits):
        if splits == "auto":
            monkeypatch.delenv("SELFATTN_DECODE_SPLITS", raising=False)
        else:
            monkeypatch.setenv("SELFATTN_DECODE_SPLITS", str(splits))
    return set_splits


def decode_mask(kind, b, hq, nq, nk, dtype):
    """The masks a decoding step meets: HF's key padding (left or right, a (B, 1, 1, Nk) view
    expanded to Nq), random bool and float masks per head, a float mask hiding whole key ranges."""
    float_dtype = torch.float32 if dtype == torch.float64 else dtype
    if kind is None:
        return None
    if kind == "left padding":
        lengths = torch.randint(1, nk + 1, (b,))
        keep = torch.arange(nk).view(1, 1, 1, -1) >= (nk - lengths).view(-1, 1, 1, 1)
        return keep.expand(b, 1, nq, nk)
    if kind == "right padding":
        lengths = torch.randint(1, nk + 1, (b,))
        return torch.arange(nk).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1)
    if kind == "bool":
        return torch.rand(b, hq, nq, nk) > 0.3
    if kind == "float":
        return torch.randn(b, hq, nq, nk, dtype=float_dtype)
    if kind == "float -inf ranges":  # hides the first half of the keys from even heads: empty splits
        mask = torch.zeros(b, hq, nq, nk, dtype=float_dtype)
        mask[:, ::2, :, : nk // 2] = -math.inf
        return mask
    raise ValueError(kind)


# --- against the oracle: out and the gradients through the decode forward's out and lse ----------

BANDS = [(False, None), ("bottom_right", None), (True, None), ("bottom_right", (5, -1)),
         (False, (40, 0)), ("bottom_right", (100, 0))]


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("causal,window", BANDS, ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("nq,nk", [(1, 17), (1, 300), (3, 300), (3, 5), (1, 700)])
def test_band_and_groups(decode_splits, splits, causal, window, group, nq, nk):
    decode_splits(splits)
    check_against_oracle(*inputs(2, 2 * group, 2, nq, nk, 32), causal=causal, window=window, scale=32**-0.5)


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("kind", ["left padding", "right padding", "bool", "float", "float -inf ranges"])
@pytest.mark.parametrize("nq,group", [(1, 4), (3, 8), (2, 1)])
def test_tensor_masks(decode_splits, splits, kind, nq, group):
    decode_splits(splits)
    q, k, v = inputs(2, 2 * group, 2, nq, 450, 64)
    mask = decode_mask(kind, 2, 2 * group, nq, 450, q.dtype)
    check_against_oracle(q, k, v, attn_mask=mask, causal="bottom_right", scale=0.125)


@pytest.mark.parametrize("splits", ["auto", "7"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", [None, "left padding", "float"])
def test_dtypes(decode_splits, splits, dtype, kind):
    decode_splits(splits)
    q, k, v = inputs(2, 8, 2, 1, 600, 128, dtype)
    check_against_oracle(q, k, v, attn_mask=decode_mask(kind, 2, 8, 1, 600, dtype), causal="bottom_right",
                         scale=128**-0.5)


@pytest.mark.parametrize("splits", ["1", "7"])
def test_layouts_and_odd_head_dims(decode_splits, splits):
    """A cache laid out (B, N, H, D) (a projection's output), a strided q, head dims that are not a
    multiple of the vector width (padded inside the kernel), Dv != D."""
    decode_splits(splits)
    b, hq, hk, nq, nk, d, dv = 2, 8, 2, 2, 333, 40, 24
    q = torch.randn(b, hq, d, nq).transpose(2, 3)
    k = torch.randn(b, nk, hk, d).transpose(1, 2)
    v = torch.randn(b, nk, hk, 2 * dv)[..., ::2].transpose(1, 2)
    check_against_oracle(q, k, v, causal="bottom_right", window=(100, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [128, 64, 72, 40, 36])
@pytest.mark.parametrize("group,nq", [(3, 1), (5, 1), (2, 3), (4, 1)])
@pytest.mark.parametrize("nk,causal,window", [(1000, "bottom_right", None), (77, False, None),
                                              (531, "bottom_right", (90, 0))], ids=str)
def test_transposed_key_blocks(decode_splits, dtype, d, group, nq, nk, causal, window):
    """The scores Sᵀ = Q · Kᵀ on key blocks read transposed (csrc/cpu/transposed_block.h): R = group · Nq
    rows not a multiple of the GEMM's 4-row block, Nk not a multiple of the 16-key transposes or of
    the 64-key blocks, head dims with a tail after the 16- or 8-wide chunks (72, 40: 8 floats; 36: 4),
    k contiguous along D (the vectorised transpositions: AVX-512 for float32 and bfloat16, AVX2 for
    bfloat16 and float16, converted on load)."""
    decode_splits("auto")
    q, k, v = inputs(1, 2 * group, 2, nq, nk, d, dtype)
    check_against_oracle(q, k, v, causal=causal, window=window, scale=d**-0.5)


def test_gradcheck(decode_splits):
    decode_splits("7")
    q, k, v = (t.requires_grad_(True) for t in inputs(1, 4, 1, 2, 150, 8, torch.float64))
    mask = decode_mask("right padding", 1, 4, 2, 150, torch.float64)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: selfattn.attention(q_, k_, v_, mask, causal="bottom_right", enable_gqa=True),
        (q, k, v))


# --- the splits: every S gives the unsplit result, bitwise stable; empty and masked splits --------

def op_outputs(q, k, v, mask=None, causal="bottom_right", window=(-1, -1)):
    nq, nk = q.shape[2], k.shape[2]
    offset = nk - nq if causal == "bottom_right" else 0
    return ops.attention_fwd(q, k, v, bool(causal), 0.125, mask, window[0], window[1], offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", [None, "float -inf ranges"])
def test_splits_agree(decode_splits, dtype, kind):
    q, k, v = inputs(2, 8, 2, 3, 1000, 64, dtype)
    mask = decode_mask(kind, 2, 8, 3, 1000, dtype)
    results = {}
    for splits in ["1", "2", "7", "auto", "0"]:
        decode_splits(splits)
        first = op_outputs(q, k, v, mask)
        again = op_outputs(q, k, v, mask)
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"S = {splits}: two runs differ"
        results[splits] = first
    out_1, lse_1 = (t.double() for t in results["1"])
    # Float32 rounding of sums of |v|-sized terms (bfloat16 results: one rounding of the output).
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 4 * torch.finfo(torch.float32).eps
    out_tol = eps * v.abs().max().item()
    for splits, (out, lse) in results.items():
        assert (out.double() - out_1).abs().max().item() <= out_tol, f"S = {splits}"
        assert (lse.double() - lse_1).abs().max().item() <= 4e-6 * lse_1.abs().max().item(), f"S = {splits}"


def test_empty_and_masked_splits(decode_splits):
    """Nk = 130 is 3 key blocks: with S = 7 four splits are empty; a window of the last 10 keys
    leaves the first splits fully masked; a mask hiding every key of one batch leaves all splits
    empty: out 0, lse -inf, zero gradients, no NaN."""
    decode_splits("7")
    b, hq, hk, nq, nk = 2, 4, 1, 1, 130
    q, k, v = inputs(b, hq, hk, nq, nk, 16)
    keep = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    keep[1] = False
    for window in [(-1, -1), (9, 0)]:
        out, lse = op_outputs(q, k, v, keep, window=window)
        visible = dense_mask(keep, (b, hq, nq, nk))[0] & band_visible(nq, nk, "bottom_right", window)
        scores = (q.double() @ k.double().transpose(-1, -2)) * 0.125
        scores = scores.masked_fill(~visible, -math.inf)
        expected_lse = torch.logsumexp(scores, -1)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isneginf(lse[1]).all()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(lse[0].double(), expected_lse[0], rtol=1e-6, atol=1e-6)
        check_against_oracle(q, k, v, attn_mask=keep, causal="bottom_right", window=window, scale=0.125)


def test_bad_setting(decode_splits):
    decode_splits("two")
    q, k, v = inputs(1, 2, 2, 1, 10, 16)
    with pytest.raises(RuntimeError, match="SELFATTN_DECODE_SPLITS must be a non-negative integer"):
        selfattn.attention(q, k, v)


def test_bench_sweep_decode(capsys):
    """`python -m selfattn.bench --sweep decode` at a tiny size: every contestant's row, the ratios
    and the bandwidths."""
    from selfattn.bench.__main__ import main
    assert main(["--sweep", "decode", "--cases", "1x128", "--rounds", "1", "--dtype", "float32",
                 "--l3-bytes", "4096"]) == 0
    out = capsys.readouterr().out
    for impl in ("selfattn", "sdpa_gqa", "hf_repeat", "copy"):
        assert f"| {impl} |" in out
    assert out.count("×") >= 2 and "of copy" in out and "read+write" in out
