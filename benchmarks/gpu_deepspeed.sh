#!/usr/bin/env bash
# The real `deepspeed launch/train.py` path on 1 GPU (colocated), bf16, ZeRO-2, one epoch of the
# quick-start job on all 60k Fashion-MNIST images; then the same with the plain torch engine.
# Needs deepspeed installed (on the lent GPU machines: wheels carried in .whl/).
set -uo pipefail
OUT=${OUT:-/tmp}
FMNIST=${FMNIST:-.data/fashion-mnist}
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links .whl deepspeed 2>&1 | tail -2
fi
export PYTHONPATH=$PWD
common=(--config configs/quickstart.yaml --data.root=$FMNIST --data.train_subset=0 --train.epochs=1 --train.device=cuda
        --optim.amp=bf16 --tracking.backend=none --train.progress=false --train.out_dir=$OUT/runs)
deepspeed --num_gpus 1 launch/train.py "${common[@]}" --train.run_name=ds_zero2 --dist.engine=deepspeed --dist.zero_stage=2 \
  2>&1 | grep -v -E "^\[.*(INFO|WARNING)" | tee $OUT/deepspeed.txt | tail -18
python3 launch/train.py "${common[@]}" --train.run_name=torch_engine 2>&1 | tee $OUT/torch.txt | grep -E "throughput|teammate_a +(0.25|1) "
