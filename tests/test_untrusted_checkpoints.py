"""DeepSpeed checkpoints from a source one does not trust: every file DeepSpeed reads loads weights-only.

Real one-process DeepSpeed runs (ZeRO-1 and ZeRO-3, the real ``dist-coop train``) write checkpoints; a copy gets
one file replaced by the same state plus an object whose unpickling runs code (it would write a marker file).
Resuming from it and ``dist-coop eval`` of it (ZeRO-3: DeepSpeed's own ``zero_to_fp32`` reader) stop with one
line naming the file, and the marker is never written; the untampered checkpoints still resume and evaluate.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from dist_coop.cli import main
from dist_coop.distributed.safe_load import load_weights_only, weights_only_loads
from tests.dist_helpers import start_workers
from tests.helpers import TINY

NET = "leader"  # the net whose files are tampered with
REFUSED = "it names exec, which a weights-only load refuses (is the file from a source you trust?)"


class Payload:
    """Unpickled, it runs code: writes ``marker`` (what an attacker's checkpoint would do with more harm)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _argv(out_dir: Path, zero: int, *extra: str) -> list[str]:
    return [
        "train",
        *TINY,
        "--dist.engine=deepspeed",
        f"--dist.zero_stage={zero}",
        "--train.device=cpu",
        "--train.threads=1",
        f"--train.out_dir={out_dir}",
        "--train.run_name=r",
        *extra,
    ]


def _cli_worker(rank: int, jobs: list[tuple[list[str], str]]) -> None:
    """``dist-coop train`` as a plain ``python`` process (a world of one), its output in a log ending with the
    exit code."""
    argv, log_path = jobs[rank]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        code = main(argv)
        print(f"exit code {code}", flush=True)


def _train_all(jobs: list[tuple[list[str], Path]]) -> list[list[str]]:
    """Each job in a process of its own, all at once; the lines of each job's log."""
    start_workers(_cli_worker, ([(argv, str(log)) for argv, log in jobs],), len(jobs))
    return [log.read_text().strip().splitlines() for _, log in jobs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_root) -> dict[int, Path]:
    """Two steps of the tiny config at ZeRO-1 and at ZeRO-3: the run folders."""
    root = tmp_path_factory.mktemp("deepspeed_runs")
    jobs = [(_argv(root / f"zero{z}", z, "--train.max_steps=2"), root / f"train{z}.log") for z in (1, 3)]
    for lines in _train_all(jobs):
        assert lines[-1] == "exit code 0", "\n".join(lines[-30:])
    return {z: root / f"zero{z}" / "r" for z in (1, 3)}


def _tampered_copy(run: Path, dest: Path, kind: str, marker: Path) -> Path:
    """A copy of ``run`` whose ``NET`` file ``*<kind>.pt`` holds its state plus a ``Payload``; that file."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    (path,) = (dest / "checkpoints").glob(f"step_*/{NET}/step_*/*{kind}.pt")
    state = torch.load(path, weights_only=False)  # the real file, written by the run above
    state["payload"] = Payload(marker)
    torch.save(state, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])
def test_a_tampered_deepspeed_checkpoint_is_refused_on_resume(runs, tmp_path, zero):
    """``--train.resume=auto`` from a checkpoint whose model states (or, a second run, optimizer states) carry
    a payload: exit code 2, one line naming the file, the payload never ran."""
    jobs, files, markers = [], [], []
    for kind in ("model_states", "optim_states"):
        marker = tmp_path / f"ran_{kind}"
        files.append(_tampered_copy(runs[zero], tmp_path / kind / "r", kind, marker))
        markers.append(marker)
        jobs.append((_argv(tmp_path / kind, zero, "--train.max_steps=3", "--train.resume=auto"), tmp_path / kind))
    logs = _train_all([(argv, folder.with_suffix(".log")) for argv, folder in jobs])
    for lines, path, marker in zip(logs, files, markers):
        assert lines[-2:] == [
            f"dist-coop: error: cannot load checkpoint {path}: it names exec, which a weights-only load refuses "
            "(is the file from a source you trust?)",
            "exit code 2",
        ], lines[-20:]
        assert not marker.exists()


@pytest.mark.slow
def test_a_tampered_deepspeed_checkpoint_is_refused_by_eval(runs, tmp_path, capsys):
    """``dist-coop eval``: ZeRO-1 model states, and ZeRO-3's model or optimizer states (the latter read by
    DeepSpeed's ``zero_to_fp32``, which gathers the partitioned weights)."""
    for zero, kind in ((1, "model_states"), (3, "model_states"), (3, "optim_states")):
        marker = tmp_path / f"ran_{zero}_{kind}"
        run = tmp_path / f"{zero}_{kind}"
        path = _tampered_copy(runs[zero], run, kind, marker)
        assert main(["eval", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (
            f"dist-coop: error: cannot load checkpoint {path}: it names exec, which a weights-only load refuses "
            "(is the file from a source you trust?)"
        ), (zero, kind, err[-5:])
        assert not marker.exists(), (zero, kind)


@pytest.mark.slow
def test_untampered_deepspeed_checkpoints_evaluate(runs, capsys):
    for run in runs.values():
        assert main(["eval", str(run)]) == 0
        assert "teammate_b" in capsys.readouterr().out


@pytest.mark.slow
def test_untampered_deepspeed_checkpoints_resume(runs, tmp_path):
    for zero, run in runs.items():
        shutil.copytree(run, tmp_path / f"zero{zero}" / "r", ignore=shutil.ignore_patterns(".lock"))
    jobs = [
        (_argv(tmp_path / f"zero{z}", z, "--train.max_steps=3", "--train.resume=auto"), tmp_path / f"{z}.log")
        for z in runs
    ]
    for lines in _train_all(jobs):
        assert lines[-1] == "exit code 0", "\n".join(lines[-30:])
        assert any("resumed from" in line and "at step 2" in line for line in lines), lines[-30:]
    for zero in runs:
        assert (tmp_path / f"zero{zero}" / "r" / "checkpoints" / "step_00000003").is_dir()


def test_weights_only_loads_refuses_a_raw_pickle_and_restores_torch_load(tmp_path):
    """A plain pickle (not torch's zip format) with a payload, loaded as DeepSpeed would (``weights_only=False``)
    inside the block: refused in one line; ``torch.load`` is torch's own again afterwards."""
    marker, path = tmp_path / "ran", tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"w": 1.0, "payload": Payload(marker)}, protocol=2))
    original = torch.load
    with pytest.raises(ValueError) as refused, weights_only_loads():
        torch.load(path, weights_only=False)
    assert str(refused.value) == f"cannot load checkpoint {path}: {REFUSED}"
    assert torch.load is original and not marker.exists()
    with pytest.raises(ValueError, match=re.escape(f"cannot load checkpoint {path}: {REFUSED}")):
        load_weights_only(path)
    torch.save({"w": torch.ones(2), "step": 3}, path)
    with weights_only_loads():
        assert torch.load(path, weights_only=False)["step"] == 3
    assert not marker.exists()
