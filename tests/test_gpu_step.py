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


def _run(tmp_path, name, *extra):
    """Two steps: float32 rounding differs between the layouts and kernels, and the tiny nets amplify a
    difference ~100x per step, so the second update is where a real difference shows above the rounding.
    At the full LR for every net (lr_scale none): with the Teammates at lr / 3 one of Teammate A's BN
    parameters lands 2.5e-4 apart after two steps while every loss agrees to 1e-7 (the same amplification)."""
    torch.manual_seed(0)
    return run_steps(tiny_config(tmp_path / name, "--train.seed=2", "--optim.lr_scale=none", *extra), DistInfo(), 2)


def _assert_same_steps(got, ref, rtol):
    for a, b in zip(got["losses"], ref["losses"]):
        assert a == pytest.approx(b, rel=rtol)
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=rtol, atol=rtol / 10)


def test_compiled_blocks_take_the_same_steps(tmp_path):
    """Every residual block compiled (aot_eager: dynamo's capture and AOT autograd, no code generation), two
    cooperative steps: losses and parameters as in eager mode, and dynamo really captured graphs."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _run(tmp_path, "eager")
    compiled = _run(tmp_path, "compiled", "--train.compile=aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert not torch._dynamo.utils.counters["recompile_limit"], "a block fell back to eager"
    _assert_same_steps(compiled, eager, 1e-4)
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
    plain = _run(tmp_path, "plain")
    cl = _run(tmp_path, "cl", "--train.channels_last=true")
    _assert_same_steps(cl, plain, 1e-4)


def test_gpu_step_settings_are_checked():
    with pytest.raises(ValueError, match="train.compile"):
        load_config(None, ["--train.compile=fast"])
    with pytest.raises(ValueError, match="train.compile with DeepSpeed ZeRO-3"):
        load_config(None, ["--train.compile=default", "--dist.engine=deepspeed", "--dist.zero_stage=3"])
