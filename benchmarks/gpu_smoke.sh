#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (about 8 minutes on one H200):
#  1. the GPU-step tests and the model tests on the GPU's torch;
#  2. benchmarks/step_cost.py on CUDA in fp32 and bf16 (memory, FLOPs, time beyond FLOPs, split-rank memory);
#  3. training throughput of the quick-start job (200 steps on all 60k images) for each GPU-step setting:
#     torch engine; + channels_last + bf16; + train.compile reduce-overhead (CUDA graphs per block);
#     DeepSpeed ZeRO-0 and ZeRO-2 engines (the target: >= 0.85x the torch engine's samples/s).
# Expects Fashion-MNIST in ${FMNIST:-.data/fashion-mnist}; writes logs to ${OUT:-/tmp}.
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp}
FMNIST=${FMNIST:-.data/fashion-mnist}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_step.py tests/test_models.py 2>&1 | tail -2
for amp in none bf16; do
  python3 benchmarks/step_cost.py --device cuda --steps 30 --amp $amp 2>&1 | grep -v Warning | tee -a $OUT/step_cost.txt
done
common=(--config configs/quickstart.yaml --data.root=$FMNIST --data.train_subset=0 --train.max_steps=200
        --train.device=cuda --tracking.backend=none --train.progress=false --train.out_dir=$OUT/runs)
run() {  # name, extra settings...: the throughput line of a short run
  local name=$1; shift
  python3 launch/train.py "${common[@]}" --train.run_name=$name "$@" > $OUT/$name.txt 2>&1
  echo "$name: $(grep -E 'training throughput' $OUT/$name.txt || tail -3 $OUT/$name.txt)"
}
run torch_fp32
run torch_bf16_cl --optim.amp=bf16 --train.channels_last=true
run torch_bf16_cl_graphs --optim.amp=bf16 --train.channels_last=true --train.compile=reduce-overhead
run deepspeed_zero0 --dist.engine=deepspeed --dist.zero_stage=0
run deepspeed_zero2 --dist.engine=deepspeed --dist.zero_stage=2
