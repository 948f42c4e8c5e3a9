"""BatchNorm with per-depth statistics.

Sub-networks of different depth see different activation statistics, so one set of running
statistics would serve none of them well. ``DepthBatchNorm2d`` keeps one row of running
statistics per depth (``bn: shared``: shared affine weights, the default) or one row of both
statistics and affine parameters (``bn: private``: switchable BN). The active depth index is set
by the owning model (``AdaptiveNet.set_depth``) and every forward uses/updates that row only.
An optional scalar ``gate`` multiplies the output: placed on the last BN of a residual branch it
is the learned gate g of ``y = x + m * g * F(x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_coop.choices import BN_MODES


class DepthBatchNorm2d(nn.Module):
    """BatchNorm2d with ``num_depths`` rows of running statistics (and, if private, affine)."""

    def __init__(
        self,
        num_features: int,
        num_depths: int,
        *,
        mode: str = "shared",
        eps: float = 1e-5,
        momentum: float = 0.1,
        gate: bool = False,
    ) -> None:
        super().__init__()
        if mode not in BN_MODES:
            raise ValueError(f"bn must be one of {list(BN_MODES)}, got {mode!r}")
        self.num_features, self.num_depths, self.mode = num_features, num_depths, mode
        self.eps, self.momentum = eps, momentum
        rows = num_depths if mode == "private" else 1
        self.weight = nn.Parameter(torch.ones(rows, num_features))
        self.bias = nn.Parameter(torch.zeros(rows, num_features))
        self.register_buffer("running_mean", torch.zeros(num_depths, num_features))
        self.register_buffer("running_var", torch.ones(num_depths, num_features))
        self.gate = nn.Parameter(torch.ones(1)) if gate else None  # (1,), not (): DeepSpeed cannot broadcast 0-dim
        self.depth_index = num_depths - 1  # full depth until told otherwise
        self.cumulative = False  # recalibration: exact average over the batches seen
        self._num_seen = [0] * num_depths
        # set while an activation shared by several depths is computed once (AdaptiveNet.forward(x, depths=...)):
        # the depth indices whose statistics rows this batch updates, as each depth's own forward would
        self.shared_rows: tuple[int, ...] = ()

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, num_depths: int, *, mode: str = "shared", gate: bool = False
    ) -> DepthBatchNorm2d:
        """Copy an ``nn.BatchNorm2d`` (weights and statistics into every depth row)."""
        new = cls(bn.num_features, num_depths, mode=mode, eps=bn.eps, momentum=bn.momentum or 0.1, gate=gate)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight.expand_as(new.weight))
                new.bias.copy_(bn.bias.expand_as(new.bias))
            if bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean.expand_as(new.running_mean))
                new.running_var.copy_(bn.running_var.expand_as(new.running_var))
        return new.to(bn.weight.device if bn.affine else "cpu")

    def reset_depth_stats(self, index: int) -> None:
        self._num_seen[index] = 0
        self.running_mean[index].zero_()
        self.running_var[index].fill_(1.0)

    def affine(self, index: int | None = None) -> tuple[Tensor, Tensor]:
        """(weight, bias) used at depth ``index`` (the active one by default), gate folded in."""
        row = 0 if self.mode == "shared" else (self.depth_index if index is None else index)
        w, b = self.weight[row], self.bias[row]
        if self.gate is not None:
            w, b = w * self.gate, b * self.gate
        return w, b

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.shared_rows:
            return self._shared_forward(x)
        d = self.depth_index
        w, b = self.affine(d)
        momentum = self.momentum
        if self.training and self.cumulative:
            self._num_seen[d] += 1
            momentum = 1.0 / self._num_seen[d]
        return F.batch_norm(x, self.running_mean[d], self.running_var[d], w, b, self.training, momentum, self.eps)

    def _shared_forward(self, x: Tensor) -> Tensor:
        """One output for several depths: in training mode it depends on the batch only (shared affine).

        The first row's update comes with the output; every other row gets the same call without the
        output's graph: the very update that depth's own forward would make (bit for bit).
        """
        assert self.training and self.mode == "shared" and not self.cumulative, (
            "shared rows need shared-affine training"
        )
        first, *rest = self.shared_rows
        w, b = self.affine(first)
        out = F.batch_norm(x, self.running_mean[first], self.running_var[first], w, b, True, self.momentum, self.eps)
        with torch.no_grad():
            for d in rest:
                F.batch_norm(x, self.running_mean[d], self.running_var[d], None, None, True, self.momentum, self.eps)
        return out

    def extra_repr(self) -> str:
        gate = ", gate" if self.gate is not None else ""
        return f"{self.num_features}, depths={self.num_depths}, mode={self.mode}{gate}"


def convert_batchnorm(module: nn.Module, num_depths: int, *, mode: str, gated: set[int] | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` by a ``DepthBatchNorm2d`` in place.

    ``gated`` holds ``id()`` of the BN modules that get a learned gate (last BN of a branch).
    """
    gated = gated or set()
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(
                module, name, DepthBatchNorm2d.from_batchnorm(child, num_depths, mode=mode, gate=id(child) in gated)
            )
        else:
            convert_batchnorm(child, num_depths, mode=mode, gated=gated)
    return module
