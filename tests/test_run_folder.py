"""A run folder holds one run: a rerun never deletes its checkpoints, two runs never share it, and a full disk
loses nothing (the partial checkpoint goes, ``latest`` keeps naming the last good one, resume continues)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_coop.checkpoint import CHECKPOINTS, LATEST, TRAINER_STATE, checkpoints_of, latest_checkpoint, mark_latest
from dist_coop.cli import main
from dist_coop.runlock import LOCK_FILE, RunLock
from tests.helpers import TINY, small_tmpfs

ROOT = Path(__file__).resolve().parents[1]


def _train(out_dir: Path, name: str, *extra: str) -> list[str]:
    return ["train", *TINY, f"--train.out_dir={out_dir}", f"--train.run_name={name}", "--train.device=cpu", *extra]


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / CHECKPOINTS).glob("step_*"))


def _last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------- a rerun never deletes its own checkpoints


def test_rerun_is_refused_and_overwrite_moves_the_earlier_run_aside(tmp_path, fmnist_root, capsys):
    """Run to step 8 (a checkpoint every 2 steps), then the same command fresh with max_steps 4: refused in one
    line, every checkpoint kept; with --train.overwrite=true the earlier run is moved aside whole, the new run
    trains to step 4 and resumes from its own latest."""
    run = tmp_path / "r"
    assert main(_train(tmp_path, "r", "--train.checkpoint_every=2", "--train.max_steps=8")) == 0
    assert _steps(run) == ["step_00000006", "step_00000008"]
    capsys.readouterr()

    assert main(_train(tmp_path, "r", "--train.checkpoint_every=2", "--train.max_steps=4")) == 2
    line = _last_line(capsys)
    assert line == (
        f"dist-coop: error: run folder {run} holds the checkpoints of an earlier run (newest step_00000008); "
        "continue it with --train.resume=auto, give this run another --train.run_name, or pass "
        "--train.overwrite=true to move the earlier run aside"
    )
    assert _steps(run) == ["step_00000006", "step_00000008"]
    assert latest_checkpoint(run).name == "step_00000008" and latest_checkpoint(run).is_dir()

    assert (
        main(_train(tmp_path, "r", "--train.checkpoint_every=2", "--train.max_steps=4", "--train.overwrite=true")) == 0
    )
    out = capsys.readouterr().out
    moved = Path(re.search(r"the earlier run in \S+ was moved to (\S+)", out).group(1))
    assert moved.parent == tmp_path and moved.name.startswith("r.replaced-")
    assert _steps(moved) == ["step_00000006", "step_00000008"] and latest_checkpoint(moved).name == "step_00000008"
    assert (moved / "results.json").is_file()
    assert _steps(run) == ["step_00000002", "step_00000004"] and latest_checkpoint(run).name == "step_00000004"

    assert main(_train(tmp_path, "r", "--train.checkpoint_every=2", "--train.max_steps=6", "--train.resume=auto")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert latest_checkpoint(run).name == "step_00000006"


def test_resume_from_an_earlier_checkpoint_never_writes_over_later_ones(tmp_path, fmnist_root, capsys):
    run = tmp_path / "r"
    assert (
        main(_train(tmp_path, "r", "--train.checkpoint_every=2", "--train.max_steps=6", "--dist.keep_checkpoints=3"))
        == 0
    )
    capsys.readouterr()
    earlier = run / CHECKPOINTS / "step_00000002"
    assert main(_train(tmp_path, "r", "--train.max_steps=6", f"--train.resume={earlier}")) == 2
    assert "which holds later checkpoints (step_00000004, step_00000006) that this run would write over" in _last_line(
        capsys
    )
    assert _steps(run) == ["step_00000002", "step_00000004", "step_00000006"]


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / CHECKPOINTS / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / ("teammate_a.pt")).write_bytes(b"weights")
    if complete:
        (path / TRAINER_STATE).write_bytes(b"state")
    return path


def test_retention_keeps_the_marked_checkpoint_later_ones_and_counts_only_complete_ones(tmp_path):
    """keep 2: the one just marked and one complete checkpoint before it stay; a later checkpoint stays whatever
    its name sorts as; a partial folder (no trainer state) is not counted, and one older than the mark goes."""
    run = tmp_path / "run"
    for step in (2, 4):
        _checkpoint(run, step)
    partial = _checkpoint(run, 6, complete=False)
    later = _checkpoint(run, 10)
    marked = _checkpoint(run, 8)
    mark_latest(marked, keep=2)
    assert _steps(run) == ["step_00000004", "step_00000008", "step_00000010"]
    assert not partial.exists() and later.is_dir()
    assert (run / CHECKPOINTS / LATEST).read_text() == "step_00000008"
    assert [p.name for p in checkpoints_of(run)] == ["step_00000004", "step_00000008", "step_00000010"]

    low = _checkpoint(tmp_path / "other", 4)  # the checkpoint marked is never deleted, however it sorts
    for step in (6, 8):
        _checkpoint(tmp_path / "other", step)
    mark_latest(low, keep=1)
    assert low.is_dir() and _steps(tmp_path / "other") == ["step_00000004", "step_00000006", "step_00000008"]


# ---------------------------------------------------------------- two runs never share a folder

HOLD = """
import sys, time
from dist_coop.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_second_run_in_a_held_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, fmnist_root, capsys):
    """A live process holds the folder's lock: a run there is refused naming host and pid, and writes nothing.
    Once that process is SIGKILLed (its lock file still names it), the next run takes the lock over, warns, and
    trains; it releases the lock when it ends."""
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_train(tmp_path, "r", "--train.max_steps=2")) == 2
        line = _last_line(capsys)
        host, since = re.fullmatch(r".*\(host (\S+), pid \d+, since ([^)]+)\);.*", line).groups()
        assert line == (
            f"dist-coop: error: run folder {run} is in use by another run (host {host}, pid {holder.pid}, since "
            f"{since}); wait for it to end, or give this run another --train.run_name"
        )
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert f'"pid": {holder.pid}' in (run / LOCK_FILE).read_text()
    assert main(_train(tmp_path, "r", "--train.max_steps=2")) == 0
    err = capsys.readouterr().err
    assert f"dist-coop: warning: taking over the lock of {run} left by host " in err
    assert f"pid {holder.pid}" in err and "which is gone" in err
    assert (run / LOCK_FILE).read_text() == ""  # released
    with RunLock(run) as lock:  # free again, and names no one
        assert lock.taken_over == ""


