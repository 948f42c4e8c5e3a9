"""Static sub-nets: skipped blocks removed, BN baked in; same outputs as the adaptive net; TorchScript / ONNX."""

import subprocess
import sys

import pytest
import torch

from dist_coop.infer.export import export, kept_blocks, static_subnet
from dist_coop.models import DepthBatchNorm2d, build_model
from dist_coop.models.resnet import ResNet, cifar_resnet


def _trained_like(keep="prefix", bn="shared", head_norm=False):
    torch.manual_seed(0)
    net = build_model("resnet32", [0.25, 0.5, 1.0], width=4, in_channels=1, keep=keep, bn=bn, head_norm=head_norm)
    net.train()
    for s in net.scaling_factors:  # give every depth its own statistics and gates their own values
        net.set_depth(s)
        net(torch.randn(16, 1, 20, 20) * (1 + s) + s)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, DepthBatchNorm2d) and m.gate is not None:
                m.gate.fill_(0.7)
    return net.eval()


@pytest.mark.parametrize("keep, bn, head_norm", [("prefix", "shared", True), ("spread", "private", False)])
def test_static_subnet_equals_adaptive_net(keep, bn, head_norm):
    net = _trained_like(keep, bn, head_norm)
    x = torch.randn(3, 1, 20, 20)
    for s in net.scaling_factors:
        static = static_subnet(net, s)
        assert not any(isinstance(m, DepthBatchNorm2d) for m in static.modules())
        assert sum(len(getattr(static, n)) for n in net.stage_names) == net.num_blocks(s)
        with torch.no_grad(), net.at_depth(s):
            torch.testing.assert_close(static(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_norm", [False, True])
def test_state_dict_loads_into_static_architecture(tmp_path, head_norm):
    net = _trained_like(head_norm=head_norm)
    path = export(net, 0.5, tmp_path / "sub.pt", "state_dict", (1, 20, 20))
    saved = torch.load(path, weights_only=True)
    assert saved["blocks_per_stage"] == kept_blocks(net, 0.5) == [3, 3, 3]
    assert saved["head_norm"] is head_norm
    plain = ResNet(saved["blocks_per_stage"], [4, 8, 16], in_channels=1, num_classes=10, head_norm=head_norm).eval()
    plain.load_state_dict(saved["state_dict"])  # strict: every key and shape matches
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad(), net.at_depth(0.5):
        torch.testing.assert_close(plain(x), net(x), rtol=1e-5, atol=1e-5)
    assert isinstance(cifar_resnet(20), ResNet)


def test_torchscript_runs_without_dist_coop(tmp_path):
    net = _trained_like()
    path = export(net, 0.25, tmp_path / "sub.ts", "torchscript", (1, 20, 20))
    x = torch.randn(2, 1, 20, 20)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; sys.modules['dist_coop'] = None\n"  # importing dist_coop would fail
        f"m = torch.jit.load({str(path)!r}); x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with torch.no_grad(), net.at_depth(0.25):
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), net(x), rtol=1e-5, atol=1e-5)


def test_onnx_matches_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = _trained_like()
    path = export(net, 0.5, tmp_path / "sub.onnx", "onnx", (1, 20, 20))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 20, 20)  # a batch size other than the export's: dynamic axis
    (y,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad(), net.at_depth(0.5):
        torch.testing.assert_close(torch.from_numpy(y), net(x), rtol=1e-4, atol=1e-4)


def test_export_errors():
    net = _trained_like()
    with pytest.raises(ValueError, match="not one of this net's depths"):
        static_subnet(net, 0.75)
    with pytest.raises(ValueError, match="format must be one of"):
        export(net, 0.5, "/tmp/x", "tflite", (1, 20, 20))
