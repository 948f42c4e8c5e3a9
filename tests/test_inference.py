"""Cost profile, budget -> depth, and the run-time controller."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from dist_coop.infer.budget import choose_depth, latency_warning
from dist_coop.infer.controller import AdaptiveRunner, DepthController
from dist_coop.infer.profile import DepthProfile, Profile, profile_net
from dist_coop.models import build_model


def _profile():
    rows = [
        DepthProfile(0.25, 3, 0.005, 20_000, {1: 1.0, 64: 20.0}, 71.0),
        DepthProfile(0.5, 9, 0.016, 69_000, {1: 2.5, 64: 55.0}, 73.9),
        DepthProfile(0.75, 12, 0.021, 93_000, {1: 3.2, 64: 70.0}, 73.8),  # less accurate than 0.5
        DepthProfile(1.0, 15, 0.026, 117_000, {1: 4.0, 64: 90.0}, 74.0),
    ]
    return Profile("cpu", (1, 28, 28), tuple(rows))


def test_profile_of_a_real_net_falls_with_depth(tmp_path):
    net = build_model("resnet32", [0.25, 0.5, 0.75, 1.0], width=4, in_channels=1)
    p = profile_net(net, (1, 28, 28), batch_sizes=(1, 8), repeats=3, warmup=1, accuracy={0.25: 50.0})
    flops = [d.gflops for d in p.depths]
    assert flops == sorted(flops) and len(set(flops)) == 4
    assert [d.blocks for d in p.depths] == [3, 9, 12, 15]
    assert all(d.latency_ms[1] > 0 and d.latency_ms[8] > 0 for d in p.depths)
    assert p.depths[0].accuracy == 50.0 and p.depths[1].accuracy is None
    again = Profile.from_json(p.save(tmp_path / "p.json").read_text())
    assert again == p
    assert "ms@b8" in p.table()


def test_profile_in_onnxruntime_and_pt2_records_runtime_and_threads(tmp_path, monkeypatch):
    """``runtime="onnxruntime"`` times a real onnxruntime session per depth, with the threads asked for; pt2 times
    each depth's torch.export program; the JSON keeps both, and a profile from before they were kept still loads."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    sessions = []

    class Recorded(ort.InferenceSession):
        def __init__(self, model, sess_options=None, providers=None, **kw):
            super().__init__(model, sess_options=sess_options, providers=providers, **kw)
            sessions.append((sess_options.intra_op_num_threads, self.get_providers()))

    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    threads = torch.get_num_threads()
    net = build_model("resnet20", [0.25, 1.0], width=4, in_channels=1)
    p = profile_net(net, (1, 28, 28), batch_sizes=(1, 3), repeats=2, warmup=1, runtime="onnxruntime", threads=1)
    assert sessions == [(1, ["CPUExecutionProvider"])] * 2  # one session per depth
    assert all(ms > 0 for d in p.depths for ms in d.latency_ms.values())
    raw = json.loads(p.save(tmp_path / "p.json").read_text())
    assert raw["runtime"] == "onnxruntime" and raw["threads"] == 1
    assert Profile.from_json(json.dumps(raw)) == p and "measured in onnxruntime, 1 thread, cpu" in p.table()
    p2 = profile_net(net, (1, 28, 28), batch_sizes=(2,), repeats=2, warmup=1, runtime="pt2", threads=2)
    assert (p2.runtime, p2.threads) == ("pt2", 2) and all(d.latency_ms[2] > 0 for d in p2.depths)
    assert torch.get_num_threads() == threads  # put back as it was
    del raw["runtime"], raw["threads"]  # written before they were kept
    assert Profile.from_json(json.dumps(raw)).measured_in() == "eager, threads not recorded, cpu"
    with pytest.raises(ValueError, match="--runtime must be one of"):
        profile_net(net, (1, 28, 28), runtime="tflite")
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        profile_net(net, (1, 28, 28), threads=0)


def _profile_file(tmp_path: Path, latencies: list[float]) -> Path:
    """A profile JSON as ``dist-coop profile`` writes it (onnxruntime, 2 threads), batch-1 latencies given."""
    rows = [
        DepthProfile(s, blocks, gflops, 1000 * blocks, {1: ms}, 70.0 + s)
        for (s, blocks, gflops), ms in zip([(0.25, 3, 0.005), (0.5, 9, 0.016), (1.0, 15, 0.026)], latencies)
    ]
    return Profile("cpu", (1, 28, 28), tuple(rows), "onnxruntime", 2).save(tmp_path / "profile.json")


