"""From a trained plain network to a depth-adaptive one: the same logits at full depth (dist_coop/models/convert.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dist_coop
from dist_coop.models.convert import load_plain_state, plain_state_dict
from dist_coop.models.registry import build_backbone, build_model
from dist_coop.pretrained import load_init

DOC = Path(__file__).resolve().parents[1] / "docs" / "guide" / "finetune.md"


def trained_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` with every BN's statistics and affine away from their init (as training leaves them), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


def plain(name: str = "resnet32", **kw) -> nn.Module:
    torch.manual_seed(1)
    return trained_like(build_backbone(name, width=4, in_channels=1, **kw)[0])


@pytest.mark.parametrize(
    ("bn", "head", "head_norm"),
    [("shared", "shared", True), ("private", "private", True), ("shared", "shared", False)],
)
def test_converted_net_computes_the_source_logits_at_full_depth(bn, head, head_norm):
    """Every BN row starts from the source BN, gates at 1, a private classifier's rows are the source's: in float64
    the logits agree to float64 rounding; the model computes exactly what the source computes, op for op."""
    source = plain(head_norm=head_norm).double()
    net = build_model(
        "resnet32", (0.25, 0.5, 1.0), width=4, in_channels=1, bn=bn, head=head, head_norm=head_norm
    ).double()
    load_plain_state(net, source.state_dict(), source="test")
    net.eval()
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), source(x), rtol=1e-12, atol=1e-12)
        # every depth's row holds the source BN: depth s computes the source with the blocks s skips removed
        for s in (0.25, 0.5):
            truncated = copy.deepcopy(source)
            for name, keep in zip(net.stage_names, net.masks[s]):
                blocks = [b for b, kept in zip(getattr(truncated, name), keep) if kept]
                setattr(truncated, name, nn.Sequential(*blocks))
            with net.at_depth(s):
                torch.testing.assert_close(net(x), truncated(x), rtol=1e-12, atol=1e-12)


def test_head_norm_the_source_lacks_starts_as_the_identity():
    source = plain(head_norm=False).double()
    net = build_model("resnet32", (0.25, 1.0), width=4, in_channels=1, head_norm=True).double()
    lines: list[str] = []
    load_plain_state(net, source.state_dict(), source="plain.pt", log=lines.append)
    net.eval()
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():  # x / sqrt(1 + eps) * sqrt(1 + eps): float64 rounding
        torch.testing.assert_close(net(x), source(x), rtol=1e-12, atol=1e-12)
    assert lines == ["plain.pt: no head norm (avgpool.1); it starts as the identity at full depth (eval mode)"]


def test_run_net_back_to_plain_and_into_a_new_net_is_exact():
    """``plain_state_dict`` folds learned gates (away from 1) and takes the full-depth rows: a trained adaptive net
    becomes the source of another with other depths, and both compute the same full-depth logits."""
    trained = build_model("resnet32", (0.25, 0.5, 1.0), width=4, in_channels=1, bn="private", head="private")
    trained.load_state_dict(
        {
            k: v + 0.1 * torch.rand_like(v) if k.endswith(("gate", "weight")) else v
            for k, v in trained.state_dict().items()
        }
    )
    trained.eval()
    net = build_model("resnet32", (0.5, 1.0), width=4, in_channels=1).eval()
    load_plain_state(net, plain_state_dict(trained), source="run")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), trained(x), rtol=1e-5, atol=1e-6)


def test_other_classes_reinitialise_the_classifier_only_and_say_so():
    source = plain(num_classes=10, head_norm=True)
    net = build_model("resnet32", (0.25, 1.0), width=4, in_channels=1, num_classes=7, head_norm=True)
    fc_before = net.backbone.fc.weight.clone()
    lines: list[str] = []
    load_plain_state(net, source.state_dict(), source="src", log=lines.append)
    assert lines == ["src: 10 classes, this net 7: the classifier (fc) is re-initialised"]
    assert torch.equal(net.backbone.fc.weight, fc_before)
    assert torch.equal(net.backbone.conv1.weight, source.conv1.weight)


def test_keys_that_do_not_map_are_named_in_one_error():
    net = build_model("resnet32", (0.25, 1.0), width=4, in_channels=1, head_norm=True)
    state = dict(plain(head_norm=True).state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["layer2.1.conv1.weight"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_plain_state(net, state, source="bad.pt")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "a refused source changed the net"
    message = str(e.value)
    assert "\n" not in message
    assert "unmapped ['extra.weight']" in message and "missing ['layer2.1.conv1.weight']" in message
    with pytest.raises(ValueError, match=r"shape mismatch \['conv1.weight"):
        load_plain_state(
            net, plain("resnet32", head_norm=True).state_dict() | {"conv1.weight": torch.zeros(4)}, source="x"
        )


def test_state_dict_file_source(tmp_path):
    source = plain(head_norm=True)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    net = build_model("resnet32", (0.25, 1.0), width=4, in_channels=1, head_norm=True)
    load_init(net, str(tmp_path / "plain.pt"), "teammate_a", log=lambda _: None)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), source(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="model.init: .*nope.pt is neither"):
        load_init(net, str(tmp_path / "nope.pt"), "teammate_a")


def test_adaptive_from_keeps_the_module_and_its_function():
    source = plain(head_norm=False)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = source(x)
        net = dist_coop.adaptive_from(source, scaling_factors=(0.25, 0.5, 1.0))
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
    assert isinstance(source.layer1, nn.Sequential) and type(source.layer1) is nn.Sequential  # left as it was
    assert not net.training


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_finetune_guide_example_runs_as_written():
    blocks = python_blocks()
    assert blocks, f"{DOC} has no python block"
    exec(compile(blocks[0], str(DOC), "exec"), {})


def torchvision_or_none():
    try:
        import torchvision
    except Exception:  # absent, or a build that does not import beside this torch
        return None
    return torchvision


def test_torchvision_name_needs_torchvision():
    if torchvision_or_none() is not None:
        pytest.skip("torchvision imports here")
    net = build_model("resnet32", (0.25, 1.0), width=4, in_channels=1)
    with pytest.raises(ValueError, match="torchvision:ResNet18_Weights.IMAGENET1K_V1' needs torchvision"):
        load_init(net, "torchvision:ResNet18_Weights.IMAGENET1K_V1", "teammate_a")


def test_torchvision_resnet_converts():
    torchvision = torchvision_or_none()
    if torchvision is None:
        pytest.skip("torchvision does not import here")
    source = trained_like(torchvision.models.resnet18(num_classes=1000))
    net = build_model("tv_resnet18", (0.25, 0.5, 1.0), num_classes=1000, head_norm=False)
    load_plain_state(net, source.state_dict(), source="tv")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), source(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dist_coop.adaptive_from(source)(x), source(x), rtol=1e-5, atol=1e-5)
    try:  # the guide's torchvision example downloads its weights
        exec(compile(python_blocks()[1], str(DOC), "exec"), {})
    except OSError as e:  # no network (urllib's URLError is an OSError)
        pytest.skip(f"the ImageNet weights do not download here: {e}")
