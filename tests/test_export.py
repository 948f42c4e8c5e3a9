"""Static sub-nets: skipped blocks removed, BN baked in; same outputs as the adaptive net; pt2 / ONNX / TorchScript."""

import subprocess
import sys

import pytest
import torch

from dist_coop.infer.export import export, kept_blocks, static_subnet
from dist_coop.models import DepthBatchNorm2d, DepthLinear, build_model
from dist_coop.models.resnet import ResNet, cifar_resnet


def _trained_like(keep="prefix", bn="shared", head_norm=False, head="shared"):
    torch.manual_seed(0)
    net = build_model(
        "resnet32", [0.25, 0.5, 1.0], width=4, in_channels=1, keep=keep, bn=bn, head_norm=head_norm, head=head
    )
    net.train()
    for s in net.scaling_factors:  # give every depth its own statistics and gates their own values
        net.set_depth(s)
        net(torch.randn(16, 1, 20, 20) * (1 + s) + s)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, DepthBatchNorm2d) and m.gate is not None:
                m.gate.fill_(0.7)
        if head == "private":  # every depth's classifier its own values
            net.backbone.fc.weight.add_(torch.randn_like(net.backbone.fc.weight))
    return net.eval()


@pytest.mark.parametrize(
    "keep, bn, head_norm, head",
    [
        ("prefix", "shared", True, "shared"),
        ("spread", "private", False, "shared"),
        ("prefix", "shared", True, "private"),
    ],
)
def test_static_subnet_equals_adaptive_net(keep, bn, head_norm, head):
    net = _trained_like(keep, bn, head_norm, head)
    x = torch.randn(3, 1, 20, 20)
    for s in net.scaling_factors:
        static = static_subnet(net, s)
        assert not any(isinstance(m, (DepthBatchNorm2d, DepthLinear)) for m in static.modules())
        assert isinstance(static.fc, torch.nn.Linear)
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


def _run_without_dist_coop(tmp_path, load: str, batches=(1, 5)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Load an exported file with ``load`` (code giving ``m``) in a process where importing dist_coop fails, with
    warnings about deprecated APIs as errors; returns (input, output) per batch size."""
    xs = [torch.randn(b, 1, 20, 20) for b in batches]
    torch.save(xs, tmp_path / "x.pt")
    code = (
        "import sys, torch; sys.modules['dist_coop'] = None\n"  # importing dist_coop would fail
        f"{load}\nxs = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save([m(x) for x in xs], {str(tmp_path / 'y.pt')!r})\n"
    )
    flags = ["-W", "error::DeprecationWarning", "-W", "error::FutureWarning"]
    subprocess.run([sys.executable, *flags, "-c", code], check=True, cwd=tmp_path)
    return list(zip(xs, torch.load(tmp_path / "y.pt")))


@pytest.mark.filterwarnings("error::DeprecationWarning", "error::FutureWarning")
def test_pt2_loads_with_torch_export_and_takes_any_batch(tmp_path):
    net = _trained_like(head_norm=True)
    path = export(net, 0.5, tmp_path / "sub.pt2", "pt2", (1, 20, 20))
    pairs = _run_without_dist_coop(tmp_path, f"m = torch.export.load({str(path)!r}).module()")
    assert [x.shape[0] for x, _ in pairs] == [1, 5]
    with torch.no_grad(), net.at_depth(0.5):
        for x, y in pairs:
            torch.testing.assert_close(y, net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("error::DeprecationWarning", "error::FutureWarning")
def test_onnx_matches_in_onnxruntime_at_any_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # the torch.export-based exporter needs it
    net = _trained_like()
    path = export(net, 0.5, tmp_path / "sub.onnx", "onnx", (1, 20, 20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.onnx"]  # the weights are inside, no .data file
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 5):  # neither is the batch size the exporter traced with (2)
        x = torch.randn(batch, 1, 20, 20)
        (y,) = session.run(["logits"], {"image": x.numpy()})
        assert y.shape == (batch, 10)
        with torch.no_grad(), net.at_depth(0.5):
            torch.testing.assert_close(torch.from_numpy(y), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy format: torch.jit is deprecated
def test_legacy_torchscript_runs_without_dist_coop(tmp_path):
    net = _trained_like()
    path = export(net, 0.25, tmp_path / "sub.ts", "torchscript", (1, 20, 20))
    xs = [torch.randn(2, 1, 20, 20)]
    torch.save(xs, tmp_path / "x.pt")
    code = (
        "import sys, torch; sys.modules['dist_coop'] = None\n"
        f"m = torch.jit.load({str(path)!r}); xs = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save([m(x) for x in xs], {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with torch.no_grad(), net.at_depth(0.25):
        torch.testing.assert_close(torch.load(tmp_path / "y.pt")[0], net(xs[0]), rtol=1e-5, atol=1e-5)


def test_export_errors():
    net = _trained_like()
    with pytest.raises(ValueError, match="not one of this net's depths"):
        static_subnet(net, 0.75)
    with pytest.raises(ValueError, match="format must be one of"):
        export(net, 0.5, "/tmp/x", "tflite", (1, 20, 20))
