"""Entry point: ``python launch/train.py --config configs/quickstart.yaml [--section.key=value ...]``.

Thin on purpose: config -> distributed init -> Trainer -> train -> close all live in
``dist_coop.cli.run_training``. Launchers (``deepspeed``, ``torchrun``) start this file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_coop.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
