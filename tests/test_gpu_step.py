"""The GPU step's options, checked on CPU: compiled blocks (train.compile) and channels_last take the same steps.

Their speed is a GPU matter and is not measured here (README "Benchmarks"); what a CPU can show is that
they change nothing but the speed: the same losses, parameters and BN statistics as the plain step.
"""

import pytest
import torch

from dist_coop.config import load_config
from dist_coop.distributed.env import DistInfo
from tests.dist_helpers import run_steps
from tests.helpers import tiny_config


def _run(tmp_path, name, *extra, steps: int = 2, dtype: torch.dtype = torch.float32):
    """Two steps by default: the second update is where a real difference shows. At the full LR for every net
    (lr_scale none). ``dtype`` float64 builds the nets, the data and the optimizer state in float64."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        cfg = tiny_config(tmp_path / name, "--train.seed=2", "--optim.lr_scale=none", *extra)
        return run_steps(cfg, DistInfo(), steps)
    finally:
        torch.set_default_dtype(previous)


def _assert_same_steps(got, ref, rtol):
    for a, b in zip(got["losses"], ref["losses"]):
        assert a == pytest.approx(b, rel=rtol)
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=rtol, atol=rtol / 10)


def test_compiled_blocks_take_the_same_steps(tmp_path):
    """Every residual block compiled (aot_eager: dynamo's capture and AOT autograd, no code generation), two
    cooperative steps: losses and parameters as in eager mode, and dynamo really captured graphs.

    In float64. The compiled graph decomposes batch norm and orders its sums otherwise than the eager kernels, so
    the two differ by rounding; float32 rounding (~1e-7) grows ~100x per step through these tiny nets and reaches
    ~1e-4 after two steps on some CPUs' kernels (AVX-512) and not on others. Float64 rounding (~1e-16) grown the
    same way stays below 1e-11, so a tolerance of 1e-8 holds on any CPU while a wrong graph (a block skipped, a
    gate or a BN statistic not applied) moves the parameters by far more than that."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _run(tmp_path, "eager", dtype=torch.float64)
    compiled = _run(tmp_path, "compiled", "--train.compile=aot_eager", dtype=torch.float64)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert not torch._dynamo.utils.counters["recompile_limit"], "a block fell back to eager"
    assert all(p.dtype == torch.float64 for p in eager["params"].values())
    _assert_same_steps(compiled, eager, 1e-8)
    torch._dynamo.reset()


def test_compile_blocks_keeps_the_state_dict_and_bn_statistics():
    from dist_coop.models import build_model

    torch.manual_seed(0)
    eager = build_model("resnet20", (0.5, 1.0), width=4, in_channels=1, num_classes=10)
    compiled = build_model("resnet20", (0.5, 1.0), width=4, in_channels=1, num_classes=10)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks("aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(8, 1, 28, 28)
    for net in (eager, compiled):
        for s in (0.5, 1.0):
            with net.at_depth(s):
                net(x).sum().backward()
    for key, value in eager.state_dict().items():  # per-depth running statistics updated alike
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_channels_last_takes_the_same_steps(tmp_path):
    """One step at width 8 (narrower nets are refused channels_last on CPUs without AVX-512, below).

    The two layouts run different oneDNN kernels: their float32 activations differ by ~1e-5 (10x the plain
    path's rounding), enough to put a few of the ~10^5 pre-activations within 1e-5 of zero on the other side
    of a ReLU. Measured against float64 on one net: 5 such units move the gradient by 0.8 % in L2, while the
    same float64 net in both layouts agrees to 1e-15. So the losses must agree to 1e-5 and each net's update
    (parameters after the step minus before) to 10 % of its norm; a layout error moves it by ~100 %."""
    init = _run(tmp_path, "init", "--model.width=8", steps=0)
    plain = _run(tmp_path, "plain", "--model.width=8", steps=1)
    cl = _run(tmp_path, "cl", "--model.width=8", "--train.channels_last=true", steps=1)
    assert cl["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-5)
    for name, p0 in init["params"].items():
        update = plain["params"][name] - p0
        assert update.norm() > 0.01 * p0.norm()  # a real step
        assert (cl["params"][name] - plain["params"][name]).norm() < 0.1 * update.norm(), name


def test_batches_reach_the_nets_in_the_configured_layout():
    """A batch with channels_last strides (what the batched crop gave before it became a gather; a 1-channel
    one even passes ``is_contiguous()``) reaches the nets in canonical strides (oneDNN otherwise runs the net
    channels_last unasked, where a narrow net's strided 1x1 backward hangs on AVX2 CPUs), copying only when
    needed; the crop's own batches need no copy."""
    from dist_coop.data.augment import random_crop_flip
    from dist_coop.trainer import in_layout

    for c in (1, 3):
        crop = random_crop_flip(torch.randn(4, c, 8, 8), 2, torch.Generator().manual_seed(0))
        assert in_layout(crop, False) is crop  # canonical already
        x = torch.empty_strided(crop.shape, (64 * c, 1, 8 * c, c)).copy_(crop)  # channels_last strides
        assert x.stride() == (64 * c, 1, 8 * c, c)
        plain, cl = in_layout(x, False), in_layout(x, True)
        assert plain.stride() == (64 * c, 64, 8, 1) and torch.equal(plain, x)
        assert cl.stride() == (64 * c, 1, 8 * c, c) and torch.equal(cl, x)
    y = torch.randn(4, 3, 8, 8)
    assert in_layout(y, False) is y
    assert in_layout(torch.randn(4, 10), True).stride() == (10, 1)  # not an image batch: plain


def test_channels_last_is_refused_where_onednn_hangs(monkeypatch):
    from dist_coop.models import build_model
    from dist_coop.trainer import check_cpu_layout

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    narrow = build_model("resnet20", (0.5, 1.0), width=4, in_channels=1, num_classes=10)
    wide = build_model("resnet20", (0.5, 1.0), width=8, in_channels=1, num_classes=10)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(ValueError, match=r"train.channels_last on this CPU \(AVX2.*4 input channels.*model.width >= 8"):
        check_cpu_layout(narrow, cpu)
    check_cpu_layout(wide, cpu)
    check_cpu_layout(narrow, cuda)  # a GPU takes cuDNN's kernels
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    check_cpu_layout(narrow, cpu)


def test_gpu_step_settings_are_checked():
    with pytest.raises(ValueError, match="train.compile"):
        load_config(None, ["--train.compile=fast"])
    with pytest.raises(ValueError, match="train.compile with DeepSpeed ZeRO-3"):
        load_config(None, ["--train.compile=default", "--dist.engine=deepspeed", "--dist.zero_stage=3"])
