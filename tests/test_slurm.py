"""Slurm: a task that srun started with no launcher is one rank of one run (the mapping as a pure function, then
for real), and launch/slurm/train.sbatch runs to the end, and when preempted saves, requeues and continues to the
uninterrupted run's metrics. The real tests run on a one-node cluster of their own (tests/slurm_cluster.py)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_coop.cli import main
from dist_coop.distributed.env import init_distributed
from dist_coop.distributed.slurm import SLURM_PORT_BASE, slurm_first_host, slurm_launch_env
from tests.helpers import TINY
from tests.slurm_cluster import SlurmUnavailable, cluster, installable

ROOT = Path(__file__).resolve().parents[1]
SBATCH = "launch/slurm/train.sbatch"

# a task of `srun -N1 -n2` on host vm, as Slurm 22.05 sets it (the variables the mapping reads)
STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_NNODES": "1",
    "SLURM_STEP_NODELIST": "vm",
    "SLURM_JOB_NODELIST": "vm",
}
# task 5 of `srun -N2 -n8` on gpu[07-08]
TWO_NODES = {**STEP, "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}  # fmt: skip


# ---------------------------------------------------------------- the mapping, on fake environments


def test_srun_task_is_a_rank_meeting_on_loopback_on_one_node():
    assert slurm_launch_env(STEP) == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(SLURM_PORT_BASE + 4242),
    }
    assert slurm_launch_env({**STEP, "SLURM_JOB_ID": "123456"})["MASTER_PORT"] == str(10000 + 123456 % 20000)


def test_srun_task_on_several_nodes_meets_on_the_first_host():
    env = slurm_launch_env(TWO_NODES, use_scontrol=False)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "14242"}
    job_list_only = {k: v for k, v in TWO_NODES.items() if not k.startswith("SLURM_STEP_NODE")}
    assert slurm_launch_env(job_list_only, use_scontrol=False)["MASTER_ADDR"] == "gpu07"
    given = slurm_launch_env({**TWO_NODES, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"}, use_scontrol=False)
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.7", "29400")  # the environment's win


def test_launchers_batch_scripts_and_plain_processes_are_left_alone():
    assert slurm_launch_env({**STEP, "RANK": "3", "WORLD_SIZE": "4"}) == {}  # torchrun / deepspeed under srun
    batch = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}  # sbatch's script: no step
    assert slurm_launch_env({**batch, "SLURM_PROCID": "0"}) == {}
    assert slurm_launch_env({}) == {}
    one = {**STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert slurm_launch_env(one) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({k: v for k, v in STEP.items() if k != "SLURM_PROCID"}, ["SLURM_PROCID", "RANK, WORLD_SIZE"]),
        ({**STEP, "SLURM_PROCID": "2"}, ["SLURM_PROCID=2", "SLURM_STEP_NUM_TASKS=2"]),
        ({k: v for k, v in STEP.items() if k != "SLURM_JOB_ID"}, ["SLURM_JOB_ID", "MASTER_PORT"]),
        ({**TWO_NODES, "SLURM_STEP_NODELIST": "gpu[a-b]"}, ["SLURM_STEP_NODELIST='gpu[a-b]'", "MASTER_ADDR"]),
    ],
    ids=["no-procid", "procid-out-of-range", "no-job-id", "bad-node-list"],
)
def test_what_does_not_say_who_or_where_is_refused_in_one_line(env, names):
    with pytest.raises(ValueError) as e:
        slurm_launch_env(env, use_scontrol=False)
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in names), str(e.value)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("vm", "vm"),
        ("node-1.cluster", "node-1.cluster"),
        ("a,b", "a"),
        ("gpu[03-05,07],cpu1", "gpu03"),
        ("gpu[7]", "gpu7"),
        ("rack[1-2]-n[01-04]", "rack1-n01"),
        ("gpu[]", ""),
        ("gpu[a-b]", ""),
        ("", ""),
    ],
)
def test_first_host_of_a_compressed_node_list(nodelist, first):
    assert slurm_first_host(nodelist) == first


def test_cli_refuses_a_task_it_cannot_place_in_one_line(tmp_path, monkeypatch, capsys):
    """Every task of the step fails alike, before touching the run folder: never one run per task."""
    for key, value in {k: v for k, v in STEP.items() if k != "SLURM_LOCALID"}.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert main(["train", *TINY, f"--train.out_dir={tmp_path}", "--train.device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dist-coop: error: srun started this task but SLURM_LOCALID='' is not a count; set RANK, WORLD_SIZE and "
        "LOCAL_RANK yourself or start the ranks with launch/slurm/train.sbatch"
    ]
    assert not any(tmp_path.iterdir())
    info = init_distributed("cpu", env={**STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"})
    assert (info.rank, info.world_size, info.initialized) == (0, 1, False)


# ---------------------------------------------------------------- for real: a one-node cluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster for this module. Skipped where Slurm is not installed or cannot start, except in
    CI on a machine where scripts/setup.sh installs it (root, apt-get): there that is a failure."""
    started = cluster(tmp_path_factory.mktemp("slurm"))
    try:
        found = next(started)
    except SlurmUnavailable as e:
        if os.environ.get("CI") and installable():
            pytest.fail(str(e))
        pytest.skip(str(e))
    yield found
    next(started, None)


