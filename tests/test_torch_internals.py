"""The private torch APIs selfattn uses (selfattn/_torch_internals.py) exist on the installed torch,
and they are used from that module only. A release that moves one fails here with its name."""

import importlib
import re
import tokenize
from pathlib import Path

import pytest
import torch

from selfattn import _torch_internals

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

PACKAGE = Path(_torch_internals.__file__).resolve().parent


def missing_names():
    missing = []
    for path in _torch_internals.NAMES:
        module_name, _, attribute = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(path)
            continue
        if not hasattr(module, attribute):
            missing.append(path)
    return missing


def test_every_private_api_exists_on_this_torch():
    missing = missing_names()
    assert not missing, (f"torch {torch.__version__} lacks the private API(s) {', '.join(missing)}; "
                         "see selfattn/_torch_internals.py for what each is for and its replacement")


def test_op_overload_attributes_exist_on_this_torch():
    op = torch.ops.selfattn.attention_fwd.default
    missing = [name for name in _torch_internals.OP_ATTRIBUTES if not hasattr(op, name)]
    assert not missing, f"torch {torch.__version__}'s OpOverload lacks {', '.join(missing)}"
    assert _torch_internals.op_name(op) == "attention_fwd"
    assert [a.name for a in _torch_internals.op_schema(op).arguments][:3] == ["q", "k", "v"]
    assert callable(_torch_internals.op_entry(op))


def test_a_moved_api_is_named_in_one_sentence(monkeypatch):
    monkeypatch.delattr(torch._C, "_is_any_autocast_enabled")
    assert missing_names() == ["torch._C._is_any_autocast_enabled"]
    with pytest.raises(ImportError) as error:
        _torch_internals.lookup("torch._C._is_any_autocast_enabled")
    assert str(error.value) == (f"selfattn uses torch's private torch._C._is_any_autocast_enabled, which torch "
                                f"{torch.__version__} does not have (selfattn/_torch_internals.py says what it is for).")


# What a private torch API looks like in code: torch._x, torch.<module>._x, from torch.<module> import _x,
# and OpOverload's private attributes. (torch.ops.selfattn._x are selfattn's own ops.)
PRIVATE = re.compile(r"\btorch(?!\.ops\.)(?:\.[A-Za-z0-9]+)*\._[A-Za-z]|from torch(?:\.[A-Za-z0-9_]+)* import _|"
                     r"\.(?:_op|_opname|_schema)\b")


def code_lines(path: Path):
    """(line number, the line's code without its strings and comments) for each line of a file."""
    lines: dict[int, str] = {}
    with open(path, "rb") as f:
        for token in tokenize.tokenize(f.readline):
            if token.type in (tokenize.NAME, tokenize.OP):
                lines[token.start[0]] = lines.get(token.start[0], "") + (
                    " " + token.string if token.type == tokenize.NAME and lines.get(token.start[0], "")[-1:].isalnum()
                    else token.string)
    return sorted(lines.items())


def test_private_apis_are_used_from_torch_internals_only():
    """Other modules import them from there (a comment or docstring may name one)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_torch_internals.py":
            continue
        for number, code in code_lines(path):
            if PRIVATE.search(code):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {code}")
    assert not found, "private torch APIs used outside selfattn/_torch_internals.py:\n" + "\n".join(found)
