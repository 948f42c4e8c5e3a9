"""The thin module around the depth masks: make any residual backbone depth-adaptive.

``AdaptiveNet`` takes a plain backbone whose stages are ``nn.Sequential`` of residual blocks
(our ResNets, torchvision ResNets) and, without rewriting it,

* swaps each stage for a ``DepthStage`` (same parameter names) that skips masked-out blocks:
  a skipped block is **not executed** (no FLOPs, its parameters get no gradient);
* swaps every ``BatchNorm2d`` for a ``DepthBatchNorm2d`` with per-depth statistics, and puts
  the learned gate g on the last BN of every skippable block's residual branch.

Block j >= 1 of a stage must keep the shape (identity shortcut). Our blocks compute
``relu(x + g * F(x))``; x is itself a ReLU output (>= 0), so a skipped block is exactly the
identity ``x = relu(x + 0 * F(x))``: the design's ``y = x + m * g * F(x)`` with m = 0.

Depths that run the same blocks on the same input compute the same activation (in training mode,
with shared BN affine: BN normalises with the batch's statistics). ``net(x, depths=...)`` computes
that shared part once and ``net(h, depth=s, start=p)`` each depth's own rest (``share_prefix``);
each depth's BN statistics row is updated as its own forward would update it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dist_coop.choices import GATE_MODES, HEAD_MODES
from dist_coop.models.head import DepthLinear
from dist_coop.models.masks import Mask, branch_starts, depth_masks, mask_blocks
from dist_coop.models.norm import DepthBatchNorm2d, convert_batchnorm


class DepthStage(nn.Sequential):
    """An ``nn.Sequential`` of blocks that runs only the blocks its mask keeps."""

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        super().__init__(*blocks)
        self.mask: tuple[bool, ...] = (True,) * len(self)

    def forward(self, x: Tensor) -> Tensor:
        for keep, block in zip(self.mask, self):
            if keep:
                x = block(x)
        return x


def _last_branch_bn(block: nn.Module) -> nn.Module:
    """The last BatchNorm (plain or per-depth) of a block's residual branch (not of its shortcut)."""
    kinds = (nn.BatchNorm2d, DepthBatchNorm2d)
    bns = [m for name, m in block.named_modules() if isinstance(m, kinds) and "downsample" not in name]
    if not bns:
        raise ValueError(f"block {type(block).__name__} has no BatchNorm2d on its residual branch")
    return bns[-1]


@contextmanager
def _shared_rows(norms: Iterable[DepthBatchNorm2d], rows: Sequence[int]) -> Iterator[None]:
    """While an activation is computed once for the depths of ``rows``: each BN updates all their rows."""
    norms = list(norms)
    for norm in norms:
        norm.shared_rows = tuple(rows)
    try:
        yield
    finally:
        for norm in norms:
            norm.shared_rows = ()


