"""benchmarks/step_cost.py runs end to end (tiny sizes) and ends with its two ratio lines."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_cost_benchmark_reports_memory_time_and_flops():
    args = ["--steps", "1", "--warmup", "0", "--batches", "4", "8", "--r18-width", "2", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/step_cost.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"peak memory ratio \(cooperative / plain\): \d+\.\d\dx", lines[-2]), lines[-2]
    assert re.fullmatch(r"time beyond FLOPs: \d+\.\d\dx", lines[-1]), lines[-1]
    variants = ("plain (1 net, s=1)", "coop naive", "coop shared prefix", "coop part backward", "coop both")
    for variant in (*variants, "split: Teammate rank"):
        assert sum(line.startswith(variant) for line in lines) == 2, variant  # both nets
    # FLOPs are counted exactly: on resnet32 the shared prefix saves a Teammate at least 15 % (stage 1: 5 block
    # runs instead of 13, the stem once instead of 4 times)
    saving = re.search(r"with the shared prefix \((\d+\.\d) % less\)", lines[-4])
    assert saving and float(saving.group(1)) >= 15.0, lines[-4]
    assert re.fullmatch(r"split placement, one Teammate per rank \(both optimisations\): \d+\.\d\dx .*", lines[-3])
