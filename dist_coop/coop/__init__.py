"""The cooperative objective: pure loss functions and the tasks that return named loss terms."""

from dist_coop.coop.losses import cross_entropy, kd_loss, sfsl_weights
from dist_coop.coop.task import CooperativeTask, IndependentTask, NetSpec, build_task, net_of

__all__ = [
    "CooperativeTask",
    "IndependentTask",
    "NetSpec",
    "build_task",
    "cross_entropy",
    "kd_loss",
    "net_of",
    "sfsl_weights",
]
