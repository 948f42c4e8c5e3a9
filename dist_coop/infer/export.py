"""Export a static sub-net: the skipped blocks physically removed, that depth's BN baked in.

``static_subnet(net, s)`` returns a plain PyTorch module of the backbone's own class (our
``ResNet`` or torchvision's) whose stages hold only the kept blocks and whose norms are plain
``nn.BatchNorm2d`` carrying depth s's statistics and affine parameters (gate folded in). It needs
nothing from dist_coop to run; its ``pt2`` (``torch.export``), ONNX and TorchScript files run without
dist_coop installed. ``pt2`` and ONNX both go through ``torch.export`` with a dynamic batch dimension;
TorchScript (``torch.jit``) is deprecated in torch and kept only as a legacy choice.

Every file carries what inference needs (``deploy_metadata``): the input's shape, channel mode and pixel range, the
normalisation, the class names and the depth; as ONNX ``metadata_props`` (each value JSON text), as the extra file
``metadata.json`` of a pt2 or TorchScript file, under ``"metadata"`` in a state_dict file. With
``normalize_in_graph`` the graph starts with ``(x - mean) / std``: pixels in [0, 1] (uint8 / 255) go straight in.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dist_coop.models.adaptive import AdaptiveNet, DepthStage
from dist_coop.models.head import DepthLinear
from dist_coop.models.norm import DepthBatchNorm2d

if TYPE_CHECKING:
    from dist_coop.checkpoint import Inputs

FORMATS = ("pt2", "onnx", "state_dict", "torchscript")
DEFAULT_FORMAT = "pt2"
LEGACY_FORMATS = ("torchscript",)  # torch.jit.trace/save/load print DeprecationWarnings since torch 2.10
SUFFIXES = {"pt2": "pt2", "onnx": "onnx", "state_dict": "pt", "torchscript": "ts"}
GRAPH_FORMATS = ("pt2", "onnx", "torchscript")  # the formats that hold a graph (normalisation can go inside)
METADATA_FILE = "metadata.json"  # the extra file of a pt2 / TorchScript export holding ``deploy_metadata``
INPUT_NAME, OUTPUT_NAME = "image", "logits"
MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode images are converted to (as the data pipeline does)


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


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, (B, C, H, W) -> (B, C, H, W): the data pipeline's normalisation, as the
    first node of an exported graph."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def deploy_metadata(
    inputs: Inputs, *, s: float, blocks: int, normalized_in_graph: bool, net: str = ""
) -> dict[str, Any]:
    """What a runtime needs to feed an exported graph and read its output, without dist_coop.

    The graph's input is float32 (N, C, H, W): an image converted to ``channel_mode`` (PIL's mode), resized to
    (W, H) if it differs (``resize``), its uint8 pixels divided by 255 (``pixel_range`` [0, 1]) and, unless
    ``normalized_in_graph``, standardised ``(x - mean) / std`` per channel; the output is logits over ``classes``.
    """
    c, h, w = inputs.shape
    if c not in MODES:
        raise ValueError(f"inputs with {c} channels have no image mode; channels must be one of {sorted(MODES)}")
    shape = f"float32 (N, {c}, {h}, {w}) NCHW"
    return {
        "producer": "dist-coop",
        "net": net,
        "depth": s,
        "blocks": blocks,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": [c, h, w],
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "channel_mode": MODES[c],
        "resize": "bilinear",
        "pixel_range": [0, 1],
        "normalized_in_graph": normalized_in_graph,
        "mean": [float(v) for v in inputs.mean],
        "std": [float(v) for v in inputs.std],
        "classes": list(inputs.classes),
        "preprocess": f"{shape}: pixels / 255 in [0, 1]"
        + ("; the graph subtracts mean and divides by std" if normalized_in_graph else ", then (x - mean) / std"),
        "output": f"{OUTPUT_NAME} (N, {len(inputs.classes)}): argmax indexes classes; softmax gives probabilities",
    }


def check_normalize(fmt: str, normalize_in_graph: bool) -> None:
    """Normalisation in the graph needs a format that holds a graph."""
    if normalize_in_graph and fmt not in GRAPH_FORMATS:
        raise ValueError(
            f"--normalize-in-graph does not apply to --format {fmt} (weights only; its metadata holds mean and "
            f"std): use --format {' or '.join(GRAPH_FORMATS[:2])}, or --no-normalize-in-graph"
        )


def export(
    net: AdaptiveNet,
    s: float,
    path: str | Path,
    fmt: str,
    input_shape: tuple[int, ...],
    *,
    inputs: Inputs | None = None,
    normalize_in_graph: bool = False,
    name: str = "",
) -> Path:
    """Write depth ``s`` of ``net`` as ``pt2`` (``torch.export.save``; load with ``torch.export.load``),
    ``onnx``, ``state_dict`` or the legacy ``torchscript``. pt2 and ONNX take any batch size.

    ``inputs`` (a run's ``Inputs``) goes into the file as ``deploy_metadata`` (``name``: the net's);
    ``normalize_in_graph`` (needs ``inputs``; a graph format) makes the graph take pixels in [0, 1]."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if normalize_in_graph and inputs is None:
        raise ValueError("normalize_in_graph needs the inputs' mean and std: pass inputs=run.inputs")
    check_normalize(fmt, normalize_in_graph)
    path = check_out_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = static_subnet(net, s).cpu()
    meta = {}
    if inputs is not None:
        meta = deploy_metadata(inputs, s=s, blocks=net.num_blocks(s), normalized_in_graph=normalize_in_graph, net=name)
    graph = nn.Sequential(Normalize(inputs.mean, inputs.std), module).eval() if normalize_in_graph else module
    extra_files = {METADATA_FILE: json.dumps(meta)} if meta else None
    if fmt == "state_dict":
        torch.save(
            {
                "state_dict": module.state_dict(),
                "blocks_per_stage": kept_blocks(net, s),
                "head_norm": isinstance(module.avgpool, nn.Sequential),  # ResNet(..., head_norm=True)
                "scaling_factor": s,
                "metadata": meta,
            },
            path,
        )
    elif fmt == "pt2":
        torch.export.save(export_program(graph, input_shape), path, extra_files=extra_files)
    elif fmt == "onnx":
        program = onnx_program(graph, input_shape)
        program.model.metadata_props.update({key: json.dumps(value) for key, value in meta.items()})
        program.save(str(path), external_data=False)  # weights inside the .onnx file (small nets; 2 GB is far)
    else:
        torch.jit.save(torch.jit.trace(graph, torch.zeros(1, *input_shape)), str(path), _extra_files=extra_files)
    return path


def export_program(module: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of a plain module with the batch dimension dynamic (traced at batch 2: a batch of 1
    would be specialised to 1)."""
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(module, (torch.zeros(2, *input_shape),), dynamic_shapes=({0: batch},))


def onnx_program(module: nn.Module, input_shape: tuple[int, ...]) -> torch.onnx.ONNXProgram:
    """The ``torch.export``-based ONNX exporter (``dynamo=True``): input ``image`` and output ``logits`` with a
    dynamic ``batch`` dimension; ``.save(path)`` writes it, ``.model_proto`` is the model in memory."""
    batch = torch.export.Dim("batch", min=1)
    with _quiet_onnx_exporter():
        return torch.onnx.export(
            module,
            (torch.zeros(2, *input_shape),),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
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
