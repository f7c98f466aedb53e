"""The CPU kernels' copies per instruction set (DEFAULT, AVX2, AVX512; csrc/cpu/dispatch.cpp):
every compiled copy against float64 on this machine, the run-time choice (ATen's, the
SELFATTN_CPU_CAPABILITY override, never one the CPU cannot run), and the library's instructions:
nothing outside a copy compiled for more than the x86-64 baseline may use more than it."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from tests.common import assert_close, attention_with_grads, eager_attention, sample_inputs
from tests.test_masks import check_against_oracle, inputs

ROOT = Path(__file__).resolve().parent.parent
ops = torch.ops.selfattn
COMPILED = selfattn.build_info().cpu_capabilities


@pytest.fixture(params=COMPILED)
def capability(request):
    """Runs the test with each compiled copy in turn; skipped, saying why, where this CPU cannot."""
    before = ops._cpu_capability()
    try:
        ops._cpu_capability(request.param.lower())
    except RuntimeError as error:
        if "this CPU lacks" in str(error):
            pytest.skip(str(error))
        raise
    assert selfattn.build_info().cpu_capability == request.param
    yield request.param
    ops._cpu_capability(before.lower())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_copy_against_float64(capability, dtype, causal):
    # More than one 64-wide block each way, Nq != Nk, a head dim that is no multiple of a vector.
    q, k, v = sample_inputs(2, 3, 70, 130, 40, 24, dtype=dtype)
    grad_out = torch.randn(2, 3, 70, 24, dtype=dtype)
    expected, expected_grads = attention_with_grads(eager_attention, q.double(), k.double(), v.double(),
                                                    grad_out.double(), causal=causal)
    eager, eager_grads = attention_with_grads(eager_attention, q, k, v, grad_out, causal=causal)
    out, grads = attention_with_grads(selfattn.attention, q, k, v, grad_out, causal=causal)
    assert_close(out, expected, eager, "out")
    for name, a, e, g in zip(("grad_q", "grad_k", "grad_v"), grads, expected_grads, eager_grads):
        assert_close(a, e, g, name)


@pytest.mark.parametrize("variant", ["window+gqa", "bool mask", "float mask+causal"])
def test_every_copy_with_masks(capability, variant):
    q, k, v = inputs(2, 4, 2, 100, 90, 32)
    if variant == "window+gqa":
        check_against_oracle(q, k, v, causal=True, window=(37, 0))
    elif variant == "bool mask":
        check_against_oracle(q, k, v, attn_mask=torch.rand(2, 1, 100, 90) > 0.3)
    else:
        check_against_oracle(q, k, v, attn_mask=torch.randn(1, 4, 100, 90), causal="bottom_right")


def test_every_copy_in_the_fused_layer(capability):
    layer = selfattn.SelfAttention(24, 32, num_heads=4, bias=True, causal=True).double()
    x = torch.randn(2, 67, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), fast_mode=True)


def test_copies_agree(capability):
    """Every copy computes the same function: against the copy ATen would pick, closely."""
    q, k, v = sample_inputs(1, 2, 65, 65, 64, dtype=torch.float64)
    out = selfattn.attention(q, k, v, causal=True)
    ops._cpu_capability("auto")
    torch.testing.assert_close(out, selfattn.attention(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


def test_forcing_names_what_is_wrong():
    with pytest.raises(RuntimeError, match="capability must be auto, default, avx2 or avx512, got 'sse9'"):
        ops._cpu_capability("sse9")
    assert ops._cpu_capability("") == selfattn.build_info().cpu_capability


def usable_here() -> list[str]:
    """The compiled copies this CPU can run, in order."""
    before = ops._cpu_capability()
    usable = []
    for capability in COMPILED:
        try:
            usable.append(ops._cpu_capability(capability))
        except RuntimeError as error:
            assert "this CPU lacks" in str(error)
    ops._cpu_capability(before)
    return usable


def test_override_is_read_when_deciding(monkeypatch, capfd):
    """SELFATTN_CPU_CAPABILITY is read when the choice is made ("auto" makes it again); a bad
    value is named and ignored, and the choice is ATen's, lowered to what this CPU runs."""
    before = ops._cpu_capability()
    usable = usable_here()
    aten = torch.backends.cpu.get_cpu_capability().replace("NO AVX", "DEFAULT")
    try:
        for value in ("default", "AVX2", "avx512"):
            monkeypatch.setenv("SELFATTN_CPU_CAPABILITY", value)
            expected = value.upper() if value.upper() in usable else usable[-1]
            assert ops._cpu_capability("auto") == expected
        monkeypatch.setenv("SELFATTN_CPU_CAPABILITY", "avx9000")
        capfd.readouterr()
        chosen = ops._cpu_capability("auto")
        # c10's warning handler prints it (the op's call does not turn it into a Python warning)
        assert "ignoring SELFATTN_CPU_CAPABILITY=avx9000: expected default, avx2 or avx512" in capfd.readouterr().err
        assert chosen == (aten if aten in usable else usable[-1])
    finally:
        ops._cpu_capability(before)


