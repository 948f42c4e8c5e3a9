"""The trainer on the real bundled data: steps, checkpoints, resume, the end-to-end run."""

import json

import pytest
import torch

from dist_coop.checkpoint import TRAINER_STATE, latest_checkpoint, load_checkpoint, save_checkpoint
from dist_coop.cli import evaluate_checkpoint, run_training
from dist_coop.data import build_data, fashion_mnist
from dist_coop.run import load_run
from dist_coop.trainer import Trainer, resolve_amp
from tests.helpers import RecordingTracker, tiny_config


class Crash(Exception):
    pass


def losses(recorder):
    return {
        step: {k: v for k, v in m.items() if k.startswith("train/loss/")}
        for step, m in recorder.metrics.items()
        if any(k.startswith("train/loss/") for k in m)
    }


def test_resumed_run_equals_uninterrupted_run(tmp_path, fmnist_root, recorder):
    """Crash after step 11, resume from the step-10 checkpoint: steps 11..16 match exactly."""
    cfg = tiny_config(tmp_path / "a")
    data = build_data(cfg.data, seed=cfg.train.seed)
    full = Trainer(cfg, data, run_dir=tmp_path / "a", tracker=recorder)
    full.train()
    assert full.step == 16  # 2 epochs of 8 steps
    reference = losses(recorder)

    cfg_b = tiny_config(tmp_path / "b", "--train.checkpoint_every=5")
    crashed = Trainer(cfg_b, data, run_dir=tmp_path / "b", tracker=RecordingTracker())
    step = crashed.train_step

    def crash_after_step_11(x, y, logs=True):
        if crashed.step == 11:
            raise Crash("the process dies during step 12")
        return step(x, y, logs=logs)

    crashed.train_step = crash_after_step_11
    with pytest.raises(Crash):
        crashed.train()  # checkpoints at 5, 8 (epoch end) and 10
    latest = latest_checkpoint(tmp_path / "b")
    assert latest.name == "step_00000010" and load_checkpoint(latest / TRAINER_STATE)["step"] == 10
    assert sorted(p.name for p in latest.parent.glob("step_*")) == [
        "step_00000008",
        "step_00000010",
    ]  # epoch end + step 10; older pruned
    second = RecordingTracker()
    resumed = Trainer(cfg_b, data, run_dir=tmp_path / "b", tracker=second)
    resumed.resume(latest)
    assert resumed.step == 10
    resumed.train()
    got = losses(second)
    assert sorted(got) == list(range(11, 17))
    for step in got:
        assert got[step] == reference[step], step  # bit-identical on CPU
    for name, net in full.nets.items():
        for (k, a), b in zip(net.state_dict().items(), resumed.nets[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)


def test_one_step_updates_every_net_and_terms_sum(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path)
    data = build_data(cfg.data, seed=0)
    trainer = Trainer(cfg, data, run_dir=tmp_path)
    before = {n: [p.clone() for p in net.parameters()] for n, net in trainer.nets.items()}
    x, y = next(data.train.epoch(0))
    logs = trainer.train_step(x, y)
    for name in ("leader", "teammate_a", "teammate_b"):
        parts = sum(v for k, v in logs.items() if k.startswith(f"train/{name}/"))
        assert parts == pytest.approx(logs[f"train/loss/{name}"], rel=1e-5)
        assert any(not torch.equal(a, b) for a, b in zip(before[name], trainer.nets[name].parameters()))
    # teammates start from different seeds
    a, b = trainer.nets["teammate_a"], trainer.nets["teammate_b"]
    assert not torch.equal(next(a.parameters()), next(b.parameters()))


def test_amp_resolution():
    assert resolve_amp("none", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_amp("auto", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))


def test_bf16_step_runs_on_cpu(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path, "--optim.amp=bf16", "--optim.grad_clip=1.0")
    data = build_data(cfg.data, seed=0)
    trainer = Trainer(cfg, data, run_dir=tmp_path)
    x, y = next(data.train.epoch(0))
    logs = trainer.train_step(x, y)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(2), "step": 3, "nested": {"x": [1, 2.5, "s"]}}, path)
    assert load_checkpoint(path)["step"] == 3
    assert not list(tmp_path.glob(".*tmp"))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="cannot load checkpoint") as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value) and "which a weights-only load refuses" in str(refused.value)