class AdaptiveNet(nn.Module):
    """A backbone whose depth is chosen at run time by ``set_depth(s)``."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        stage_names: Sequence[str],
        scaling_factors: Sequence[float],
        keep: str = "prefix",
        gate: str = "learned",
        bn: str = "shared",
        zero_init: bool = False,
        share_prefix: bool = True,
        head: str = "shared",
    ) -> None:
        super().__init__()
        if gate not in GATE_MODES:
            raise ValueError(f"gate must be one of {list(GATE_MODES)}, got {gate!r}")
        if head not in HEAD_MODES:
            raise ValueError(f"head must be one of {list(HEAD_MODES)}, got {head!r}")
        if 1.0 not in scaling_factors:
            raise ValueError(f"scaling_factors must include 1.0 (the full net), got {list(scaling_factors)}")
        self.backbone = backbone
        self.stage_names = tuple(stage_names)
        self.scaling_factors = tuple(sorted(scaling_factors))
        gated: set[int] = set()
        for name in self.stage_names:
            blocks = list(getattr(backbone, name))
            for i, block in enumerate(blocks[1:], start=1):
                if getattr(block, "downsample", None) is not None:
                    raise ValueError(f"{name}[{i}] has a downsample shortcut; only block 0 of a stage may change shape")
                if gate == "learned":
                    gated.add(id(_last_branch_bn(block)))
            setattr(backbone, name, DepthStage(blocks))
        self.masks: dict[float, Mask] = depth_masks(self.stage_sizes, self.scaling_factors, keep)
        convert_batchnorm(backbone, len(self.scaling_factors), mode=bn, gated=gated)
        self._norms = [m for m in self.modules() if isinstance(m, DepthBatchNorm2d)]
        if head == "private":  # each depth its own classifier (models.head)
            if not isinstance(getattr(backbone, "fc", None), nn.Linear):
                raise ValueError("head: private needs a backbone whose classifier is an nn.Linear named fc")
            backbone.fc = DepthLinear.from_linear(backbone.fc, len(self.scaling_factors))
        # what set_depth points at the active depth's row: the norms and a private classifier
        self._per_depth: list[DepthBatchNorm2d | DepthLinear] = [
            *self._norms,
            *[m for m in self.modules() if isinstance(m, DepthLinear)],
        ]
        self.bn, self.share_prefix = bn, share_prefix
        # every block in order, stage by stage (position p of masks.branch_starts), its BNs, each depth's flat mask
        self._blocks = [block for stage in self.stages for block in stage]
        self._block_norms = [[m for m in b.modules() if isinstance(m, DepthBatchNorm2d)] for b in self._blocks]
        self._flat_masks = {s: [kept for stage in m for kept in stage] for s, m in self.masks.items()}
        # the shared part needs a backbone split into stem(x), the stages, head(h) (ours; not torchvision's)
        self._splittable = callable(getattr(backbone, "stem", None)) and callable(getattr(backbone, "head", None))
        if zero_init:  # every skippable block starts as the identity and grows in (Goyal et al. 2017)
            with torch.no_grad():
                for stage in self.stages:
                    for block in list(stage)[1:]:
                        _last_branch_bn(block).weight.zero_()
        self._depth = 1.0
        self.set_depth(1.0)

    def runs_per_parameter(self, weights: Mapping[float, float]) -> dict[int, float]:
        """``id(p) ->`` the summed ``weights`` (depth -> weight; all 1: how many of the depths) of the depths
        that run p, for the parameters of the blocks (the stem and a shared head run at every depth and are left
        out), and 1 for a parameter with one row per depth (``per_depth_parameters``)."""
        out = {}
        for position, block in enumerate(self._blocks):
            runs = sum(w for s, w in weights.items() if self._flat_masks[s][position])
            out.update({id(p): runs for p in block.parameters()})
        for p in self.per_depth_parameters():  # one row per depth: each row gets one depth's gradient
            out[id(p)] = 1.0
        return out

    def per_depth_parameters(self) -> list[nn.Parameter]:
        """Parameters with one row per depth (private BN affine, a private classifier): depth s reads row s only."""
        return [
            p for m in self._per_depth if isinstance(m, DepthLinear) or m.mode == "private" for p in (m.weight, m.bias)
        ]

    @property
    def stages(self) -> list[DepthStage]:
        return [getattr(self.backbone, name) for name in self.stage_names]

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        return tuple(len(stage) for stage in self.stages)

    @property
    def depth(self) -> float:
        return self._depth

    def compile_blocks(self, mode: str) -> None:
        """``torch.compile`` each residual block in place (the GPU step for small, launch-bound nets).

        The block is the unit: its forward is static once its BNs' depth row is fixed, while the net's
        own forward picks blocks and depths in Python. Dynamo specialises a block's code on that row (and on
        the rows a shared activation updates), so the cache holds a graph per block kind and row set; its
        limit is raised to fit. ``mode``: an inductor mode (``default``, ``reduce-overhead`` = CUDA graphs,
        ``max-autotune``) or ``aot_eager`` (graph capture and AOT autograd without code generation: a cheap
        check that the blocks compile, as the tests use it). State dict keys do not change.
        """
        import torch._dynamo

        limit = 4 * len(self.scaling_factors) * (len(self.scaling_factors) + 1)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, limit * len(self._blocks)
        )
        options = {"backend": "aot_eager"} if mode == "aot_eager" else {"mode": None if mode == "default" else mode}
        for block in self._blocks:
            block.compile(**options)

    def num_blocks(self, s: float | None = None) -> int:
        """Blocks that run at depth ``s`` (the current one by default)."""
        return mask_blocks(self.masks[self._depth if s is None else s])

    def set_depth(self, s: float) -> None:
        """Run the sub-network of scaling factor ``s`` from now on (costs nothing: no rebuild)."""
        if s not in self.masks:
            raise ValueError(f"scaling factor {s} is not one of this net's depths {list(self.scaling_factors)}")
        for stage, stage_mask in zip(self.stages, self.masks[s]):
            stage.mask = stage_mask
        index = self.scaling_factors.index(s)
        for module in self._per_depth:
            module.depth_index = index
        self._depth = s

    @contextmanager
    def at_depth(self, s: float) -> Iterator[AdaptiveNet]:
        previous = self._depth
        self.set_depth(s)
        try:
            yield self
        finally:
            self.set_depth(previous)

    def stage_gates(self) -> list[list[nn.Parameter]]:
        """The learned gates g of each stage's skippable blocks (empty lists with ``gate: none``)."""
        return [
            [m.gate for m in stage.modules() if isinstance(m, DepthBatchNorm2d) and m.gate is not None]
            for stage in self.stages
        ]

    def branch_starts(self, depths: Sequence[float]) -> dict[float, int]:
        """Where each depth's own computation starts after ``net(x, depths=depths)`` (``masks.branch_starts``).

        All -1 (nothing shared: each depth runs its whole forward) unless sharing is exact: ``share_prefix``
        on, shared BN affine, training mode (in eval mode each depth normalises with its own statistics)
        and a backbone with ``stem()`` and ``head()``.
        """
        for s in depths:
            if s not in self.masks:
                raise ValueError(f"scaling factor {s} is not one of this net's depths {list(self.scaling_factors)}")
        if not (self.share_prefix and self.bn == "shared" and self.training and self._splittable):
            return dict.fromkeys(depths, -1)
        return branch_starts(self.masks, list(depths))

    def forward(
        self, x: Tensor, *, depths: Sequence[float] | None = None, depth: float | None = None, start: int = -1
    ) -> Tensor | tuple[Tensor, ...]:
        """``net(x)``: (B, num_classes) logits at the current depth.

        ``net(x, depths=D)``: what the depths of D compute alike, computed once; returns h_s for each s of D
        (a tuple in D's order), the input of depth s's own computation (``x`` where ``branch_starts`` says -1).
        ``net(h_s, depth=s, start=p)``: depth s's logits from there on, p = ``branch_starts(D)[s]``.
        (One ``forward`` with keywords, not three methods: engines such as DeepSpeed's wrap ``forward``.)
        """
        if depths is not None:
            inputs = self._trunk(x, depths)
            return tuple(inputs[s] for s in depths)  # a tuple: what engines' output hooks walk (ZeRO-3's)
        if depth is not None:
            return self._branch(x, depth, start)
        return self.backbone(x)

    def forward_depths(self, x: Tensor, depths: Sequence[float]) -> dict[float, Tensor]:
        """Logits of every depth of ``depths`` on ``x``, shared work done once: ``{s: (B, num_classes)}``."""
        inputs, starts = self(x, depths=depths), self.branch_starts(depths)
        return {s: self(h, depth=s, start=starts[s]) for s, h in zip(depths, inputs)}

    def _trunk(self, x: Tensor, depths: Sequence[float]) -> dict[float, Tensor]:
        starts = self.branch_starts(depths)
        out = {s: x for s, p in starts.items() if p < 0}
        shared = [s for s, p in starts.items() if p >= 0]
        if not shared:
            return out
        rows = {s: self.scaling_factors.index(s) for s in shared}
        with _shared_rows(self._norms, list(rows.values())):  # only the stem's BNs run here
            h = self.backbone.stem(x)  # (B, C, H, W)
        held = dict.fromkeys(shared, h)  # depth -> its activation; depths with one history hold one tensor
        for p, block in enumerate(self._blocks):
            for s in [s for s in held if starts[s] == p]:
                out[s] = held.pop(s)
            groups: dict[int, list[float]] = {}
            for s, h in held.items():
                groups.setdefault(id(h), []).append(s)
            for group in groups.values():
                runners = [s for s in group if self._flat_masks[s][p]]  # two or more, or none (branch_starts)
                if runners:
                    with _shared_rows(self._block_norms[p], [rows[s] for s in runners]):
                        h = block(held[runners[0]])
                    held.update(dict.fromkeys(runners, h))
        assert not held, f"depths {list(held)} never started their own computation"
        return out

    def _branch(self, h: Tensor, s: float, start: int) -> Tensor:
        with self.at_depth(s):
            if start < 0:
                return self.backbone(h)
            mask = self._flat_masks[s]
            for p in range(start, len(self._blocks)):
                if mask[p]:
                    h = self._blocks[p](h)
            return self.backbone.head(h)


