"""Optimizer and learning-rate schedule of one net (each net has its own: they are separate players)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dist_coop.config import OptimConfig


def param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv / linear weights only (not on BN affine, gates or biases)."""
    decay, no_decay = [], []
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            wants_decay = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            (decay if wants_decay else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def net_optim(cfg: OptimConfig, num_depths: int) -> OptimConfig:
    """The optimizer settings of a net that trains ``num_depths`` depths on shared weights.

    Its loss sums one CE (and KD) per depth, so the stem, the blocks every depth runs and the classifier
    get ``num_depths`` gradients of a plain net's size each step. ``lr_scale: depths`` divides its LR by
    ``num_depths`` (the Leader and independent nets train one depth: unchanged), so one step moves the
    shared weights about as far as a plain net's step; summed at the full LR the Teammates' gates of the
    deeper blocks collapse (docs/RESULTS.md). Weight decay per step is ``lr * weight_decay``, so it scales too.
    SGD only: AdamW divides by the gradient's own scale, so summing the depths' losses does not lengthen its step.
    """
    if cfg.lr_scale == "none" or num_depths <= 1 or cfg.name != "sgd":
        return cfg
    return dataclasses.replace(cfg, lr=cfg.lr / num_depths)


def build_optimizer(net: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW."""
    groups = param_groups(net, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then cosine to 0, step decay or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.step_gamma ** sum(progress >= m for m in cfg.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
