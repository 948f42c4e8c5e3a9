"""Optimizer and learning-rate schedule of one net (each net has its own: they are separate players)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dist_coop.config import OptimConfig

Depths = Sequence[float] | Mapping[float, float]  # the depths a net trains, or depth -> its loss weight


def param_groups(
    net: nn.Module,
    weight_decay: float,
    lr: float,
    divisors: Mapping[int, float] | None = None,
    keep_decay: bool = False,
) -> list[dict]:
    """Weight decay on conv / linear weights only (not on BN affine, gates or biases); each parameter's LR is
    ``lr / divisors[id(p)]`` (1 where absent). One group per (decay, divisor), the largest divisor first.

    SGD decays a weight by ``lr * weight_decay`` per step, so a group at ``lr / d`` decays d times more slowly
    than a plain net; ``keep_decay`` gives it ``weight_decay * d``, the plain net's decay per step."""
    divisors = divisors or {}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            wants_decay = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            groups.setdefault((divisors.get(id(p), 1), wants_decay), []).append(p)
    order = sorted(groups, key=lambda k: (-k[0], not k[1]))
    return [
        {
            "params": groups[k],
            "weight_decay": weight_decay * (k[0] if keep_decay else 1) if k[1] else 0.0,
            "lr": lr / k[0],
        }
        for k in order
    ]


def lr_divisors(net: nn.Module, cfg: OptimConfig, depths: Depths) -> dict[int, float]:
    """``id(p) -> d``: parameter p trains at ``lr / d`` (``optim.lr_scale``; absent = the full LR).

    A net that trains several depths sums one CE (and KD) per depth on shared weights: the stem, the
    blocks every depth runs and the classifier get one plain net's gradient per depth each step, and a
    block only deeper depths run gets one per depth that runs it. Summed at the full LR the shared
    weights move several times as far per step as a plain net's, and the Teammates' gates of the deeper
    blocks collapse (docs/results/8k/RESULTS.md).

    * ``depths``: every parameter at ``lr / len(depths)``.
    * ``blocks``: each parameter at ``lr /`` the number of ``depths`` that run it (its block's mask
      bits; the stem and the head: all of them), so every weight steps about as far as in a plain net.
    * ``weighted``: as ``blocks``, counting each depth by its loss weight (``depths`` as a
      mapping depth -> weight: the SFSL weights w(s) of the sub-nets, 1 for the full depth), so a block
      that only lightly weighted depths run is not slowed by the weighting (with gamma 0: ``blocks``).
    * ``blocks_sqrt`` (the default): ``lr / sqrt(d)`` with d as for ``blocks``. The summed gradient of d depths that do not
      agree is about sqrt(d) times one depth's in norm (d times when they agree), so ``blocks`` steps each
      depth's part d times more slowly than a plain net; this keeps a plain net's step norm for unaligned depths.
    * ``optim.lr_scale_power`` p (``depths``, ``blocks``, ``weighted``): ``lr / d ** p`` (``blocks`` at p = 0.5 is
      ``blocks_sqrt``; 1 by default).
    * ``none``, one depth (the Leader, an independent net) or AdamW (its step does not grow with the
      gradient's scale): {}.

    Weight decay per step is ``lr * weight_decay``, so it scales with the LR: a shared weight at ``lr / d``
    decays d times more slowly than a plain net's (the step is that of the mean loss with the decay / d).
    Over the ladder's ~500 steps at lr / 2 that is a shrink of ~0.6 % instead of ~1.2 %; over a 200-epoch schedule it
    sets the equilibrium norm of the BN-normalised weights. ``optim.keep_decay`` keeps the plain net's
    decay per step (``param_groups``).
    """
    if cfg.lr_scale == "none" or cfg.name != "sgd" or len(depths) <= 1:
        return {}
    weighted = cfg.lr_scale == "weighted" and isinstance(depths, Mapping)
    weights = dict(depths) if weighted else dict.fromkeys(depths, 1.0)  # a mapping's keys are its depths
    divisors = {id(p): sum(weights.values()) for p in net.parameters()}
    if cfg.lr_scale != "depths":
        divisors.update(net.runs_per_parameter(weights))
    power = 0.5 if cfg.lr_scale == "blocks_sqrt" else cfg.lr_scale_power
    if power != 1.0:
        divisors = {k: d**power for k, d in divisors.items()}
    return divisors


def build_optimizer(net: nn.Module, cfg: OptimConfig, depths: Depths = (1.0,)) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW for a net that trains ``depths`` (their count scales the LR: lr_divisors)."""
    groups = param_groups(net, cfg.weight_decay, cfg.lr, lr_divisors(net, cfg, depths), cfg.keep_decay)
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
