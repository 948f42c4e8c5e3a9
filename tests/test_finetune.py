"""Training from trained weights (model.init) with a frozen Leader (coop.leader_mode: frozen): the real Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_coop.checkpoint import latest_checkpoint, load_checkpoint
from dist_coop.cli import main, run_training
from dist_coop.data import build_data
from dist_coop.distributed.env import DistInfo
from dist_coop.models.registry import build_backbone, build_model
from dist_coop.ports import free_port
from dist_coop.pretrained import load_init
from dist_coop.run import load_run
from dist_coop.trainer import Trainer
from tests.dist_helpers import spawn
from tests.helpers import load_benchmark, tiny_config
from tests.test_convert import trained_like

FROZEN = ["--coop.leader_mode=frozen"]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def build_backbone_net():
    return build_model("resnet20", (0.25, 0.5, 1.0), width=4, in_channels=1)


def plain_file(tmp_path) -> str:
    """A plain ResNet-20 (the tiny config's backbone), its BNs as training leaves them, saved as a state dict."""
    torch.manual_seed(3)
    net = trained_like(build_backbone("resnet20", width=4, in_channels=1, head_norm=True)[0])
    path = tmp_path / "plain.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def test_frozen_leader_stays_bit_identical_and_still_guides(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path, f"--model.init={plain_file(tmp_path)}", *FROZEN)
    data = build_data(cfg.data, seed=0)
    trainer = Trainer(cfg, data, run_dir=tmp_path / "run")
    leader = trainer.nets["leader"]
    before = {k: v.clone() for k, v in leader.state_dict().items()}
    teammate = [p.clone() for p in trainer.nets["teammate_a"].parameters()]
    for step, (x, y) in enumerate(data.train.epoch(0)):
        if step == 3:
            break
        logs = trainer.train_step(x, y)
    after = leader.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen Leader changed"
    assert not leader.training and not any(p.requires_grad for p in leader.parameters())
    assert logs["train/teammate_a/kd_leader@1.0"] > 0 and logs["train/teammate_b/kd_leader@1.0"] > 0
    assert not [k for k in logs if k.startswith("train/leader/")], "the frozen Leader has loss terms"
    assert any(not torch.equal(a, b) for a, b in zip(teammate, trainer.nets["teammate_a"].parameters()))
    folder = trainer.save()
    saved = load_checkpoint(folder / "leader.pt")
    assert "optimizer" not in saved and "scheduler" not in saved
    run = load_run(folder)
    assert sorted(run.nets) == ["leader", "teammate_a", "teammate_b"]
    assert all(torch.equal(before[k], v) for k, v in run.nets["leader"].state_dict().items())


def test_frozen_leader_needs_trained_weights(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path, *FROZEN)
    with pytest.raises(ValueError, match="coop.leader_mode: frozen needs a trained Leader: set model.init_leader"):
        Trainer(cfg, build_data(cfg.data, seed=0), run_dir=tmp_path / "run")


def test_frozen_leader_under_deepspeed_split_is_refused_on_every_rank(tmp_path, fmnist_root):
    """DeepSpeed saves collectively over every rank: a frozen Leader's ranks would leave the others waiting. Each
    rank refuses before any collective (here rank 2 of 3, a Teammate's rank, with no process group needed)."""
    cfg = tiny_config(tmp_path, f"--model.init={plain_file(tmp_path)}", *FROZEN, "--dist.engine=deepspeed")
    with pytest.raises(ValueError, match="frozen with dist.engine: deepspeed needs dist.placement: colocated"):
        Trainer(cfg, build_data(cfg.data, seed=0), run_dir=tmp_path / "run", dist=DistInfo(rank=2, world_size=3))


@pytest.mark.slow
def test_frozen_leader_on_its_own_rank(tmp_path):
    """Split placement, 3 ranks: the Leader's rank runs forwards only, its soft targets reach the Teammates."""
    init = plain_file(tmp_path)
    ranks = spawn(3, tmp_path / "split", ["--dist.placement=split", f"--model.init={init}", *FROZEN], num_steps=3)
    (leader_rank,) = [r for r in ranks if r["nets"] == ["leader"]]
    source = torch.load(init, weights_only=True)
    assert torch.equal(
        leader_rank["params"]["leader"][: source["conv1.weight"].numel()], source["conv1.weight"].reshape(-1)
    )
    assert all(step["train/loss/leader"] == 0.0 for step in leader_rank["losses"])
    for r in ranks:
        if r is not leader_rank:
            assert all(v > 0 for step in r["losses"] for v in step.values())


@pytest.mark.slow
def test_finetune_from_a_plain_run_starts_where_it_ended(tmp_path, fmnist_root):
    """Train a plain net (the full-only rung), then the cooperative run from it with a frozen Leader: before its
    first step every net's full-depth accuracy is the plain net's (the conversion is exact); the run finishes."""
    plain_overrides = ["--coop.teammates=1", "--coop.leader=false", "--coop.beta=0", "--coop.sub_nets=false"]
    learns = ["--optim.name=adamw", "--optim.lr=0.003"]  # above chance within the tiny run's 16 steps
    plain_cfg = tiny_config(tmp_path, *plain_overrides, *learns, run_name="plain")
    run_training(plain_cfg)
    data = build_data(plain_cfg.data, seed=0)
    plain = Trainer(plain_cfg, data, run_dir=tmp_path / "plain")
    plain.resume(latest_checkpoint(tmp_path / "plain"))
    ended = plain.evaluate("all")
    assert ended["val/acc1/teammate_a@1.0"] > 15  # trained: above chance (10 classes); its gates moved off 1

    cfg = tiny_config(tmp_path, f"--model.init={tmp_path / 'plain'}", *FROZEN, "--train.max_steps=3", run_name="ft")
    start = Trainer(cfg, data, run_dir=tmp_path / "ft").evaluate("all")
    for metric in ("acc1", "loss"):
        plain_value = ended[f"val/{metric}/teammate_a@1.0"]
        for net in ("leader", "teammate_a", "teammate_b"):
            assert start[f"val/{metric}/{net}@1.0"] == pytest.approx(plain_value, rel=1e-6), (metric, net)
    with pytest.raises(ValueError, match="has no net 'nope'; it holds \\['teammate_a'\\]: name one as"):
        load_init(build_backbone_net(), f"{tmp_path / 'plain'}#nope", "teammate_a")
    results = run_training(cfg)
    assert results
    assert sorted(load_run(tmp_path / "ft").nets) == ["leader", "teammate_a", "teammate_b"]


@pytest.mark.slow  # a plain run, then a launcher and 2 ranks
def test_tiny_imagenet_plain_then_finetune_on_two_ranks(tmp_path):
    """The full path on Tiny ImageNet-format data (mechanics, not accuracy): the generator's folder written as shards,
    the plain resnet18_64 recipe on one process, then the fine-tuning recipe under torchrun on 2 ranks (DeepSpeed
    ZeRO-2, colocated) started from it: both ranks read the plain run, the frozen Leader is the plain net (same
    logits at full depth), and the run ends with its checkpoint and results."""
    root = load_benchmark("make_tiny_imagenet").make(tmp_path, classes=4, per_class=16, val=16, workers=1)
    shards = tmp_path / "shards"
    args = ["shards", "--source", "tiny_imagenet", "--root", str(root), "--out", str(shards), "--max-count", "8"]
    assert main([*args, "--workers", "1"]) == 0
    small = ["--model.num_classes=4", "--model.width=8", f"--data.shards={shards}", "--data.batch_size=8",
             "--data.eval_batch_size=8", "--data.workers=1", "--optim.warmup_steps=1", "--train.epochs=1",
             "--train.max_steps=3", "--train.device=cpu", "--train.threads=1", "--tracking.backend=none",
             "--train.progress=false", f"--train.out_dir={tmp_path / 'runs'}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    plain = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "configs/tinyimagenet/resnet18_plain.yaml", *small],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-3000:]
    plain_dir = tmp_path / "runs" / "resnet18_plain"
    assert (plain_dir / "results.json").is_file()
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/train.py"]
    ft = subprocess.run(
        [*torchrun, "--config", "configs/finetune/tinyimagenet_resnet18.yaml", *small, f"--model.init={plain_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ft.returncode == 0, ft.stdout[-2000:] + ft.stderr[-3000:]
    assert "placement: colocated on 2 ranks" in ft.stdout
    read = [line for line in ft.stdout.splitlines() if line.startswith("model.init:")]
    assert read and all("resnet18_plain/checkpoints/step_00000003 net teammate_a (step 3)" in r for r in read)
    ft_dir = tmp_path / "runs" / "tinyimagenet_resnet18"
    assert (ft_dir / "results.json").is_file() and json.loads((ft_dir / "results.json").read_text())["step"] == 3
    source, tuned = load_run(plain_dir), load_run(ft_dir)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        leader, before = tuned.nets["leader"].eval(), source.nets["teammate_a"].eval()
        assert torch.allclose(leader(x), before(x), rtol=1e-5, atol=1e-5)  # the frozen Leader is the plain net
        assert not torch.allclose(tuned.nets["teammate_a"].eval()(x), before(x))  # the Teammate learned