def test_budget_command_names_the_runtime_and_warns_when_latency_does_not_fall_with_depth(tmp_path, capsys):
    from dist_coop.cli import main

    normal = _profile_file(tmp_path, [0.10, 0.20, 0.30])
    assert main(["budget", str(normal), "--max-latency-ms", "0.25"]) == 0
    out, err = capsys.readouterr()
    assert out == (
        "budget -> depth 0.5 (9 blocks, 0.0160 GFLOPs, 9,000 params, top-1 70.50 %; 0.200 ms at batch 1 in "
        "onnxruntime, 2 threads, cpu)\n"
    )
    assert err == "" and latency_warning(Profile.from_json(normal.read_text())) == ""
    for latencies in ([0.30, 0.20, 0.10], [0.10, 0.30, 0.20], [0.20, 0.20, 0.20]):  # falling, a bump, flat
        busy = _profile_file(tmp_path, latencies)
        assert main(["budget", str(busy), "--max-gflops", "1"]) == 0
        out, err = capsys.readouterr()
        assert "in onnxruntime, 2 threads, cpu)" in out
        assert len(err.splitlines()) == 1
        assert err.startswith("dist-coop: warning: latency does not fall with depth at batch 1 in onnxruntime, 2 ")
    assert main(["budget", str(tmp_path), "--max-gflops", "1"]) == 2  # a folder without profile_teammate_a.json
    assert "no profile of teammate_a in" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["budget", str(tmp_path / "bad.json"), "--max-gflops", "1"]) == 2
    assert "is not a profile written by dist-coop profile" in capsys.readouterr().err


def test_budget_picks_the_most_accurate_fitting_depth():
    p = _profile()
    assert choose_depth(p, max_gflops=0.022).s == 0.5  # 0.75 fits too but is less accurate
    assert choose_depth(p, max_gflops=1.0).s == 1.0
    assert choose_depth(p, max_latency_ms=3.0).s == 0.5
    assert choose_depth(p, max_latency_ms=60.0, batch_size=64).s == 0.5
    assert choose_depth(p, max_params=30_000).s == 0.25
    assert choose_depth(p, max_gflops=0.03, max_latency_ms=1.5).s == 0.25
    with pytest.raises(ValueError, match=r"no depth fits.*cheapest, s=0.25, needs 0.0050 GFLOPs"):
        choose_depth(p, max_gflops=0.001)
    with pytest.raises(ValueError, match="no latency at batch 8"):
        choose_depth(p, max_latency_ms=5, batch_size=8)
    with pytest.raises(ValueError, match="give a budget"):
        choose_depth(p)


def test_controller_steps_down_under_load_and_back_up():
    base = {0.25: 1.0, 0.5: 2.5, 0.75: 3.2, 1.0: 4.0}
    ctl = DepthController(base, target_ms=5.0, patience=3)
    assert ctl.depth == 1.0
    depths, met = [], []
    load = [1.0] * 20 + [3.0] * 40 + [1.0] * 40  # another process takes the CPU, then goes
    for factor in load:
        latency = base[ctl.depth] * factor  # the simulated device
        depths.append(ctl.depth)
        met.append(latency <= 5.0)
        ctl.update(latency)
    assert depths[:20] == [1.0] * 20
    assert Counter(depths[25:60])[0.25] >= 33  # under 3x load only the shallowest fits (3 ms; 0.5 would take 7.5)
    assert sum(met[25:60]) >= 34  # and it holds the target (at most one probe of 0.5 misses)
    assert depths[60] == 0.25 and depths[-1] == 1.0  # back up once the load is gone
    assert sum(not m for m in met) <= 4  # the misses: the calls it takes to notice, and a probe


def test_controller_probes_up_when_the_model_is_too_pessimistic():
    """Shallow depths slowed more than deep ones (fixed per-call costs): the ratio model alone would
    stay shallow; probing finds that the deeper depth fits and stays there."""
    base = {0.25: 1.0, 0.5: 2.0, 1.0: 3.0}
    actual = {0.25: 2.0, 0.5: 2.6, 1.0: 3.6}  # 2x, 1.3x, 1.2x the profile
    ctl = DepthController(base, target_ms=4.0, probe_every=10)
    ctl.depth = 0.25
    for _ in range(80):
        ctl.update(actual[ctl.depth])
    assert ctl.depth == 1.0


def test_controller_hysteresis_prevents_oscillation():
    base = {0.5: 2.0, 1.0: 4.0}
    ctl = DepthController(base, target_ms=4.2, patience=2, hysteresis=0.1, probe_every=1000)
    switches, prev = 0, ctl.depth
    for _ in range(50):  # 1.0 fits, but not with a 10 % margin: it must settle, not flip
        ctl.update(base[ctl.depth] * 1.02)
        switches += ctl.depth != prev
        prev = ctl.depth
    assert switches <= 1


