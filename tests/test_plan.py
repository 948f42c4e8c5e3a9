"""What a launch decides and checks before its first step (dist_coop/plan.py, dist_coop/precision.py, placement).

* precision: ``optim.amp: auto`` is one decision for both engines (the torch engine's autocast and the DeepSpeed
  config), printed at start by rank 0 and logged as ``launch.precision``;
* ``dist-coop plan`` on the canonical Tiny ImageNet recipe for 1 node x {1, 2, 3, 4, 6, 8} and 4 x 8, on Tiny
  ImageNet-format data made by ``benchmarks/make_tiny_imagenet.py`` at a tenth of the real size and written with
  ``dist-coop shards`` at a tenth of the recipe's ``--max-count`` (so the same 200 training and 20 val shards);
* the checks ``train`` makes before its first step, one line each; and a real 3-rank run whose evaluation would
  fail after its first epoch (2 val shards for a net group of 3 ranks) refused before its first step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_coop.cli import main, run_training
from dist_coop.config import DistConfig, OptimConfig, load_config
from dist_coop.coop.task import build_task
from dist_coop.distributed.engine import deepspeed_config
from dist_coop.footprint import net_bytes
from dist_coop.plan import preflight
from dist_coop.ports import free_port
from dist_coop.precision import precision_line, resolve_precision
from dist_coop.trainer import resolve_amp
from tests.helpers import TINY, load_benchmark, tiny_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tinyimagenet" / "resnet34_ctf.yaml"
BIN = Path(sys.executable).parent


def _gpu(monkeypatch, bf16: bool) -> None:
    """This process sees a CUDA GPU with (or without) native bf16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


# ---------------------------------------------------------------- precision


def test_auto_is_one_precision_for_both_engines(monkeypatch):
    """auto: bf16 on a GPU with bf16, fp16 (loss-scaled) on one without, fp32 on a CPU; the DeepSpeed config and the
    torch engine's autocast both follow it."""
    optim, ds = OptimConfig(amp="auto"), DistConfig(engine="deepspeed", zero_stage=2)

    def enabled(device: str) -> tuple[bool, bool]:
        cfg = deepspeed_config(optim, ds, micro_batch=8, dp_size=2, device=device)
        return cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]

    assert resolve_precision("auto", "cpu") == "fp32" and enabled("cpu") == (False, False)
    assert resolve_amp("auto", torch.device("cpu")) is None
    _gpu(monkeypatch, True)
    assert resolve_precision("auto", "cuda:0") == "bf16" and enabled("cuda:0") == (True, False)
    assert resolve_amp("auto", torch.device("cuda:0")) is torch.bfloat16
    assert precision_line("auto", "cuda:0") == "precision: bf16 (optim.amp auto, cuda:0 supports bf16)"
    _gpu(monkeypatch, False)
    assert resolve_precision("auto", "cuda:0") == "fp16" and enabled("cuda:0") == (False, True)
    assert resolve_amp("auto", torch.device("cuda:0")) is torch.float16
    assert precision_line("auto", "cuda:0") == "precision: fp16 with loss scaling (optim.amp auto, cuda:0 has no bf16)"
    assert precision_line("auto", "cpu") == "precision: fp32 (optim.amp auto on cpu)"
    assert precision_line("bf16", "cpu") == "precision: bf16 (optim.amp bf16)"
    with pytest.raises(ValueError, match=r"^optim\.amp: fp16 needs a CUDA device"):
        deepspeed_config(OptimConfig(amp="fp16"), ds, micro_batch=8, dp_size=1, device="cpu")