def _run_args(out_dir: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, "--train.device=cpu", "--train.threads=1", f"--train.out_dir={out_dir}", f"--train.run_name={name}",
            *extra]  # fmt: skip


@pytest.mark.slow
def test_tasks_see_the_mapping_and_the_batch_script_is_one_process(slurm, tmp_path):
    """What srun and sbatch really set: the two tasks of a step are ranks 0 and 1 of 2 on the loopback address,
    on the job's port; sbatch's script (two tasks allocated, no step) is left alone; scontrol's expansion of node
    lists starts with the host the parser finds."""
    show = "import json, os; from dist_coop.distributed.slurm import slurm_launch_env as f; print(json.dumps(f(os.environ)))"
    done = slurm.run("srun", "-N1", "-n2", "--job-name=mapping", "--label", sys.executable, "-c", show, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    seen = {task: json.loads(env) for task, env in (line.split(": ", 1) for line in done.stdout.strip().splitlines())}
    job_id = int(slurm.run("squeue", "-h", "-t", "all", "-n", "mapping", "-o", "%i").stdout.split()[0])
    port = str(SLURM_PORT_BASE + job_id % 20000)
    assert seen == {
        task: {"RANK": task, "WORLD_SIZE": "2", "LOCAL_RANK": task, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        for task in ("0", "1")
    }

    out = tmp_path / "batch.out"
    submitted = slurm.run(
        "sbatch", "--parsable", "-n2", "-o", str(out), f"--wrap={sys.executable} -c '{show}'", cwd=ROOT
    )
    assert submitted.returncode == 0, submitted.stderr
    slurm.wait_for(submitted.stdout.strip(), {"COMPLETED", "FAILED"})
    assert out.read_text().strip() == "{}"

    for nodelist in ("gpu[03-05,07],cpu1", "rack[1-2]-n[01-04]", "node-1.cluster"):
        hosts = slurm.run("scontrol", "show", "hostnames", nodelist).stdout.split()
        assert hosts[0] == slurm_first_host(nodelist)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "deepspeed-slurm"])
