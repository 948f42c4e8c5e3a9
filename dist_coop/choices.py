"""The values of the settings that name a kind of thing, each list held once.

``dist_coop.config`` validates a config against these tuples and ``dist-coop config`` (docs/guide/config.md)
lists them; the module that implements each choice checks its own arguments against the same tuple, so a value
added here is accepted everywhere at once. Plain data: this module imports nothing, so the config (and the CLI
that reads it) loads without torch.
"""

from __future__ import annotations

# model.name: the backbones dist_coop.models.registry builds. resnet<depth>: a CIFAR ResNet (32x32 input);
# resnet<depth>_64: a ResNet-18/34 layout for 64x64 input; tv_<arch>: torchvision's <arch>.
MODEL_NAMES = (
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet18_64",
    "resnet34_64",
    "tv_resnet18",
    "tv_resnet34",
    "tv_resnet50",
)
KEEP_MODES = ("prefix", "spread")  # model.keep: dist_coop.models.masks.active_blocks
GATE_MODES = ("learned", "none")  # model.gate: dist_coop.models.adaptive.AdaptiveNet
BN_MODES = ("shared", "private")  # model.bn: dist_coop.models.norm.DepthBatchNorm2d
HEAD_MODES = ("shared", "private")  # model.head: dist_coop.models.adaptive.AdaptiveNet (models.head)
TASKS = ("cooperative", "independent")  # coop.task: dist_coop.coop.task.build_task
DATASETS = ("fashion_mnist",)  # data.dataset: dist_coop.data (any other dataset streams from data.shards)
ON_CORRUPT = ("error", "skip")  # data.on_corrupt: dist_coop.data.shards
ON_NONFINITE = ("error", "skip")  # train.on_nonfinite: dist_coop.guard
PLACEMENTS = ("auto", "split", "colocated")  # dist.placement: dist_coop.distributed.placement
CHECKPOINT_MODES = ("reference", "weights", "none")  # tracking.log_checkpoint: dist_coop.track
