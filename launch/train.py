"""Entry point for every launcher.

    python launch/train.py --config configs/quickstart.yaml            # one process
    torchrun --nproc_per_node 3 launch/train.py --config ...            # one node
    torchrun --nnodes 2 --nproc_per_node 3 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 launch/train.py --config ...         # two nodes
    deepspeed --num_gpus 3 launch/train.py --config ... --dist.engine=deepspeed

Thin on purpose: config -> distributed init -> Trainer -> train -> close all live in
``dist_coop.cli.run_training``; the launchers' variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) are read once by ``init_distributed``. A rank whose peers are gone or
stalled stops after ``dist.timeout_s`` with one line naming it (exit code 1; ``--debug``: the traceback).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_coop.cli import main  # noqa: E402


def strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes ``--local_rank=N``; LOCAL_RANK in the environment says the same."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            out.append(arg)
    return out


def run(argv: list[str]) -> int:
    """``dist-coop train`` with these arguments (errors, a lost peer included, are one line there)."""
    return main(["train", *argv])


if __name__ == "__main__":
    sys.exit(run(strip_local_rank(sys.argv[1:])))
