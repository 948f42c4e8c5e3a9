"""Export a static sub-net: the skipped blocks physically removed, that depth's BN baked in.

``static_subnet(net, s)`` returns a plain PyTorch module of the backbone's own class (our
``ResNet`` or torchvision's) whose stages hold only the kept blocks and whose norms are plain
``nn.BatchNorm2d`` carrying depth s's statistics and affine parameters (gate folded in). It needs
nothing from dist_coop to run; TorchScript and ONNX files of it run without dist_coop installed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from dist_coop.models.adaptive import AdaptiveNet, DepthStage
from dist_coop.models.norm import DepthBatchNorm2d

FORMATS = ("state_dict", "torchscript", "onnx")


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
    """Write depth ``s`` of ``net`` as ``state_dict`` (.pt), ``torchscript`` (.pt) or ``onnx`` (.onnx)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    path = check_out_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = static_subnet(net, s).cpu()
    example = torch.zeros(1, *input_shape)
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
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.trace(module, example), str(path))
    else:
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return path
