"""From a trained plain network to a depth-adaptive one with the same full-depth function.

A plain backbone's state dict (ours, torchvision's) differs from its ``AdaptiveNet``'s: every BatchNorm
has a row of statistics per depth (and, with ``model.bn: private``, of affine), the last BN of each
skippable block has a gate, the pooled features may have a head norm, a private classifier has a row
per depth. ``load_plain_state`` maps a plain state into such a net so that at full depth, in eval mode,
it computes what the source computed: every BN row starts from the source BN, every gate at 1, a head
norm the source lacks starts as the identity (statistics 0 and 1, weight sqrt(1 + eps)), every classifier
row is the source's. ``plain_state_dict`` is the way back (the full-depth rows, gates folded in), which
is how a dist-coop run's net becomes a source (``dist_coop.pretrained`` reads the sources ``model.init``
names); ``adaptive_from`` converts a module object.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dist_coop.models.adaptive import AdaptiveNet
from dist_coop.models.head import DepthLinear
from dist_coop.models.norm import DepthBatchNorm2d

BN_KEYS = ("weight", "bias", "running_mean", "running_var")
CLASSIFIER = "fc"  # the classifier's name in our ResNets and torchvision's


@torch.no_grad()
def plain_state_dict(net: AdaptiveNet) -> dict[str, Tensor]:
    """``net``'s backbone at full depth in the plain layout: each BN's full-depth row with its gate folded
    into its affine, the full-depth row of a private classifier; other tensors as they are."""
    out: dict[str, Tensor] = {}
    for path, module in net.backbone.named_modules():
        p = f"{path}." if path else ""
        if isinstance(module, DepthBatchNorm2d):
            full = module.num_depths - 1  # depths are sorted: 1.0 is the last row
            weight, bias = module.affine(full)
            out.update({p + "weight": weight, p + "bias": bias})
            out.update({p + "running_mean": module.running_mean[full], p + "running_var": module.running_var[full]})
        elif isinstance(module, DepthLinear):
            out.update({p + "weight": module.weight[-1], p + "bias": module.bias[-1]})
        else:
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            out.update({p + name: t for name, t in tensors if t is not None})
    return {k: v.detach().clone() for k, v in out.items()}


def _is_head_norm(path: str, net: AdaptiveNet) -> bool:
    return path.startswith("avgpool.") and isinstance(getattr(net.backbone, "avgpool", None), nn.Sequential)


@torch.no_grad()
def load_plain_state(
    net: AdaptiveNet, state: Mapping[str, Tensor], *, source: str, log: Callable[[str], None] = print
) -> None:
    """Copy a plain backbone's ``state`` into ``net`` in place (see the module docstring).

    Every source tensor must map and every target tensor must be given, else one ``ValueError`` names the first
    few of each (and ``net`` is left as it was). A classifier with another number of classes keeps ``net``'s initialisation and ``log`` says so;
    so does a head norm the source lacks (it starts as the identity).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    copies: list[tuple[Tensor, Tensor]] = []
    notes: list[str] = []

    def take(key: str, target: Tensor, rows: bool = False) -> None:
        """``target`` from ``state[key]``; ``rows``: the target holds one copy of it per depth (dim 0)."""
        if key not in state:
            missing.append(key)
            return
        used.add(key)
        value = state[key]
        if value.shape != (target.shape[1:] if rows else target.shape):
            wrong.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
            return
        copies.append((target, value.to(target.dtype).expand_as(target)))

    for path, module in net.backbone.named_modules():
        p = f"{path}." if path else ""
        if isinstance(module, DepthBatchNorm2d):
            used.add(p + "num_batches_tracked")  # plain BN's counter: per-depth BN has none
            if module.gate is not None:  # g * F(x) = F(x)
                copies.append((module.gate, torch.ones_like(module.gate)))
            if _is_head_norm(path, net) and not any(p + k in state for k in BN_KEYS):
                identity = {"running_mean": 0.0, "running_var": 1.0, "weight": math.sqrt(1.0 + module.eps), "bias": 0.0}
                copies += [(getattr(module, k), torch.full_like(getattr(module, k), v)) for k, v in identity.items()]
                notes.append(f"{source}: no head norm ({path}); it starts as the identity at full depth (eval mode)")
                continue
            for k in BN_KEYS:
                take(p + k, getattr(module, k), rows=True)
        elif isinstance(module, DepthLinear | nn.Linear) and path == CLASSIFIER and p + "weight" in state:
            weight = state[p + "weight"]
            if weight.dim() == 2 and weight.shape[0] != module.weight.shape[-2]:
                used.update({p + "weight", p + "bias"})
                notes.append(
                    f"{source}: {weight.shape[0]} classes, this net {module.weight.shape[-2]}: "
                    f"the classifier ({path}) is re-initialised"
                )
                continue
            take(p + "weight", module.weight, rows=isinstance(module, DepthLinear))
            take(p + "bias", module.bias, rows=isinstance(module, DepthLinear))
        else:
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor is not None:
                    take(p + name, tensor)
    unmapped = sorted(set(state) - used)
    if unmapped or missing or wrong:
        found = {"unmapped": unmapped, "missing": missing, "shape mismatch": wrong}
        parts = [f"{what} {items[:4]}{' ...' if len(items) > 4 else ''}" for what, items in found.items() if items]
        raise ValueError(
            f"{source} does not fit model {type(net.backbone).__name__} ({'; '.join(parts)}); "
            "pass the state dict of the same backbone (model.name, model.width) as the config builds"
        )
    for target, value in copies:
        target.copy_(value)
    for note in notes:
        log(note)


def adaptive_from(
    module: nn.Module,
    scaling_factors: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    *,
    stage_names: Sequence[str] | None = None,
    **options: object,
) -> AdaptiveNet:
    """A depth-adaptive copy of a trained plain ResNet (ours, torchvision's) that computes what ``module``
    computes at full depth; ``module`` is left as it was. ``stage_names``: the residual stages (default: the
    module's own ``stage_names``, else torchvision's ``layer1..layer4``). ``options``: ``AdaptiveNet``'s
    (``keep``, ``gate``, ``bn``, ``head``...)."""
    names = stage_names or getattr(module, "stage_names", None)
    if names is None:
        names = [
            n for n in ("layer1", "layer2", "layer3", "layer4") if isinstance(getattr(module, n, None), nn.Sequential)
        ]
    if not names:
        raise ValueError(f"{type(module).__name__} has no residual stages; pass stage_names=[...]")
    net = AdaptiveNet(copy.deepcopy(module), stage_names=names, scaling_factors=scaling_factors, **options)  # type: ignore[arg-type]
    return net.train(module.training)
