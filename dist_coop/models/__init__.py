"""Backbones, depth masks, gating and per-depth BatchNorm. Nothing here knows about distribution."""

from dist_coop.models.adaptive import AdaptiveNet, DepthStage, recalibrate_bn
from dist_coop.models.head import DepthLinear
from dist_coop.models.masks import active_blocks, depth_masks, num_kept
from dist_coop.models.norm import DepthBatchNorm2d
from dist_coop.models.registry import MODELS, build_backbone, build_model

__all__ = [
    "MODELS",
    "AdaptiveNet",
    "DepthBatchNorm2d",
    "DepthLinear",
    "DepthStage",
    "active_blocks",
    "build_backbone",
    "build_model",
    "depth_masks",
    "num_kept",
    "recalibrate_bn",
]