@pytest.mark.slow  # starts processes
def test_two_runs_started_together_in_one_folder(tmp_path, fmnist_root):
    """Two `dist-coop train` processes started at once with the same run folder: one trains, the other is refused
    in one line naming the holder; the folder holds one run's files."""
    cmd = [sys.executable, "-m", "dist_coop.cli", *_train(tmp_path, "same", "--train.max_steps=4")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    refused = next(err for code, _, err in results if code == 2)
    assert "is in use by another run (host " in refused.strip().splitlines()[-1]
    assert latest_checkpoint(tmp_path / "same").name == "step_00000004"


# ---------------------------------------------------------------- a full disk loses nothing


def _checkpoint_bytes(tmp_path: Path) -> int:
    assert main(_train(tmp_path, "size", "--train.max_steps=1")) == 0
    return sum(f.stat().st_size for f in (latest_checkpoint(tmp_path / "size")).rglob("*") if f.is_file())


def test_full_disk_stops_in_one_line_keeps_latest_and_resume_continues(tmp_path, fmnist_root, capsys):
    """train.out_dir on a real tmpfs with room for one checkpoint and a half, a checkpoint every step: the run
    stops at step 2 with one line naming the disk and the step; the partial step_00000002 is removed and latest
    still names step_00000001; after space is freed (the tmpfs grown), --train.resume=auto continues from it."""
    size_kb = _checkpoint_bytes(tmp_path) * 3 // 2 // 1024 + 8
    capsys.readouterr()
    disk = tmp_path / "disk"
    with small_tmpfs(disk, f"{size_kb}k"):
        args = _train(disk, "r", "--train.checkpoint_every=1", "--train.max_steps=3", "--dist.keep_checkpoints=1")
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        size, free = re.search(r"\((\S+) MB, (\S+) MB free\)", err[0]).groups()
        assert err[0] == (
            f"dist-coop: error: no space left on device saving checkpoint step_00000002 at step 2 in {disk / 'r'}"
            f"/checkpoints (the disk at {disk} ({size} MB, {free} MB free)); the partial checkpoint was removed and "
            "step_00000001 stays the latest; free space, then continue with --train.resume=auto"
        )
        assert _steps(disk / "r") == ["step_00000001"]
        assert latest_checkpoint(disk / "r").name == "step_00000001"
        assert not list((disk / "r" / CHECKPOINTS).glob(".*")), "no temporary file left behind"

        subprocess.run(["mount", "-o", f"remount,size={size_kb * 4}k", str(disk)], check=True)
        assert main([*args, "--train.resume=auto"]) == 0
        assert "resumed from" in capsys.readouterr().out
        assert latest_checkpoint(disk / "r").name == "step_00000003"


def test_lock_is_released_when_its_holder_dies(tmp_path):
    """The kernel releases the flock of a SIGKILLed holder (no stale lock needs a human)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    deadline = time.time() + 10
    lock = RunLock(tmp_path).acquire()
    assert time.time() < deadline and f"pid {holder.pid}" in lock.taken_over
    lock.release()


# ---------------------------------------------------------------- what is on disk before latest moves


def durability_worker(rank: int, port: int, out_dir: str, engine: str) -> None:
    """A one-process run of 2 steps with a checkpoint each step, recording every fsync (by path) and every
    rename (by target) in the order they happen, into ``<out_dir>/syncs.json``."""
    import json

    from dist_coop.cli import run_training
    from dist_coop.config import load_config
    from tests.dist_helpers import rank_env

    os.environ.update(rank_env(0, 1, port))
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw) -> None:
        real_replace(src, dst, **kw)
        events.append(("rename", os.path.abspath(dst)))

    def rename(src, dst, **kw) -> None:
        real_rename(src, dst, **kw)
        events.append(("rename", os.path.abspath(dst)))

    os.fsync, os.replace, os.rename = fsync, replace, rename
    extra = ["--train.checkpoint_every=1", "--train.max_steps=2", f"--dist.engine={engine}", "--train.threads=1"]
    extra += (
        ["--dist.zero_stage=1"] if engine == "deepspeed" else []
    )  # ZeRO-1: the optimizer states in files of their own
    run_training(load_config(None, [*TINY, f"--train.out_dir={out_dir}", "--train.run_name=r", *extra]))
    Path(out_dir, "syncs.json").write_text(json.dumps(events))


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_checkpoint_files_folders_and_latest_are_flushed_before_latest_moves(tmp_path, fmnist_root, engine):
    """Every file of a checkpoint (DeepSpeed's own files too) and every folder holding it is fsynced before the
    ``latest`` pointer is renamed into place, and the folder holding the pointer after: a power cut leaves
    ``latest`` naming a checkpoint whose bytes are all on disk."""
    import json

    from tests.dist_helpers import free_port, start_workers

    start_workers(durability_worker, (free_port(), str(tmp_path), engine), 1)
    events = [tuple(e) for e in json.loads((tmp_path / "syncs.json").read_text())]
    run = (tmp_path / "r").resolve()
    marker = str(run / CHECKPOINTS / LATEST)
    moves = [i for i, (kind, path) in enumerate(events) if kind == "rename" and path == marker]
    assert len(moves) == 3  # steps 1 and 2, and the report's save of step 2 (BN statistics recalibrated)
    checkpoint = latest_checkpoint(run).resolve()
    files = [str(f) for f in checkpoint.rglob("*") if f.is_file()]
    folders = [str(d) for d in checkpoint.rglob("*") if d.is_dir()] + [str(checkpoint), str(run / CHECKPOINTS)]
    if engine == "deepspeed":
        assert any("model_states" in f for f in files) and any("optim_states" in f for f in files)
    before = {path for kind, path in events[: moves[-1]] if kind == "fsync"}
    assert not [f for f in files if f not in before], "a checkpoint file not on disk when latest moved"
    assert not [d for d in folders if d not in before], "a folder entry not on disk when latest moved"
    assert ("fsync", str(run / CHECKPOINTS)) in events[moves[-1] + 1 :], "the pointer's rename not flushed"
