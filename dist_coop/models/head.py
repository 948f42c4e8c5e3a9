"""A classifier with one row of weights per depth (``model.head: private``).

With the default shared classifier every depth's pooled features must be read by one linear map, so the
blocks only deeper depths run are held to the feature code the shallow depths settle on. ``DepthLinear``
gives each depth its own ``(num_classes, features)`` map (as switchable BN gives each depth its own affine);
every row starts as the same copy of the backbone's classifier, so at step 0 every depth computes what a
shared classifier computes. The active row is set by the owning model (``AdaptiveNet.set_depth``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DepthLinear(nn.Module):
    """``nn.Linear`` with ``num_depths`` rows of weight (D, out, in) and bias (D, out); one row per forward."""

    def __init__(self, in_features: int, out_features: int, num_depths: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.num_depths = in_features, out_features, num_depths
        self.weight = nn.Parameter(torch.empty(num_depths, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_depths, out_features))
        self.depth_index = num_depths - 1  # full depth until told otherwise

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_depths: int) -> DepthLinear:
        """Every row a copy of ``linear`` (weights and bias; a linear without bias gets zero biases)."""
        new = cls(linear.in_features, linear.out_features, num_depths).to(linear.weight.device)
        with torch.no_grad():
            new.weight.copy_(linear.weight.expand_as(new.weight))
            if linear.bias is not None:
                new.bias.copy_(linear.bias.expand_as(new.bias))
        return new

    def row(self, index: int) -> nn.Linear:
        """Depth ``index``'s map as a plain ``nn.Linear`` (a copy: export)."""
        linear = nn.Linear(self.in_features, self.out_features).to(self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight[index])
            linear.bias.copy_(self.bias[index])
        return linear

    def forward(self, x: Tensor) -> Tensor:  # (B, in) -> (B, out)
        return F.linear(x, self.weight[self.depth_index], self.bias[self.depth_index])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, depths={self.num_depths}"
