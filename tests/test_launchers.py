"""The real entry point under the real launchers (torchrun, deepspeed). A rank killed mid-run: test_run_end.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_coop.ports import free_port
from tests.dist_helpers import TINY

pytestmark = pytest.mark.slow  # every test here starts processes through a launcher

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _config(tmp_path, name, *extra):
    return [*TINY, f"--train.out_dir={tmp_path}", f"--train.run_name={name}", "--train.device=cpu", *extra]


def _results(tmp_path, name):
    return json.loads((tmp_path / name / "results.json").read_text())


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd, timeout=300, **env):
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_plain_python_is_world_of_one(tmp_path, fmnist_root):
    _run(
        [sys.executable, "launch/train.py", *_config(tmp_path, "one", "--train.max_steps=4", "--dist.engine=deepspeed")]
    )
    r = _results(tmp_path, "one")
    assert r["placement"] == "colocated" and r["step"] == 4


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_split_under_launcher(tmp_path, fmnist_root, launcher):
    """Under torchrun every process (agent and ranks) runs with deprecation warnings as errors: the
    distributed path with DeepSpeed ZeRO-1 is clean apart from DeepSpeed's own (``DEEPSPEED_DEPRECATIONS``).
    The deepspeed launcher is DeepSpeed's program, whose import warns by itself: no such check there."""
    port = str(free_port())
    env = {}
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "3", "--master_port", port]
        env["PYTHONWARNINGS"] = "error::DeprecationWarning,error::FutureWarning"
    else:
        if shutil.which("deepspeed", path=str(BIN)) is None:
            pytest.skip("deepspeed launcher not installed")
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "3", "--master_port", port]
    extra = ["--train.max_steps=6", "--dist.placement=split", "--dist.engine=deepspeed", "--dist.zero_stage=1"]
    _run([*cmd, "launch/train.py", *_config(tmp_path, launcher, *extra)], **env)
    r = _results(tmp_path, launcher)
    assert r["placement"] == "split" and r["step"] == 6
    assert {"val/acc1/leader@1.0", "val/acc1/teammate_b@0.25", "val/acc1/leader@0.25"} <= set(r["metrics"])
    assert r["costs"]["cost/gflops/teammate_a@0.25"] < r["costs"]["cost/gflops/teammate_a@1.0"]


def test_colocated_two_ranks_full_job_matches_one_process_evaluation(tmp_path, fmnist_root):
    """The whole job on 2 ranks (train, recalibrate, evaluate sharded, gather): same final metrics as
    evaluating the saved nets in one process, so the shards covered the validation set exactly once."""
    from dist_coop.cli import evaluate_checkpoint

    extra = ["--train.max_steps=4", "--dist.placement=colocated"]
    _run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "launch/train.py",
            *_config(tmp_path, "colo", *extra),
        ]
    )
    r = _results(tmp_path, "colo")
    assert r["placement"] == "colocated" and r["step"] == 4
    table = evaluate_checkpoint(tmp_path / "colo", "cpu")
    rows = [line.replace(" * ", " ").split() for line in table.splitlines() if line.startswith(("teammate", "leader"))]
    assert len(rows) == 9  # 3 nets x 3 depths
    for net, s, *_, top1, top5, loss in rows:
        key = f"{net}@{float(s)}"
        # every net and depth, top-1, top-5 and loss, equal to the table's rounding (2 and 3 decimals). Each
        # replica gathers BN statistics on its own shard; they are averaged before evaluating, else the two
        # ranks measure two models, neither of them the saved one (teammate_a@1's loss was 8.69 against 8.89)
        assert float(top1) == pytest.approx(r["metrics"][f"val/acc1/{key}"], abs=0.005 + 1e-9), key
        assert float(top5) == pytest.approx(r["metrics"][f"val/acc5/{key}"], abs=0.005 + 1e-9), key
        assert float(loss) == pytest.approx(r["metrics"][f"val/loss/{key}"], abs=0.0005 + 1e-6), key
