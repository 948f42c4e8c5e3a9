import os

import pytest
import torch

from dist_coop.data import fashion_mnist

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_root():
    """The bundled real dataset; the README's test command installs it. In CI its absence is a failure."""
    try:
        return fashion_mnist.find_root()
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


class RecordingTracker:
    """A tracker that keeps everything it is given (the Tracker interface)."""

    def __init__(self):
        self.params, self.metrics, self.artifacts, self.closed = {}, {}, [], False
        self.status, self.error = "", ""
        self.run_id = ""

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, step, metrics):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_artifact(self, path):
        self.artifacts.append(str(path))

    def close(self, status="FINISHED", error=""):
        self.closed, self.status, self.error = True, status, error


@pytest.fixture
def recorder():
    return RecordingTracker()
