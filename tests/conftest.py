"""Fixtures only; what tests share otherwise is in tests/helpers.py."""

import os

import pytest
import torch

from dist_coop.data import fashion_mnist
from tests.helpers import RecordingTracker

# two threads for a test run alone; one per process when pytest-xdist runs two at once (a process of two threads
# next to a busy core spin-waits in every op: two steps of the tiny config took 49 s instead of 8)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def fmnist_root():
    """The bundled real dataset; the README's test command installs it. In CI its absence is a failure."""
    try:
        return fashion_mnist.find_root()
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture
def recorder():
    return RecordingTracker()
