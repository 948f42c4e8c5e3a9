"""Export a static sub-net: the skipped blocks physically removed, that depth's BN baked in.

``static_subnet(net, s)`` returns a plain PyTorch module of the backbone's own class (our
``ResNet`` or torchvision's) whose stages hold only the kept blocks and whose norms are plain
``nn.BatchNorm2d`` carrying depth s's statistics and affine parameters (gate folded in). It needs
nothing from dist_coop to run; its ``pt2`` (``torch.export``), ONNX and TorchScript files run without
dist_coop installed. ``pt2`` and ONNX both go through ``torch.export`` with a dynamic batch dimension;
TorchScript (``torch.jit``) is deprecated in torch and kept only as a legacy choice.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dist_coop.models.adaptive import AdaptiveNet, DepthStage
from dist_coop.models.head import DepthLinear
from dist_coop.models.norm import DepthBatchNorm2d

FORMATS = ("pt2", "onnx", "state_dict", "torchscript")
DEFAULT_FORMAT = "pt2"
LEGACY_FORMATS = ("torchscript",)  # torch.jit.trace/save/load print DeprecationWarnings since torch 2.10
SUFFIXES = {"pt2": "pt2", "onnx": "onnx", "state_dict": "pt", "torchscript": "ts"}


def _plain_bn(norm: DepthBatchNorm2d, index: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(norm.num_features, eps=norm.eps, momentum=norm.momentum)
    w, b = norm.affine(index)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
        bn.running_mean.copy_(norm.running_mean[index])
        bn.running_var.copy_(norm.running_var[index])
    return bn.to(norm.weight.device)


def _bake(module: nn.Module, index: int) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, DepthBatchNorm2d):
            setattr(module, name, _plain_bn(child, index))
        elif isinstance(child, DepthLinear):
            setattr(module, name, child.row(index))
        else:
            _bake(child, index)


@torch.no_grad()
def static_subnet(net: AdaptiveNet, s: float) -> nn.Module:
    """The sub-net of depth ``s`` as a plain module in eval mode (outputs equal ``net`` at depth s, eval)."""
    if s not in net.masks:
        raise ValueError(f"scaling factor {s} is not one of this net's depths {list(net.scaling_factors)}")
    backbone = copy.deepcopy(net.backbone)
    for name, mask in zip(net.stage_names, net.masks[s]):
        stage: DepthStage = getattr(backbone, name)
        setattr(backbone, name, nn.Sequential(*[block for keep, block in zip(mask, stage) if keep]))
    _bake(backbone, net.scaling_factors.index(s))
    return backbone.eval()


def kept_blocks(net: AdaptiveNet, s: float) -> list[int]:
    """Blocks per stage at depth ``s``: build the static architecture with these (``ResNet(kept, widths)``)."""
    return [sum(m) for m in net.masks[s]]


def check_out_path(path: str | Path, name: str = "path", example: str = "model.pt") -> Path:
    """``path`` can become the exported file: not a folder (nor ending in a separator), and no file in the way
    of its parent folders."""
    text, path = str(path), Path(path)
    if path.is_dir() or text.endswith(("/", "\\")):
        raise ValueError(f"{name} {text} is a folder; give the file to write, e.g. {path / example}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name} {text}: {parent} is a file, not a folder")
            break
    return path


def export(net: AdaptiveNet, s: float, path: str | Path, fmt: str, input_shape: tuple[int, ...]) -> Path:
    """Write depth ``s`` of ``net`` as ``pt2`` (``torch.export.save``; load with ``torch.export.load``),
    ``onnx``, ``state_dict`` or the legacy ``torchscript``. pt2 and ONNX take any batch size."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    path = check_out_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = static_subnet(net, s).cpu()
    if fmt == "state_dict":
        torch.save(
            {
                "state_dict": module.state_dict(),
                "blocks_per_stage": kept_blocks(net, s),
                "head_norm": isinstance(module.avgpool, nn.Sequential),  # ResNet(..., head_norm=True)
                "scaling_factor": s,
            },
            path,
        )
    elif fmt == "pt2":
        torch.export.save(export_program(module, input_shape), path)
    elif fmt == "onnx":
        _export_onnx(module, input_shape, path)
    else:
        torch.jit.save(torch.jit.trace(module, torch.zeros(1, *input_shape)), str(path))
    return path


def export_program(module: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of a plain module with the batch dimension dynamic (traced at batch 2: a batch of 1
    would be specialised to 1)."""
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(module, (torch.zeros(2, *input_shape),), dynamic_shapes=({0: batch},))


def _export_onnx(module: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """The ``torch.export``-based ONNX exporter (``dynamo=True``): one self-contained file, input ``image`` and
    output ``logits`` with a dynamic ``batch`` dimension."""
    batch = torch.export.Dim("batch", min=1)
    with _quiet_onnx_exporter():
        torch.onnx.export(
            module,
            (torch.zeros(2, *input_shape),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,  # weights inside the .onnx file (small nets; the 2 GB limit is far)
            dynamo=True,
            verbose=False,
        )


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Silence two things of torch 2.13's ONNX exporter that are not about our model: its log lines that
    torchvision's ops are not registered (torchvision is optional here), and the FutureWarning that its own
    ``run_decompositions`` raises by deep-copying torch's deprecated ``LeafSpec`` singleton (torch-internal;
    nothing we call is deprecated). Every other warning still reaches the caller."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
            )
            yield
    finally:
        registration.setLevel(level)
