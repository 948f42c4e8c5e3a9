#!/usr/bin/env bash
# GPU smoke test of the real training path (one short script for a lent GPU machine):
# model tests incl. the torchvision wrapper, the step-cost benchmark in fp32 and bf16, and one
# epoch of the quick-start job on the full 60k training set in bf16. Expects Fashion-MNIST in
# ${FMNIST:-.data/fashion-mnist}. Writes logs to ${OUT:-/tmp}.
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
FMNIST=${FMNIST:-.data/fashion-mnist}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_losses.py 2>&1 | tail -3
for amp in none bf16; do
  python3 benchmarks/step_cost.py --config configs/quickstart.yaml --device cuda --steps 30 --optim.amp=$amp \
    --data.root=$FMNIST 2>&1 | grep -v Warning | tee -a $OUT/step_cost.txt
done
python3 launch/train.py --config configs/quickstart.yaml --data.root=$FMNIST --data.train_subset=0 \
  --train.epochs=1 --train.device=cuda --optim.amp=bf16 --tracking.backend=none --train.progress=false \
  --train.out_dir=$OUT/runs --train.log_every=50 2>&1 | tee $OUT/train.txt | tail -20