def test_runner_switches_depth_without_rebuilding():
    net = build_model("resnet32", [0.25, 1.0], width=4, in_channels=1)
    ctl = DepthController({0.25: 1.0, 1.0: 1e6}, target_ms=100.0)  # the profile says only 0.25 fits
    runner = AdaptiveRunner(net, ctl)
    params = [id(p) for p in net.parameters()]
    step = runner(torch.randn(1, 1, 28, 28))
    assert step.depth == 0.25 and step.logits.shape == (1, 10) and step.latency_ms > 0
    assert [id(p) for p in net.parameters()] == params
    assert net.depth == 1.0  # the depth is a scope of the call: the net is left as it was
    with pytest.raises(RuntimeError):  # a forward that fails (3 channels for a 1-channel net)...
        runner(torch.randn(1, 3, 28, 28))
    assert net.depth == 1.0  # ...does not leave the net shallow
    with pytest.raises(ValueError, match="target_ms must be > 0"):
        DepthController({1.0: 1.0}, target_ms=0)


@pytest.mark.slow  # the export checks launch the command in fresh interpreters
def test_profile_export_stream_commands_on_a_trained_run(tmp_path, fmnist_root, capsys):
    """The CLI on a real (tiny) trained run: profile + budget, export, and stream a clip made with ffmpeg."""
    from dist_coop.cli import main, run_training
    from dist_coop.config import load_config
    from tests.helpers import TINY
    from tests.media import make_clip

    run_training(load_config(None, [*TINY, f"--train.out_dir={tmp_path}", "--train.run_name=r", "--train.max_steps=3"]))
    run = str(tmp_path / "r")
    assert main(["profile", run, "--batch", "4", "--repeats", "3", "--max-gflops", "0.003"]) == 0
    out = capsys.readouterr().out
    profile = Profile.from_json((tmp_path / "r" / "profile_teammate_a.json").read_text())
    fitting = [d for d in profile.depths if d.gflops <= 0.003]
    assert [d.s for d in fitting] == [0.25, 0.5] and all(d.accuracy is not None for d in profile.depths)
    best = max(fitting, key=lambda d: (d.accuracy, d.s))
    assert "ms@b4" in out and f"budget -> depth {best.s} " in out
    assert (profile.runtime, profile.threads) == ("eager", 1) and "in eager, 1 thread, cpu)" in out
    assert main(["profile", run, "--runtime", "onnxruntime", "--threads", "1", "--repeats", "2", "--batch", "2"]) == 0
    saved = json.loads((tmp_path / "r" / "profile_teammate_a.json").read_text())
    assert (saved["runtime"], saved["threads"]) == ("onnxruntime", 1)
    assert all(ms > 0 for d in saved["depths"] for ms in d["latency_ms"].values())
    capsys.readouterr()
    assert main(["budget", run, "--max-gflops", "0.003"]) == 0
    assert "in onnxruntime, 1 thread, cpu)" in capsys.readouterr().out
    assert main(["profile", run, "--repeats", "1", "--max-gflops", "1e-9"]) == 2  # nothing fits: a clear error
    assert "no depth fits the budget" in capsys.readouterr().err
    _export_with_deprecations_as_errors(run, tmp_path)
    with pytest.warns(DeprecationWarning):  # the legacy format still works, and says it is legacy
        assert main(["export", run, "--depth", "0.25", "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 0
    assert "torchscript is legacy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "torchscript: legacy, torch.jit is deprecated" in " ".join(capsys.readouterr().out.split())
    clip = make_clip(tmp_path / "clip.mp4", size="64x48")
    assert (
        main(["stream", str(clip), "--run", run, "--target-ms", "1000", "--no-pace", "--plot", str(tmp_path / "s.png")])
        == 0
    )
    out = capsys.readouterr().out
    assert "frame    19" in out and "20 frames, target 1000 ms: 100.0 % met; mean depth 1.000" in out
    assert (tmp_path / "s.png").stat().st_size > 1000


def _export_with_deprecations_as_errors(run: str, tmp_path: Path) -> None:
    """The real CLI in a fresh interpreter, deprecation and future warnings as errors: the default format (pt2)
    and ONNX, each (normalisation in the graph, by default) on pixels in [0, 1] equal to the adaptive net at that
    depth on the normalised pixels, at batch 1 and 5."""
    from dist_coop.data import fashion_mnist
    from dist_coop.run import load_run

    flags = ["-W", "error::DeprecationWarning", "-W", "error::FutureWarning"]
    cli = [sys.executable, *flags, "-m", "dist_coop.cli", "export", run, "--depth", "0.5"]
    for out, extra in (("m.pt2", []), ("m.onnx", ["--format", "onnx"])):
        done = subprocess.run([*cli, *extra, "--out", str(tmp_path / out)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr, done.stderr
        assert f"written as {'onnx' if extra else 'pt2'} to" in done.stdout
    net = load_run(run).nets["teammate_a"]
    program = torch.export.load(tmp_path / "m.pt2").module()
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.rand(batch, 1, 28, 28)  # pixels / 255
        with torch.no_grad(), net.at_depth(0.5):
            expected = net((x - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0])
        torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), expected, rtol=1e-4, atol=1e-4
        )