@torch.no_grad()
def gate_stats(net: AdaptiveNet) -> dict[str, float]:
    """``{"stage1/min": ..., "stage1/mean": ...}`` of the learned gates: a collapse toward 0 shows here."""
    out: dict[str, float] = {}
    for i, gates in enumerate(net.stage_gates(), start=1):
        if gates:
            values = torch.cat([g.detach().float().reshape(-1) for g in gates])
            out[f"stage{i}/min"] = values.min().item()
            out[f"stage{i}/mean"] = values.mean().item()
    return out


@torch.no_grad()
def recalibrate_bn(net: AdaptiveNet, batches: Iterable[Tensor], s: float) -> int:
    """Recompute depth ``s``'s BN statistics as the exact average over ``batches``; returns samples used.

    Training updates them by an exponential moving average while the weights move; after
    training a few hundred samples give statistics that match the final weights.
    """
    index = net.scaling_factors.index(s)
    was_training = net.training
    norms = net._norms
    for norm in norms:
        norm.reset_depth_stats(index)
        norm.cumulative = True
    seen = 0
    try:
        net.train()
        with net.at_depth(s):
            for x in batches:
                net(x)
                seen += x.shape[0]
    finally:
        for norm in norms:
            norm.cumulative = False
        net.train(was_training)
    return seen
