"""A run's folder read back (dist_coop/run.py): ``load_run`` gives the trained nets at every depth and what
their inputs look like, for both engines' checkpoints; ``dist-coop profile``, ``export`` and ``stream`` work
on a run folder without building a trainer, an optimizer or a dataset."""

import os
from pathlib import Path

import pytest
import torch

from dist_coop.checkpoint import TRAINER_STATE, checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from dist_coop.cli import main
from dist_coop.data import Data, build_data, fashion_mnist
from dist_coop.distributed.env import close_distributed, init_distributed
from dist_coop.ports import free_port
from dist_coop.run import load_run
from dist_coop.trainer import Trainer
from tests.dist_helpers import rank_env, start_workers
from tests.helpers import RANKS, tiny_config
from tests.media import make_clip

NETS = ("leader", "teammate_a", "teammate_b")
X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _outputs(net_at, names, depths=(0.25, 0.5, 1.0)) -> dict[str, torch.Tensor]:
    """``{"<net>@<s>": logits of X}`` in eval mode; ``net_at(name)`` is something with ``at_depth`` and a call."""
    out = {}
    with torch.no_grad():
        for name in names:
            net = net_at(name)
            for s in depths:
                with net.at_depth(s):
                    out[f"{name}@{s}"] = net(X).float()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist_root):
    """Three steps of the tiny config and a checkpoint: (run folder, the trainer)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(out, "--train.max_steps=3")
    trainer = Trainer(cfg, build_data(cfg.data, seed=0), run_dir=out / "t")
    for x, y in trainer.train_data.epoch(0):
        trainer.train_step(x, y, logs=False)
        if trainer.step == 3:
            break
    trainer.save()
    for net in trainer.nets.values():
        net.eval()
    return out / "t", trainer


def test_load_run_gives_the_trained_nets_at_every_depth_and_their_inputs(trained, tmp_path):
    run_dir, trainer = trained
    rng = torch.get_rng_state()
    run = load_run(run_dir)
    assert torch.equal(torch.get_rng_state(), rng)  # building the nets left the global RNG alone
    assert run.folder == run_dir and run.checkpoint == latest_checkpoint(run_dir) == checkpoint_dir(run_dir, 3)
    assert run.step == 3 and run.config == trainer.cfg and [s.name for s in run.specs] == list(NETS)
    assert run.inputs.shape == (1, 28, 28) and run.inputs.classes == fashion_mnist.CLASSES
    assert run.inputs.mean == fashion_mnist.MEAN and run.inputs.std == fashion_mnist.STD
    assert all(not net.training for net in run.nets.values())
    for name in NETS:
        for (key, a), b in zip(trainer.nets[name].state_dict().items(), run.nets[name].state_dict().values()):
            assert torch.equal(a, b), (name, key)
    torch.testing.assert_close(_outputs(run.nets.get, NETS), _outputs(trainer.nets.get, NETS), rtol=0, atol=0)

    one = load_run(run.checkpoint, nets=["teammate_b"])  # a checkpoint folder, one net
    assert list(one.nets) == ["teammate_b"] and len(one.specs) == 3
    with pytest.raises(ValueError, match=r"net 'teammate_c': this checkpoint holds \['leader', 'teammate_a'"):
        load_run(run_dir, nets=["teammate_c"])
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a run directory"):
        load_run(tmp_path)

    # a checkpoint written before trainer.pt kept the inputs: they come from the config's dataset
    old = tmp_path / "old" / "checkpoints" / "step_00000003"
    old.mkdir(parents=True)
    for name in NETS:
        (old / f"{name}.pt").symlink_to(run.checkpoint / f"{name}.pt")
    state = load_checkpoint(run.checkpoint / TRAINER_STATE)
    del state["inputs"]
    save_checkpoint(state, old / TRAINER_STATE)
    assert load_run(old).inputs == run.inputs


def test_profile_export_and_stream_build_no_trainer_optimizer_or_dataset(trained, tmp_path, monkeypatch, capsys):
    """The three commands, in this process, with every way to build a trainer, an optimizer or a dataset
    made to fail."""
    run_dir, _ = trained
    clip = make_clip(tmp_path / "clip.mp4", size="64x48", seconds=1)

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"an inference command built {what}")

        return fail

    monkeypatch.setattr(Trainer, "__init__", refuse("a Trainer"))
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse("an optimizer"))
    monkeypatch.setattr(Data, "__init__", refuse("a dataset"))
    monkeypatch.setattr(fashion_mnist, "load_split", refuse("a dataset"))
    with pytest.raises(AssertionError, match="built an optimizer"):  # the traps work
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    assert main(["profile", str(run_dir), "--batch", "2", "--repeats", "1"]) == 0
    assert (run_dir / "profile_teammate_a.json").is_file()
    assert main(["export", str(run_dir), "--depth", "0.5", "--net", "leader", "--out", str(tmp_path / "m.pt2")]) == 0
    assert (tmp_path / "m.pt2").is_file()
    assert main(["stream", str(clip), "--run", str(run_dir), "--target-ms", "1000", "--no-pace", "--quiet"]) == 0
    assert "10 frames, target 1000 ms" in capsys.readouterr().out


# ---------------------------------------------------------------- DeepSpeed checkpoints


def deepspeed_worker(rank: int, port: int, out_dir: str, zero: int) -> None:
    """A one-process DeepSpeed run: two steps, a save, and the nets' eval outputs at every depth."""
    os.environ.update(rank_env(0, 1, port))
    torch.set_num_threads(1)
    extra = ["--dist.engine=deepspeed", f"--dist.zero_stage={zero}", "--train.device=cpu"]
    cfg = tiny_config(out_dir, *RANKS, *extra)
    info = init_distributed("cpu", backend="gloo", need_group=True)
    try:
        trainer = Trainer(cfg, build_data(cfg.data, seed=0), run_dir=Path(out_dir) / "t", dist=info)
        for x, y in trainer.train_data.epoch(0):
            trainer.train_step(x, y, logs=False)
            if trainer.step == 2:
                break
        trainer.save()
        for engine in trainer.engines.values():
            engine.module.eval()
        outputs = _outputs(lambda name: trainer.engines[name], NETS)
        torch.save(outputs, Path(out_dir) / "outputs.pt")
    finally:
        close_distributed(info)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 3])
