#!/usr/bin/env bash
# Set up a fresh machine for dist_coop: a virtual env with the project installed, and the
# bundled real dataset (Debian's dataset-fashion-mnist). Idempotent; sourced by quickstart.sh
# and test.sh. VENV overrides the env folder (default .venv); DIST_COOP_NO_VENV=1 installs into
# the current Python instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
if [ "${DIST_COOP_NO_VENV:-0}" != 1 ]; then
  VENV=${VENV:-.venv}
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PY="$VENV/bin/python"
fi
# torch is pinned in the same pip command: an unpinned torch (pulled in by deepspeed) would be a
# multi-GB CUDA build; 2.13.0 is the CPU wheel this project is tested with.
"$PY" -m pip install -q --disable-pip-version-check "torch==${DIST_COOP_TORCH:-2.13.0}" -e ".[test]" \
  2> >(grep -v "^WARNING: Location 'file:" >&2)

# ffmpeg (video shards and their tests); installed where we can, otherwise those tests skip
if ! command -v ffmpeg >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
fi
# Slurm and munge (tests/test_slurm.py starts a one-node cluster of its own); installed where we can, otherwise
# those tests skip
if ! command -v slurmctld >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing the bundled dataset (Debian package dataset-fashion-mnist)"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST is not in $FMNIST. Install it with 'sudo apt-get install dataset-fashion-mnist'" >&2
    echo "(Debian/Ubuntu), or download the four IDX .gz files and pass --data.root=/their/folder." >&2
    [ "${DIST_COOP_NEED_DATA:-1}" = 1 ] && exit 1
  fi
fi
export DIST_COOP_PY="$PY"
