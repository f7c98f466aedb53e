"""pytest set-up: a fresh random seed per session (printed, reproducible with SELFATTN_TEST_SEED)
and the build under test in the header."""

import os
import random

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
    # Fresh inputs per test, yet reproducible: the session seed mixed with the test's name.
    torch.manual_seed((SEED + hash(request.node.nodeid)) % 2**31)
    yield