def test_load_run_reads_deepspeed_checkpoints(tmp_path, fmnist_root, zero):
    """ZeRO-0 keeps the module in DeepSpeed's model states, ZeRO-3 partitions it over the optimizer states:
    both read back as the nets DeepSpeed trained."""
    start_workers(deepspeed_worker, (free_port(), str(tmp_path), zero), 1)
    run = load_run(tmp_path / "t")
    assert run.step == 2 and run.config.dist.engine == "deepspeed"
    assert (run.checkpoint / "leader" / run.checkpoint.name).is_dir()  # DeepSpeed's own files were read
    expected = torch.load(tmp_path / "outputs.pt")
    torch.testing.assert_close(_outputs(run.nets.get, NETS), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_deepspeed_zero3_one_process_run_ends_with_the_gates_read_whole(tmp_path, fmnist_root):
    """ZeRO-3 leaves each rank a partition of every parameter (0 elements of a scalar gate on most ranks,
    and outside a forward even on a world of one): the gate metrics gather them instead of crashing."""
    import subprocess
    import sys

    from tests.helpers import TINY

    env = {**os.environ, **rank_env(0, 1, free_port())}
    argv = [*TINY, "--train.epochs=1", "--dist.engine=deepspeed", "--dist.zero_stage=3", "--train.device=cpu"]
    argv += [f"--train.out_dir={tmp_path}", "--train.run_name=z3", "--train.threads=1", f"--data.root={fmnist_root}"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "launch" / "train.py"), *argv],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "z3" / "results.json").read_text())["metrics"]
    gates = {k: v for k, v in metrics.items() if k.startswith("val/gate/")}
    assert {k.split("/")[2] for k in gates} == {"leader", "teammate_a", "teammate_b"}, sorted(metrics)[:20]
    assert all(0.5 < v < 1.5 for v in gates.values()), gates
