"""What an export carries for inference: metadata in every format, normalisation in the graph, and the guide's
onnxruntime and pt2 examples run as written on real images, agreeing with the eager net and ``dist-coop eval``."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_coop.checkpoint import Inputs
from dist_coop.infer.export import METADATA_FILE, export
from tests.test_export import _trained_like

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "deploy.md"
INPUTS = Inputs((1, 20, 20), (0.25,), (0.5,), tuple(f"class {i}" for i in range(10)))


def _standardised(x: torch.Tensor, inputs: Inputs = INPUTS) -> torch.Tensor:
    c = len(inputs.mean)
    return (x - torch.tensor(inputs.mean).view(1, c, 1, 1)) / torch.tensor(inputs.std).view(1, c, 1, 1)


def _onnx_metadata(path: Path) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}


def _check_metadata(meta: dict, normalized: bool) -> None:
    assert meta["mean"] == [0.25] and meta["std"] == [0.5] and meta["classes"] == list(INPUTS.classes)
    assert meta["depth"] == 0.5 and meta["blocks"] == 9 and meta["net"] == "teammate_a"
    assert meta["input_shape"] == [1, 20, 20] and meta["channel_mode"] == "L" and meta["pixel_range"] == [0, 1]
    assert meta["input_name"] == "image" and meta["output_name"] == "logits" and meta["input_dtype"] == "float32"
    assert meta["normalized_in_graph"] is normalized


@pytest.mark.parametrize("normalized", [True, False])
def test_pt2_and_onnx_carry_metadata_and_normalise_in_the_graph(tmp_path, normalized):
    ort = pytest.importorskip("onnxruntime")
    net = _trained_like()
    pixels = torch.rand(3, 1, 20, 20)  # images / 255
    fed = pixels if normalized else _standardised(pixels)  # what the file's metadata says to feed
    with torch.no_grad(), net.at_depth(0.5):
        expected = net(_standardised(pixels))

    kw = dict(inputs=INPUTS, normalize_in_graph=normalized, name="teammate_a")
    pt2 = export(net, 0.5, tmp_path / "m.pt2", "pt2", (1, 20, 20), **kw)
    extra = {METADATA_FILE: ""}
    program = torch.export.load(pt2, extra_files=extra).module()
    _check_metadata(json.loads(extra[METADATA_FILE]), normalized)
    torch.testing.assert_close(program(fed), expected, rtol=1e-5, atol=1e-5)

    onnx = export(net, 0.5, tmp_path / "m.onnx", "onnx", (1, 20, 20), **kw)
    _check_metadata(_onnx_metadata(onnx), normalized)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (y,) = session.run(["logits"], {"image": fed.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy format: torch.jit is deprecated
def test_state_dict_and_torchscript_carry_metadata(tmp_path):
    net = _trained_like()
    saved = torch.load(export(net, 0.5, tmp_path / "m.pt", "state_dict", (1, 20, 20), inputs=INPUTS, name="teammate_a"))
    _check_metadata(saved["metadata"], normalized=False)
    with pytest.raises(ValueError, match="--normalize-in-graph does not apply to --format state_dict"):
        export(net, 0.5, tmp_path / "n.pt", "state_dict", (1, 20, 20), inputs=INPUTS, normalize_in_graph=True)
    with pytest.raises(ValueError, match="normalize_in_graph needs the inputs' mean and std"):
        export(net, 0.5, tmp_path / "n.pt2", "pt2", (1, 20, 20), normalize_in_graph=True)
    path = export(
        net,
        0.5,
        tmp_path / "m.ts",
        "torchscript",
        (1, 20, 20),
        inputs=INPUTS,
        normalize_in_graph=True,
        name="teammate_a",
    )
    extra = {METADATA_FILE: ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    _check_metadata(json.loads(extra[METADATA_FILE]), normalized=True)
    pixels = torch.rand(2, 1, 20, 20)
    with torch.no_grad(), net.at_depth(0.5):
        torch.testing.assert_close(module(pixels), net(_standardised(pixels)), rtol=1e-5, atol=1e-5)


def guide_block(marker: str) -> str:
    """The fenced python block of the deploy guide that contains ``marker``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} python blocks of {GUIDE} contain {marker!r}"
    return blocks[0]