def test_training_states_layout_and_precision_and_logs_the_precision(tmp_path, fmnist_root, capsys):
    """Rank 0 prints the placement (with each net's global batch) and the precision before training, and the
    precision is the MLflow param launch.precision."""
    import mlflow

    run_training(tiny_config(tmp_path, "--optim.amp=auto", "--tracking.backend=mlflow", "--train.max_steps=1"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "placement: colocated on 1 rank (auto: one process holds every net): rank 0 holds leader, teammate_a, "
        "teammate_b; each net's global batch 1 x 32 = 32",
        "precision: fp32 (optim.amp auto on cpu)",
    ]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dist_coop").experiment_id])
    assert run.data.params["launch.precision"] == "fp32"
    assert run.data.params["launch.world"] == "1 rank colocated"


# ---------------------------------------------------------------- dist-coop plan on the canonical recipe


@pytest.fixture(scope="module")
def tin_shards(tmp_path_factory) -> dict[str, Path]:
    """Tiny ImageNet's layout at a tenth of its size (200 classes x 50 training images, 1000 val images), written
    as the recipe says at a tenth of its --max-count (50: 200 training, 20 val shards) and at a tenth of 5000 (500:
    20 training, 2 val shards: too few for a net group of more than 2 ranks)."""
    base = tmp_path_factory.mktemp("tin")
    root = load_benchmark("make_tiny_imagenet").make(base, classes=200, per_class=50, val=1000, workers=2)
    out = {}
    for name, count in (("recipe", "50"), ("coarse", "500")):
        out[name] = base / name
        args = ["shards", "--source", "tiny_imagenet", "--root", str(root), "--out", str(out[name])]
        assert main([*args, "--max-count", count, "--workers", "2"]) == 0
    return out


def _plan(capsys, shards: Path, out_dir: Path, nnodes: int, nproc: int, *extra: str) -> tuple[int, str, str]:
    args = ["plan", "--config", str(RECIPE), "--nnodes", str(nnodes), "--nproc-per-node", str(nproc)]
    capsys.readouterr()
    rc = main([*args, f"--data.shards={shards}", f"--train.out_dir={out_dir}", *extra])
    done = capsys.readouterr()
    return rc, done.out, done.err


# nproc on 1 node -> the placement line's head, global batch, steps per epoch, train / val shards needed, and the
# checkpoint: MB per checkpoint, what rank 0 of a net's group writes of it (ZeRO-2 splits master copy and momentum)
MATRIX = {
    1: ("colocated on 1 rank (auto: one process holds every net)", 128, 78, 4, 1, "642.5", "ZeRO-2 on one rank"),
    2: (
        "colocated on 2 ranks (auto: 2 is not a multiple of the 3 nets; split needs 3)",
        256,
        39,
        8,
        2,
        "643.4",
        "2 partitions, rank 0 writes 128.6 MB",
    ),
    3: ("split on 3 ranks (auto: 3 = 3 nets x 1 rank)", 128, 78, 4, 1, "642.5", "ZeRO-2 on one rank"),
    4: (
        "colocated on 4 ranks (auto: 4 is not a multiple of the 3 nets; split needs 3 or 6)",
        512,
        19,
        16,
        4,
        "645.3",
        "4 partitions, rank 0 writes 85.8 MB",
    ),
    6: (
        "split on 6 ranks (auto: 6 = 3 nets x 2 ranks)",
        256,
        39,
        8,
        2,
        "643.4",
        "2 partitions, rank 0 writes 128.6 MB",
    ),
    8: (
        "colocated on 8 ranks (auto: 8 is not a multiple of the 3 nets; split needs 6 or 9)",
        1024,
        9,
        32,
        8,
        "649.0",
        "8 partitions, rank 0 writes 64.4 MB",
    ),
}
LAYOUTS = [(1, n) for n in MATRIX] + [(4, 8)]


@pytest.mark.parametrize("nnodes,nproc", LAYOUTS, ids=[f"{m}x{n}" for m, n in LAYOUTS])
def test_plan_of_the_canonical_recipe(tin_shards, tmp_path, capsys, nnodes, nproc):
    """Each layout of the matrix: a plan with its numbers, or the one-line refusal."""
    rc, out, err = _plan(capsys, tin_shards["recipe"], tmp_path, nnodes, nproc)
    if nnodes == 4:  # colocated on 32 ranks: 20 val shards for a net group of 32
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(
            f"dist-coop: error: val: 20 shard(s) in {tin_shards['recipe']}, but evaluation reads each on one rank of a "
            "net's group of 32 ranks (colocated on 32 ranks), so the first evaluation would fail; write at least 32 "
            "val shards (dist-coop shards --max-count 31 or less), or use net groups of at most 20 ranks"
        ), err
        return
    head, batch, steps, train_needed, val_needed, megabytes, rank0 = MATRIX[nproc]
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    ranks = batch // 128  # the data-parallel ranks of a net: the data shards
    assert lines[0] == f"world: 1 node(s) x {nproc} process(es) = {nproc} rank(s), device cuda"
    assert lines[1].startswith(f"placement: {head}: ")
    assert lines[1].endswith(f"each net's global batch {ranks} x 128 = {batch}")
    assert lines[2].startswith("precision: bf16 (optim.amp auto")
    assert f"micro-batch 128 per rank, global batch {batch} per net ({ranks} x 128)" in out
    assert f"steps: {steps} per epoch (10000 training samples // {ranks} data shard(s) // 128) x 100 epochs" in out
    assert f"train 200 present, {train_needed} needed ({ranks} data shard(s) x 4 loader worker(s))" in out
    assert f"val 20 present, {val_needed} needed (evaluation over a net's group of {val_needed} rank(s))" in out
    assert "optim.lr_scale blocks_sqrt: leader 0.1; teammate_a, teammate_b 0.05-0.1" in out
    # ResNet-34 (21,380,628 parameters) under DeepSpeed ZeRO-2 in bf16: bf16 weights, fp32 master copy, SGD momentum
    assert f"checkpoints: {tmp_path / 'resnet34_ctf' / 'checkpoints'}/step_N/" in out
    assert f"at each epoch's end; {megabytes} MB each, 2 kept" in out
    parts = "bf16 weights 42.8 MB + fp32 master copy 85.5 MB + SGD momentum 85.5 MB + BN statistics 0.3 MB"
    assert f"  leader, teammate_a, teammate_b {float(megabytes) / 3:.1f} MB each: {parts}" in out and rank0 in out
    if nproc == 3:
        assert "leader on rank 0, teammate_a on rank 1, teammate_b on rank 2" in lines[1]


def test_plan_refuses_what_train_refuses(tin_shards, tmp_path, capsys):
    """20 training and 2 val shards on 8 GPUs, and other launches that cannot work, each refused in one line."""
    coarse = tin_shards["coarse"]
    rc, _, err = _plan(capsys, coarse, tmp_path, 1, 8)
    assert rc == 2 and err == (
        f"dist-coop: error: train: 20 shard(s) in {coarse} for 8 data shard(s) x 4 loader worker(s) (data.workers): "
        "each reads its own shards; write at least 32 training shards (dist-coop shards --max-count 312 or less) or "
        "data.workers: 2\n"
    )
    rc, _, err = _plan(capsys, coarse, tmp_path, 1, 4, "--data.workers=1")
    assert rc == 2 and err.startswith(f"dist-coop: error: val: 2 shard(s) in {coarse}, but evaluation reads each on ")
    assert "group of 4 ranks (colocated on 4 ranks)" in err and "(dist-coop shards --max-count 250 or less)" in err
    rc, out, _ = _plan(capsys, coarse, tmp_path, 1, 6)  # split, 2 ranks per net: 2 val shards are enough
    assert rc == 0 and "val 2 present, 2 needed" in out
    rc, _, err = _plan(capsys, tin_shards["recipe"], tmp_path, 1, 8, "--dist.placement=split")
    assert rc == 2 and "got 8: use 6 or 9 ranks, or dist.placement: colocated" in err and err.count("\n") == 1
    rc, _, err = _plan(capsys, tin_shards["recipe"], tmp_path, 1, 1, "--optim.amp=fp16", "--device", "cpu")
    assert rc == 2 and err.startswith("dist-coop: error: optim.amp: fp16 needs a CUDA device")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, _, err = _plan(capsys, tin_shards["recipe"], blocker / "runs", 1, 3)
    assert rc == 2 and err == (
        f"dist-coop: error: train.out_dir: {blocker / 'runs'} cannot be created, {blocker} is a file; give a folder\n"
    )
    uri = f"--tracking.uri=sqlite:///{blocker}/mlflow.db"
    rc, _, err = _plan(capsys, tin_shards["recipe"], tmp_path, 1, 3, uri)
    assert rc == 2 and err.startswith(f"dist-coop: error: tracking.uri: {blocker} cannot be created, ")
    rc, _, err = _plan(capsys, tin_shards["recipe"], tmp_path, 1, 3, "--model.num_classes=100")
    assert rc == 2 and "model.in_channels/num_classes are 3/100 but the data in" in err


def test_mixed_image_sizes_are_refused_before_the_first_step(tmp_path):
    from PIL import Image

    root = load_benchmark("make_tiny_imagenet").make(tmp_path, classes=2, per_class=4, val=4, workers=1)
    first = next((root / "train").glob("*/images/*.JPEG"))
    Image.new("RGB", (48, 48)).save(first, format="JPEG")
    assert main(["shards", "--source", "tiny_imagenet", "--root", str(root), "--out", str(tmp_path / "s")]) == 0
    cfg = load_config(RECIPE, [f"--data.shards={tmp_path / 's'}", "--data.image_size=0", "--model.num_classes=2"])
    with pytest.raises(ValueError, match=r"images of 2 sizes .*; set data\.image_size"):
        preflight(cfg, world_size=1, device="cpu")


# ---------------------------------------------------------------- checkpoint sizes against real checkpoints


@pytest.mark.parametrize("engine", [[], ["--dist.engine=deepspeed", "--dist.zero_stage=2"]], ids=["torch", "zero2"])
def test_checkpoint_size_matches_what_a_run_writes(tmp_path, fmnist_root, engine):
    cfg = tiny_config(tmp_path, "--train.max_steps=1", "--train.device=cpu", *engine)
    run_training(cfg)
    (step,) = (tmp_path / "t" / "checkpoints").glob("step_*")
    for spec in build_task(cfg.coop).specs:
        files = [step / f"{spec.name}.pt"] if not engine else list((step / spec.name / step.name).iterdir())
        written = sum(f.stat().st_size for f in files)
        with torch.device("meta"):
            net = spec.build(cfg.model, cfg.coop.scaling_factors)
        estimate = net_bytes(
            spec.name,
            net,
            optimizer="sgd",
            momentum=0.9,
            engine=cfg.dist.engine,
            zero_stage=cfg.dist.zero_stage,
            precision="fp32",
            group_size=1,
        )
        assert estimate.total == pytest.approx(written, rel=0.05), (spec.name, files)


# ---------------------------------------------------------------- refused before the first step, on real ranks


def _small_tin(tmp_path: Path) -> Path:
    """4 classes x 24 training images in 12 shards, 16 val images in 2 shards."""
    root = load_benchmark("make_tiny_imagenet").make(tmp_path, classes=4, per_class=24, val=16, workers=1)
    shards = tmp_path / "shards"
    args = ["shards", "--source", "tiny_imagenet", "--root", str(root), "--out", str(shards), "--max-count", "8"]
    assert main([*args, "--workers", "1"]) == 0
    return shards


def _small_tin_overrides(shards: Path, out_dir: Path) -> list[str]:
    return [
        *TINY,
        "--model.in_channels=3",
        "--model.num_classes=4",
        "--data.train_subset=0",
        "--data.val_subset=0",
        f"--data.shards={shards}",
        "--data.batch_size=8",
        "--train.epochs=1",
        "--train.device=cpu",
        "--train.threads=1",
        f"--train.out_dir={out_dir}",
        "--train.run_name=few_val_shards",
    ]


def test_too_few_val_shards_for_a_net_group_is_refused(tmp_path):
    shards = _small_tin(tmp_path)
    cfg = load_config(None, [*_small_tin_overrides(shards, tmp_path), "--dist.placement=colocated"])
    assert preflight(cfg, world_size=2, device="cpu").eval_group == 2
    with pytest.raises(ValueError, match=r"^val: 2 shard\(s\) in .* group of 3 ranks \(colocated on 3 ranks\), so the"):
        preflight(cfg, world_size=3, device="cpu")


@pytest.mark.slow  # starts a launcher and 3 ranks
def test_three_ranks_are_refused_before_their_first_step(tmp_path):
    """3 ranks colocated, 2 val shards: without the check the run trains its epoch and fails at the evaluation; every
    rank stops before its first step with the one line, and no run folder is made."""
    shards = _small_tin(tmp_path)
    overrides = [*_small_tin_overrides(shards, tmp_path / "runs"), "--dist.placement=colocated"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "3", "--master_port", str(free_port()), "launch/train.py"]
    proc = subprocess.run(
        [*cmd, *overrides], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "dist-coop: error:" in line]
    assert len(errors) == 3, proc.stderr[-3000:]
    for line in errors:
        assert line.endswith(
            "dist-coop: error: val: 2 shard(s) in "
            f"{shards}, but evaluation reads each on one rank of a net's group of 3 ranks (colocated on 3 ranks), so "
            "the first evaluation would fail; write at least 3 val shards (dist-coop shards --max-count 5 or less), "
            "or use net groups of at most 2 ranks (colocated on up to 2 ranks, or split on a multiple of 3 up to 6)"
        ), line
    assert "epoch 1" not in proc.stdout and not (tmp_path / "runs" / "few_val_shards").exists()
