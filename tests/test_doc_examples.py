"""Every ```python block of README.md and docs/*.md runs as written: each block on its own, in a
fresh namespace, fails on any exception, and its traceback names the page and line.

A block that cannot run here is marked by an HTML comment (invisible on GitHub) on the line before
its fence, and is reported as skipped with the reason:

    <!-- doc-test: skip: REASON -->      never run by this test (REASON says why)
    <!-- doc-test: requires MODULE -->   run only where MODULE can be imported
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- doc-test: (?:skip: (?P<reason>\S.*?)|requires (?P<module>[\w.]+)) -->")


@dataclass(frozen=True)
class Example:
    page: str  # relative to the repository root
    line: int  # of the block's first code line, 1-based
    code: str
    skip_reason: Optional[str]
    requires: Optional[str]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def examples_of(path: Path) -> list[Example]:
    """The page's ```python blocks, with the marker on the line before each fence."""
    page = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    found = []
    for number, line in enumerate(lines):
        if line.strip().startswith("<!-- doc-test"):
            following = lines[number + 1].strip() if number + 1 < len(lines) else ""
            assert MARKER.fullmatch(line.strip()), f"{page}:{number + 1}: malformed marker {line.strip()!r}"
            assert following == "```python", f"{page}:{number + 1}: a doc-test marker must precede a ```python fence"
        if line.strip() != "```python":
            continue
        end = next((i for i in range(number + 1, len(lines)) if lines[i].strip() == "```"), None)
        assert end is not None, f"{page}:{number + 1}: unclosed ```python block"
        marker = MARKER.fullmatch(lines[number - 1].strip()) if number > 0 else None
        found.append(Example(page, number + 2, "\n".join(lines[number + 1:end]),
                             marker and marker["reason"], marker and marker["module"]))
    return found


EXAMPLES = [example for path in PAGES for example in examples_of(path)]


def test_the_readme_has_examples():
    assert any(example.page == "README.md" for example in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_example_runs_as_written(example: Example):
    if example.skip_reason:
        pytest.skip(f"{example}: {example.skip_reason}")
    if example.requires and importlib.util.find_spec(example.requires) is None:
        pytest.skip(f"{example}: needs {example.requires}, which is not installed")
    torch.manual_seed(0)
    # Padded with blank lines, so that a traceback's line numbers are the page's.
    code = compile("\n" * (example.line - 1) + example.code, str(ROOT / example.page), "exec")
    exec(code, {"__name__": "__doc_example__"})
