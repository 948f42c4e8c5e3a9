"""Tracking: MLflow artifacts under train.out_dir whatever the working folder, final
metrics logged once, a resume that changes settings says so, and DeepSpeed saves of a split run agree on
their tag on every rank (no "not consistent" warning)."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from dist_coop.checkpoint import TRAINER_STATE, latest_checkpoint
from dist_coop.cli import run_training
from dist_coop.data import build_data
from dist_coop.distributed.env import close_distributed, init_distributed
from dist_coop.ports import free_port
from dist_coop.track.mlflow_tracker import is_database_uri, mlflow_key, resume_changes, settings_before_resume
from dist_coop.trainer import Trainer
from tests.dist_helpers import rank_env, start_workers
from tests.helpers import RANKS, tiny_config

ROOT = Path(__file__).resolve().parents[1]
NETS = ("leader", "teammate_a", "teammate_b")
MLFLOW = ["--tracking.backend=mlflow", "--train.resume=auto", "--data.train_subset=128", "--train.threads=1"]


def _client_and_run(out_dir: Path, name: str = "t"):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out_dir.resolve() / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "dist_coop"]
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    return client, client.get_run(run.info.run_id)


def _artifact_tree(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifact_tree(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def _guide_artifacts() -> list[str]:
    """The artifact names the tracking guide lists (backticked, after 'The artifacts:', up to the first comma
    that follows the last name)."""
    text = (ROOT / "docs" / "guide" / "tracking.md").read_text()
    m = re.search(r"The artifacts: (.*?`checkpoint\.txt`)", text, re.S)
    assert m, "docs/guide/tracking.md: the artifact list was not found"
    return re.findall(r"`([^`]+)`", m.group(1))


def _final_history(client, run, results) -> dict[str, list]:
    """Per final metric (results.json's metrics and costs), its logged values at the final step."""
    step = results["step"]
    out = {}
    for key in [*results["metrics"], *results["costs"]]:
        out[key] = [h for h in client.get_metric_history(run.info.run_id, mlflow_key(key)) if h.step == step]
    return out


def test_artifacts_under_out_dir_not_cwd_and_final_metrics_logged_once(tmp_path, fmnist_root, monkeypatch):
    cwd, out = tmp_path / "started_here", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    results = run_training(tiny_config(out, *MLFLOW))  # 2 epochs of 4 steps
    assert list(cwd.iterdir()) == []  # no ./mlruns (nor anything else) where the command was started

    client, run = _client_and_run(out)
    store = out / "mlartifacts"
    assert run.info.artifact_uri.startswith(store.resolve().as_uri())
    logged = _artifact_tree(client, run.info.run_id)
    # the final checkpoint by reference (tracking.log_checkpoint: reference): its path, not its files
    assert logged == {"config.yaml", "results.txt", "results.json", "accuracy_vs_gflops.png", "checkpoint.txt"}
    on_disk = {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}
    assert on_disk == {f"{run.info.run_id}/artifacts/{p}" for p in logged}
    # the tracking guide lists what is logged
    listed = _guide_artifacts()
    assert {a for a in listed if "/" not in a} == logged

    for key, values in _final_history(client, run, results).items():
        assert len(values) == 1, (key, values)
        want = results["metrics"].get(key, results["costs"].get(key))
        assert values[0].value == pytest.approx(want, rel=1e-6), key
    # per epoch: the first epoch's evaluation plus the final one
    trained = client.get_metric_history(run.info.run_id, mlflow_key("val/acc1/teammate_a@0.5"))
    assert sorted(h.step for h in trained) == [4, 8]


def test_recalibrated_final_metrics_are_logged_once(tmp_path, fmnist_root):
    """With train.recalibrate_bn every depth is evaluated again at the end: those values, not the last epoch's."""
    results = run_training(tiny_config(tmp_path, *MLFLOW, "--train.epochs=1", "--train.recalibrate_bn=64"))
    client, run = _client_and_run(tmp_path)
    for key, values in _final_history(client, run, results).items():
        assert len(values) == 1, (key, values)
        assert values[0].value == pytest.approx(results["metrics"].get(key, results["costs"].get(key)), rel=1e-6)


def test_resume_with_changed_settings_records_each_change(tmp_path, fmnist_root):
    """epochs 1 -> 2 -> 3 over three launches of one run: the params keep the first launch's values, the tags
    say what each resume changed, from what to what; the metrics continue to the new end."""
    first = run_training(tiny_config(tmp_path, *MLFLOW, "--train.epochs=1"))
    second = run_training(tiny_config(tmp_path, *MLFLOW, "--train.epochs=2"))
    third = run_training(tiny_config(tmp_path, *MLFLOW, "--train.epochs=3", "--optim.lr=0.05"))
    assert (first["step"], second["step"], third["step"]) == (4, 8, 12)

    client, run = _client_and_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.params["optim.lr"] == "0.1"
    resume_tags = {k: v for k, v in run.data.tags.items() if k == "resumes" or k.startswith("resume/")}
    assert resume_tags == {
        "resumes": "2",
        "resume/1/train.epochs": "1 -> 2",
        "resume/2/train.epochs": "2 -> 3",
        "resume/2/optim.lr": "0.1 -> 0.05",
    }
    history = client.get_metric_history(run.info.run_id, mlflow_key("val/acc1/leader@1.0"))
    assert sorted(h.step for h in history) == [4, 8, 12]  # one value per end of epoch, the last by finish


def test_resume_changes_show_empty_values_and_chain():
    params = {"train.resume": "", "train.epochs": "1", "optim.lr": "0.1"}
    first = resume_changes(params, {"train.resume": "auto", "train.epochs": "1", "optim.lr": "0.1"}, 1)
    assert first == {"resume/1/train.resume": '"" -> auto'}
    tags = {"resumes": "1", **first}
    before = settings_before_resume(params, tags, 2)
    assert before == {"train.resume": "auto", "train.epochs": "1", "optim.lr": "0.1"}
    assert resume_changes(before, {"train.resume": "", "train.epochs": "2", "optim.lr": "0.1"}, 2) == {
        "resume/2/train.resume": 'auto -> ""',
        "resume/2/train.epochs": "1 -> 2",
    }


def test_only_database_stores_get_an_artifact_dir():
    """A database store keeps no files (MLflow would fall back to ./mlruns); file stores and servers do."""
    for uri in ("sqlite:////tmp/x/mlflow.db", "postgresql+psycopg2://u@h/db", "mysql://u@h/db"):
        assert is_database_uri(uri), uri
    for uri in ("http://127.0.0.1:5000", "https://host", "file:///tmp/mlruns", "/tmp/mlruns", "databricks"):
        assert not is_database_uri(uri), uri


# ---------------------------------------------------------------- DeepSpeed saves of a split run


def save_and_resume_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of a split DeepSpeed run: a step, a save, then a fresh Trainer resumes from it. Its stdout
    and stderr (DeepSpeed's logger included) go to ``rank<r>.log``."""
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ.update(rank_env(rank, world_size, port))
    extra = ["--dist.placement=split", "--dist.engine=deepspeed", "--dist.zero_stage=1", "--train.device=cpu"]
    cfg = tiny_config(out_dir, *RANKS, *extra)
    info = init_distributed("cpu", backend="gloo", need_group=True)
    try:
        torch.set_num_threads(1)
        data = build_data(cfg.data, seed=cfg.train.seed, device=info.device)
        run_dir = Path(out_dir) / "t"
        trainer = Trainer(cfg, data, run_dir=run_dir, dist=info)
        for step, (x, y) in enumerate(trainer.train_data.epoch(0)):
            trainer.train_step(x, y, logs=False)
            trainer.save()  # two saves: every save is checked
            if step == 1:
                break
        folder = latest_checkpoint(run_dir)
        resumed = Trainer(cfg, data, run_dir=run_dir, dist=info)
        resumed.resume(folder)
        # a checkpoint of the earlier layout (the net's folder as DeepSpeed's tag) still loads
        old_layout = Path(out_dir) / "old_layout"
        if rank == 0:
            old_layout.mkdir()
            shutil.copy2(folder / TRAINER_STATE, old_layout / TRAINER_STATE)
        torch.distributed.barrier()
        for name in trainer.engines:
            shutil.copytree(folder / name / folder.name, old_layout / name)
        torch.distributed.barrier()
        old = Trainer(cfg, data, run_dir=run_dir, dist=info)
        old.resume(old_layout)
        record = {
            f"{which}/{n}": [torch.equal(a, b) for a, b in zip(m.parameters(), other.nets[n].parameters())]
            for which, other in (("resumed", resumed), ("old_layout", old))
            for n, m in trainer.nets.items()
        }
        torch.save({"equal": record, "step": resumed.step}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        close_distributed(info)
        print(f"rank {rank} done", flush=True)
        log.close()


@pytest.mark.slow
def test_split_deepspeed_saves_agree_on_the_tag_and_resume(tmp_path, fmnist_root):
    start_workers(save_and_resume_worker, (3, free_port(), str(tmp_path)), 3)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(3)]
    for rank, text in enumerate(logs):
        assert f"rank {rank} done" in text  # the log is the rank's real output
        assert "not consistent across all ranks" not in text, text[-3000:]
    folder = latest_checkpoint(tmp_path / "t")
    assert folder.name == "step_00000002"
    for net in NETS:  # each net in its own folder, under the tag every rank shares: the step
        assert (folder / net / folder.name / "mp_rank_00_model_states.pt").is_file(), net
    for rank in range(3):
        record = torch.load(tmp_path / f"rank{rank}.pt")
        assert record["step"] == 2
        assert len(record["equal"]) == 2  # one net per rank, resumed from each layout
        for key, flags in record["equal"].items():
            assert flags and all(flags), (rank, key)