@pytest.mark.slow
def test_end_to_end_run_with_mlflow(tmp_path, fmnist_root):
    """The real job: train, evaluate every net at every depth, MLflow run with params/metrics/artifacts."""
    import mlflow

    cfg = tiny_config(
        tmp_path,
        "--tracking.backend=mlflow",
        "--data.train_subset=640",
        "--train.recalibrate_bn=256",
        "--train.eval_train=true",
    )
    results = run_training(cfg)
    m = results["metrics"]
    for net in ("leader", "teammate_a", "teammate_b"):
        for s in (0.25, 0.5, 1.0):
            assert 0.0 <= m[f"val/acc1/{net}@{s}"] <= 100.0
            assert results["costs"][f"cost/gflops/{net}@{s}"] > 0
    # learning happened: well above chance (10 %) after 40 steps on real data
    assert m["val/acc1/teammate_a@1.0"] > 20.0
    run_dir = tmp_path / "t"
    for name in ("config.yaml", "results.txt", "results.json", "accuracy_vs_gflops.png"):
        assert (run_dir / name).is_file(), name
    assert (latest_checkpoint(run_dir) / "teammate_a.pt").is_file()
    assert json.loads((run_dir / "results.json").read_text())["step"] == 40
    first_txt = (run_dir / "results.txt").read_text()  # (the resumed run below writes its own)
    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "dist_coop"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["coop.alpha"] == "1.0"
    assert "val/acc1/teammate_a/depth_0.25" in run.data.metrics
    assert "cost/gflops/leader/depth_1.0" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "val/acc1/teammate_b/depth_0.5")
    assert len(history) >= 2  # one per epoch (+ the final one)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "accuracy_vs_gflops.png", "results.txt", "checkpoint.txt"} <= artifacts
    assert "step_00000040" not in artifacts  # the checkpoint is referenced (tracking.log_checkpoint), not copied
    # resume=auto with a finished run continues the same MLflow run and trains no more
    again = run_training(
        tiny_config(tmp_path, "--tracking.backend=mlflow", "--data.train_subset=640", "--train.resume=auto")
    )
    assert again["step"] == 40
    assert len(client.search_runs([exp.experiment_id])) == 1
    table = evaluate_checkpoint(run_dir, "cpu")
    assert "teammate_a" in table and "0.25" in table
    # --split train: the 640 training samples without augmentation, by hand for one (net, depth)
    train_table = evaluate_checkpoint(run_dir, "cpu", split="train")
    assert train_table.splitlines()[-1].startswith("on the training samples")
    run = load_run(run_dir)
    images, labels = fashion_mnist.load_split("train", run.config.data.root)
    with torch.no_grad(), run.nets["teammate_a"].at_depth(0.5):
        x = (images[:640].float() / 255.0 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
        hand = 100.0 * (run.nets["teammate_a"](x).argmax(1) == labels[:640]).float().mean().item()
    (row,) = [r.split() for r in train_table.splitlines() if r.split()[:2] == ["teammate_a", "0.5"]]
    assert float(row[5]) == pytest.approx(hand, abs=0.006)  # the table rounds to 2 decimals
    # train.eval_train: the run itself recorded the same training-set accuracy, and printed the table too
    assert m["train_eval/acc1/teammate_a@0.5"] == pytest.approx(hand, abs=1e-3)
    assert len([k for k in m if k.startswith("train_eval/acc1/")]) == 9  # 3 nets x the tiny config's 3 depths
    assert first_txt.count("top-1 %") == 2 and train_table.splitlines()[-1] in first_txt
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate_checkpoint(run_dir, "cpu", split="test")


def test_results_table_keeps_its_columns_apart_for_large_nets():
    """The ResNet-18 recipe's nets have 11,272,460 parameters: the params column widens so it never runs
    into GFLOPs (it printed ``4.443511,272,460``); small nets keep the 10-wide layout the README shows."""
    from dist_coop.coop.task import NetSpec
    from dist_coop.evaluate import results_table

    def table(params: int) -> list[str]:
        spec = NetSpec("teammate_a", False, (0.5, 1.0), trained_depths=(0.5, 1.0))
        costs, metrics = {}, {}
        for s, p in ((0.5, params // 2), (1.0, params)):
            m = spec.metric(s)
            costs.update({f"cost/blocks/{m}": 8 * s, f"cost/gflops/{m}": 4.4435 * s, f"cost/params/{m}": p})
            metrics.update({f"val/acc1/{m}": 10.0, f"val/acc5/{m}": 30.0, f"val/loss/{m}": 5.0})
        return results_table([spec], metrics, costs).splitlines()

    big = table(11_272_460)
    assert big[0].split() == ["net", "s", "blocks", "GFLOPs", "params", "top-1", "%", "top-5", "%", "loss"]
    assert big[3].split() == ["teammate_a", "1", "8", "4.4435", "11,272,460", "10.00", "30.00", "5.000"]
    small = table(17_500)
    assert small[0] == "net                s  blocks    GFLOPs    params  top-1 %  top-5 %     loss"  # the README's
    assert small[3].split()[4] == "17,500" and len(small[3]) == len(small[0])