def test_choice_follows_aten():
    """In fresh processes: ATen's choice, ATEN_CPU_CAPABILITY=avx2 making it AVX2, and
    SELFATTN_CPU_CAPABILITY taking precedence over it."""
    usable = usable_here()
    if "AVX2" not in usable:
        pytest.skip("this CPU cannot run the AVX2 copy")
    code = ("import torch, selfattn; q = torch.randn(1, 1, 5, 8); selfattn.attention(q, q, q); "
            "print(selfattn.build_info().cpu_capability, torch.backends.cpu.get_cpu_capability(), sep='|')")
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "SELFATTN_CPU_CAPABILITY")}
    cases = [({}, usable[-1]), (dict(ATEN_CPU_CAPABILITY="avx2"), "AVX2"),
             (dict(ATEN_CPU_CAPABILITY="avx2", SELFATTN_CPU_CAPABILITY="default"), "DEFAULT")]
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env, _ in cases]
    for (env, expected), run in zip(cases, runs):
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        chosen, aten = stdout.strip().splitlines()[-1].split("|")
        assert chosen == expected, (env, stdout, stderr)
        if "SELFATTN_CPU_CAPABILITY" not in env:
            assert chosen == aten.replace("NO AVX", "DEFAULT")


# --- the instructions in the library ------------------------------------------------------------

# Where a function's name says which copy it belongs to: its namespace, or a template argument or
# enclosing function from there (lambdas, OpenMP's outlined bodies, whose names objdump leaves
# mangled). at::vec's inline namespaces (at::vec::AVX2::...) are named by the same CPU_CAPABILITY.
OWNER = [("AVX512", re.compile(r"cpu_avx512|AVX512::|vec6AVX512")), ("AVX2", re.compile(r"cpu_avx2|AVX2::|vec4AVX2"))]
FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*\t?(.*)$")
PREFIXES = {"26", "2e", "36", "3e", "64", "65", "66", "67", "f2", "f3"}


def encoding(raw_bytes: list[str]) -> str:
    """'evex' (AVX-512), 'vex' (AVX, AVX2, FMA, F16C) or 'legacy' (the x86-64 baseline, SSE2):
    in 64-bit mode 0x62 starts an EVEX and 0xc4 / 0xc5 a VEX prefix."""
    first = next((b for b in raw_bytes if b not in PREFIXES), "")
    return {"62": "evex", "c4": "vex", "c5": "vex"}.get(first, "legacy")


def disassembly(library: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """function -> (the copy it belongs to, [(encoding, instruction)]) over the library's code."""
    listing = subprocess.run(["objdump", "-d", "-C", "--insn-width=15", "-j", ".text", library],
                             capture_output=True, text=True, check=True).stdout
    functions: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for line in listing.splitlines():
        if m := FUNCTION.match(line):
            owner = next((name for name, pattern in OWNER if pattern.search(m.group(1))), "DEFAULT")
            current = functions.setdefault(m.group(1), (owner, []))[1]
        elif m := INSTRUCTION.match(line):
            current.append((encoding(m.group(1).split()), m.group(2).strip()))
    return functions


needs_objdump = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                                   reason="needs x86-64 and objdump")


@needs_objdump
def test_no_instruction_outside_its_copy():
    """EVEX (AVX-512) only in the AVX512 copy, VEX (AVX, AVX2, FMA, F16C) only in it and the AVX2
    copy. An inline function of a header (ATen, c10, the standard library) compiled into a copy for
    AVX-512 and kept by the linker for everyone would fault on an AVX2 CPU; so would a static
    initializer of a kernel file."""
    info = selfattn.build_info()
    if info.sanitize:
        # ASan's instrumented clones (.constprop) of header functions are local to each copy's
        # objects and named without its namespace: the check cannot tell whose they are. It holds
        # for the builds that ship (checked in the plain test run).
        pytest.skip("the sanitizer build's clones of header functions carry no copy's namespace")
    allowed = {"DEFAULT": {"legacy"}, "AVX2": {"legacy", "vex"}, "AVX512": {"legacy", "vex", "evex"}}
    found = {name: [insn for kind, insn in insns if kind not in allowed[owner]][:3]
             for name, (owner, insns) in disassembly(info.path).items()}
    found = {name: insns for name, insns in found.items() if insns}
    report = "\n".join(f"{name}: {insns}" for name, insns in list(found.items())[:20])
    assert not found, f"{len(found)} functions use instructions beyond their copy's:\n{report}"


@needs_objdump
def test_the_instruction_check_sees_vector_code():
    """The check above is not vacuous: the AVX-512 copy is EVEX, the AVX2 copy VEX."""
    kinds = {"AVX512": set(), "AVX2": set(), "DEFAULT": set()}
    for owner, insns in disassembly(selfattn.build_info().path).values():
        kinds[owner].update(kind for kind, _ in insns)
    assert "evex" in kinds["AVX512"] and "vex" in kinds["AVX2"] and "legacy" in kinds["DEFAULT"], kinds
