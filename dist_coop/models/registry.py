"""Backbone registry: name -> plain backbone, and ``build_model`` -> depth-adaptive net.

The names are ``dist_coop.choices.MODEL_NAMES`` (what ``model.name`` accepts); each name says how its backbone
is built: ``resnet<depth>`` a CIFAR ResNet, ``resnet<depth>_64`` a ResNet-18/34 for 64x64 input, ``tv_<arch>``
torchvision's ``<arch>``. The depth-adaptive options (``keep``, ``gate``, ``bn``, ...) and their defaults are
``AdaptiveNet``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from dist_coop.choices import MODEL_NAMES
from dist_coop.config import ModelConfig, check_model_name
from dist_coop.models.adaptive import AdaptiveNet
from dist_coop.models.resnet import cifar_resnet, resnet64

# builder(width, in_channels, num_classes) -> (backbone, stage names); width 0 = the default
Builder = Callable[[int, int, int], tuple[nn.Module, Sequence[str]]]


def _ours(make: Callable[..., nn.Module], default_width: int) -> Builder:
    def build(width: int, in_channels: int, num_classes: int) -> tuple[nn.Module, Sequence[str]]:
        net = make(width=width or default_width, in_channels=in_channels, num_classes=num_classes)
        return net, net.stage_names

    return build


def _torchvision(arch: str) -> Builder:
    def build(width: int, in_channels: int, num_classes: int) -> tuple[nn.Module, Sequence[str]]:
        try:
            import torchvision
        except Exception as e:  # ImportError, or a broken torchvision/torch pairing (RuntimeError)
            raise ValueError(f"model 'tv_{arch}' needs torchvision, which does not import here: {e}") from e
        if width:
            raise ValueError(f"model.width is not supported for torchvision model 'tv_{arch}'")
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        return net, ("layer1", "layer2", "layer3", "layer4")

    return build


STAGES_64 = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}  # resnet<depth>_64: blocks per stage (He et al. 2016, table 1)


def _builder(name: str) -> Builder:
    """How backbone ``name`` is built, read from its name (the module docstring)."""
    if name.startswith("tv_"):
        return _torchvision(name.removeprefix("tv_"))
    depth, _, size = name.removeprefix("resnet").partition("_")
    if size == "64":
        return _ours(lambda **kw: resnet64(STAGES_64[int(depth)], **kw), 64)
    return _ours(lambda **kw: cifar_resnet(int(depth), **kw), 16)


MODELS: dict[str, Builder] = {name: _builder(name) for name in MODEL_NAMES}


def build_backbone(
    name: str, *, width: int = 0, in_channels: int = 3, num_classes: int = 10, head_norm: bool = False
) -> tuple[nn.Module, Sequence[str]]:
    """Backbone ``name`` and its stage names; ``head_norm`` puts a BatchNorm on the pooled features.

    Sub-nets of different depth end their last stage after different numbers of residual adds, so
    the shared classifier would see features of depth-dependent scale; with per-depth statistics
    (``AdaptiveNet`` converts this BN like every other) each depth's features reach it normalised.
    The layout, ``avgpool = Sequential(pool, BatchNorm2d)``, is ``ResNet(..., head_norm=True)``'s.
    """
    check_model_name(name)
    backbone, stages = MODELS[name](width, in_channels, num_classes)
    if head_norm:
        backbone.avgpool = nn.Sequential(backbone.avgpool, nn.BatchNorm2d(backbone.fc.in_features))
    return backbone, stages


def build_model(
    name: str,
    scaling_factors: Sequence[float],
    *,
    width: int = 0,
    in_channels: int = 3,
    num_classes: int = 10,
    head_norm: bool = False,
    **options: Any,
) -> AdaptiveNet:
    """A depth-adaptive net of registered backbone ``name``; ``options``: ``AdaptiveNet``'s (``keep``, ``gate``,
    ``bn``, ``zero_init``, ``share_prefix``, ``head``)."""
    backbone, stages = build_backbone(
        name, width=width, in_channels=in_channels, num_classes=num_classes, head_norm=head_norm
    )
    return AdaptiveNet(backbone, stage_names=stages, scaling_factors=scaling_factors, **options)


def build_from_config(
    cfg: ModelConfig,
    scaling_factors: Sequence[float],
    *,
    leader: bool = False,
    trained: Sequence[float] | None = None,
) -> AdaptiveNet:
    """The net of ``cfg`` (the Leader's width with ``leader``). ``trained``: the depths with a loss
    term (None: every depth); ``model.head: private`` applies to a net that trains two or more of them, and a net
    trained at one depth (the Leader, a net trained alone, a full-only Teammate) keeps one classifier for all."""
    width = (cfg.leader_width or cfg.width) if leader else cfg.width
    return build_model(
        cfg.name,
        scaling_factors,
        width=width,
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        keep=cfg.keep,
        gate=cfg.gate,
        bn=cfg.bn,
        zero_init=cfg.zero_init,
        head_norm=cfg.head_norm,
        share_prefix=cfg.share_prefix,
        head=cfg.head if len(scaling_factors if trained is None else trained) > 1 else "shared",
    )