def run_guide_block(marker: str, argv: list[str], monkeypatch) -> dict:
    """Exec a guide block as written, as ``python <script> argv...`` where importing dist_coop fails; its globals."""
    code = guide_block(marker)
    assert "dist_coop" not in code
    monkeypatch.setattr(sys, "argv", ["example.py", *argv])
    monkeypatch.setitem(sys.modules, "dist_coop", None)  # an import of dist_coop (or of any part) would fail
    namespace = {"__name__": "__main__"}
    exec(compile(code, str(GUIDE), "exec"), namespace)
    monkeypatch.undo()
    return namespace


def _eval_top1(out: str, net: str, s: float) -> str:
    """The top-1 column of ``dist-coop eval``'s row for (net, s)."""
    for line in out.splitlines():
        cells = line.split()
        if cells[:2] == [net, f"{s:g}"]:
            return cells[5]
    raise AssertionError(f"no row {net} {s} in\n{out}")


@pytest.mark.slow  # trains a tiny run, exports it three times
def test_guide_examples_classify_image_files_like_the_eager_net_and_eval(tmp_path, fmnist_root, capsys, monkeypatch):
    """The ONNX export read by the guide's onnxruntime example from its metadata alone, on the validation images
    as PNG files: logits equal to the eager net's through the project's data pipeline, per-image argmax and
    top-1 equal to ``dist-coop eval``'s; with and without normalisation in the graph. The pt2 example too."""
    from PIL import Image

    from dist_coop.cli import main, run_training
    from dist_coop.data import build_data, fashion_mnist
    from dist_coop.run import load_run
    from tests.helpers import tiny_config

    run_training(tiny_config(tmp_path, "--train.max_steps=8", run_name="r"))
    run = str(tmp_path / "r")
    loaded = load_run(run, nets=["teammate_a"])
    net, cfg = loaded.nets["teammate_a"], loaded.config
    data = build_data(cfg.data, seed=cfg.train.seed)
    with torch.no_grad(), net.at_depth(0.5):
        batches = list(data.val.epoch(0))
        eager = torch.cat([net(x) for x, _ in batches]).numpy()
    labels = torch.cat([y for _, y in batches]).numpy()
    images, _ = fashion_mnist.load_split("test", cfg.data.root)
    files = []
    for i, image in enumerate(images[: len(labels)]):
        files.append(str(tmp_path / f"val_{i:03d}.png"))
        Image.fromarray(image[0].numpy()).save(files[-1])
    clear = np.sort(eager, axis=1)[:, -1] - np.sort(eager, axis=1)[:, -2] > 1e-3  # no near-tie to flip
    assert clear.sum() >= len(labels) - 2
    assert main(["eval", run, "--device", "cpu"]) == 0
    top1 = _eval_top1(capsys.readouterr().out, "teammate_a", 0.5)

    for flag in ("--normalize-in-graph", "--no-normalize-in-graph"):
        model = str(tmp_path / f"m{flag}.onnx")
        assert main(["export", run, "--depth", "0.5", "--format", "onnx", flag, "--out", model]) == 0
        capsys.readouterr()
        logits = run_guide_block("import onnxruntime", [model, *files], monkeypatch)["logits"]
        printed = capsys.readouterr().out.splitlines()
        np.testing.assert_allclose(logits, eager, rtol=1e-4, atol=1e-4)
        assert (logits.argmax(1) == eager.argmax(1))[clear].all()
        names = [fashion_mnist.CLASSES[k] for k in eager.argmax(1)]
        assert [p for p, c, ok in zip(printed, names, clear) if ok] == [
            f"{f}: {c}" for f, c, ok in zip(files, names, clear) if ok
        ]
        assert f"{100.0 * (logits.argmax(1) == labels).mean():.2f}" == top1

    assert main(["export", run, "--depth", "0.5", "--out", str(tmp_path / "m.pt2")]) == 0  # pt2, in the graph
    capsys.readouterr()
    first = int(np.flatnonzero(clear)[0])
    run_guide_block("torch.export.load", [str(tmp_path / "m.pt2"), files[first]], monkeypatch)
    assert capsys.readouterr().out == f"{files[first]}: {fashion_mnist.CLASSES[eager[first].argmax()]}\n"
