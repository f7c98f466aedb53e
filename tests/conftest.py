"""pytest set-up: a fresh random seed per session (printed, reproducible with SELFATTN_TEST_SEED)
and the build under test in the header."""

import os
import random
import zlib

import pytest
import torch

import selfattn

SEED = int(os.environ.get("SELFATTN_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return [f"selfattn: {selfattn.build_info()}",
            f"selfattn: test seed {SEED} (set SELFATTN_TEST_SEED={SEED} to reproduce), "
            f"torch threads {torch.get_num_threads()}"]


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, yet reproducible: the session seed mixed with the test's name (by
    # crc32: Python's str hash changes from process to process).
    torch.manual_seed((SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31)
    yield


def pytest_terminal_summary(terminalreporter):
    # Also under -q, which hides the header: a failure's inputs can then be drawn again.
    terminalreporter.write_line(f"selfattn: test seed {SEED} (SELFATTN_TEST_SEED={SEED} reproduces the inputs)")