def test_srun_two_tasks_are_one_run_of_two_ranks(slurm, tmp_path, fmnist_root, launcher):
    """`srun -N1 -n2 python launch/train.py` is one job of world size 2 (before: two runs of one, the second
    refused by the run folder's lock). The deepspeed launcher's Slurm mode starts the same srun (no RANK set)
    inside an allocation, here with the DeepSpeed engine."""
    if launcher == "srun":
        cmd = ["srun", "-N1", "-n2", sys.executable]
        extra = ["--train.max_steps=4"]
    else:
        deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
        if deepspeed is None:
            pytest.skip("deepspeed launcher not installed")
        hostfile = tmp_path / "hostfile"
        hostfile.write_text(f"{socket.gethostname()} slots=2\n")
        cmd = ["salloc", "-N1", "-n2", deepspeed, f"--hostfile={hostfile}", "--launcher=slurm", "--force_multi",
               "--no_ssh_check", f"--master_addr={socket.gethostname()}"]  # fmt: skip
        extra = ["--train.max_steps=4", "--dist.engine=deepspeed"]
    done = slurm.run(*cmd, "launch/train.py", *_run_args(tmp_path / "out", "a", *extra), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("training throughput:") == 1 and "(colocated, 2 process(es))" in done.stdout
    results = json.loads((tmp_path / "out" / "a" / "results.json").read_text())
    assert results["step"] == 4
    assert sorted(k for k in results["costs"] if k.startswith("throughput/")) == [
        "throughput/samples_per_s/rank0",
        "throughput/samples_per_s/rank1",
    ]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a"]


# the sbatch runs: 2 ranks on the node, 3 epochs of 4 steps, a checkpoint every 2 steps
SBATCH_RUN = ["--train.epochs=3", "--train.checkpoint_every=2"]


def _sbatch(slurm, out_dir: Path, name: str) -> str:
    """Submit the sbatch file with the quick start config and the tiny overrides; returns the job id."""
    env = {**slurm.env, "DIST_COOP_NPROC_PER_NODE": "2", "DIST_COOP_PY": sys.executable}
    env.pop("SLURM_GPUS_ON_NODE", None)
    cmd = ["sbatch", "--parsable", "-o", str(out_dir / f"{name}.out"), SBATCH, "configs/quickstart.yaml",
           *_run_args(out_dir, name, *SBATCH_RUN)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "results.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def sbatch_clean(slurm, tmp_path_factory, fmnist_root) -> dict[str, float]:
    """The sbatch file run to the end, uninterrupted: its final metrics."""
    out = tmp_path_factory.mktemp("sbatch")
    job_id = _sbatch(slurm, out, "clean")
    job = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    log = (out / "clean.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert f"dist-coop: job {job_id}, start 1, 1 node(s) x 2 rank(s), rendezvous " in log
    assert "(colocated, 2 process(es))" in log
    return _metrics(out / "clean")


@pytest.mark.slow
def test_sbatch_preempted_requeues_itself_and_ends_like_the_uninterrupted_run(slurm, sbatch_clean, tmp_path):
    """SIGTERM to the batch script (what `--signal=B:TERM@120` sends before the time limit) once the first
    checkpoint is there: both ranks stop after the same step and save, the job requeues itself, and the next
    start resumes from that checkpoint and ends with the uninterrupted run's metrics."""
    job_id = _sbatch(slurm, tmp_path, "stopped")
    latest = tmp_path / "stopped" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and slurm.job(job_id).get("JobState") in {"PENDING", "RUNNING"}:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    assert latest.exists(), (tmp_path / "stopped.out").read_text()[-3000:]
    assert slurm.run("scancel", "--batch", "--signal=TERM", job_id).returncode == 0
    job = slurm.wait_for(job_id, {"PENDING", "COMPLETED", "FAILED"}, timeout=120)
    assert job["JobState"] == "PENDING" and job["Restarts"] == "1", (tmp_path / "stopped.out").read_text()[-3000:]
    # a requeued job waits until the killed start's credentials expire (AuthInfo cred_expire: 120 s by default, 10 s
    # in the tests' cluster); forcing it to start sooner races slurmd, which refuses a job it still holds as killed
    job = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    log = (tmp_path / "stopped.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]

    assert "dist-coop: stop signal: the ranks save a checkpoint and stop; the job is requeued" in log
    stops = re.findall(
        r"dist-coop: rank (\d): stopped at step (\d+) of 12 on a stop signal; checkpoint (step_\d+)", log
    )
    assert sorted(r for r, _, _ in stops) == ["0", "1"] and len({(s, c) for _, s, c in stops}) == 1, log[-3000:]
    step, tag = int(stops[0][1]), stops[0][2]
    assert 2 <= step < 12
    assert f"dist-coop: job {job_id}, start 2, 1 node(s) x 2 rank(s)" in log
    assert f"resumed from {tmp_path / 'stopped' / 'checkpoints' / tag} at step {step}" in log
    assert _metrics(tmp_path / "stopped") == pytest.approx(sbatch_clean, rel=1e-6)
