#!/usr/bin/env bash
# The GPU check of the Tiny ImageNet recipe, one short script for one GPU:
#   1. Tiny ImageNet-shaped data of the real size (200 classes x 500 training + 10k validation 64x64 JPEGs in the
#      dataset's own folder layout; made here, since nothing can be downloaded), written as webdataset shards by
#      the project's writer (dist-coop shards --source tiny_imagenet);
#   2. the recipe configs/paper/tinyimagenet_resnet18_ctf.yaml (ResNet-18 at 64x64, width 64, batch 128, bf16)
#      trained for $STEPS steps through the real path (launch/train.py: shards streamed by loader workers, the
#      colocated placement on one GPU), four ways: the full CTF (Leader + 2 Teammates with their sub-nets), the
#      same with train.channels_last, the same with train.compile=default, and one plain net (no sub-nets, no
#      Teammate, no Leader) for the cost ratio.
# Each run's log and results.json (accuracies, costs, samples/s) land in $OUT (default ./gpu_check).
#   bash benchmarks/gpu_check.sh                      # PY=python3 STEPS=400 WORK=/tmp/gpu_check
# A dry run of the script on a CPU, at toy size:
#   PY=.venv/bin/python SIZE="--classes 4 --per-class 20 --val 20" STEPS=2 \
#       EXTRA="--model.width=8 --model.num_classes=4 --optim.amp=none --data.batch_size=16 --data.workers=1" \
#       bash benchmarks/gpu_check.sh
# The data are colour-coded noise: accuracy on them means nothing, the speed does.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_check}
PY=${PY:-python3}
STEPS=${STEPS:-400}
WORK=${WORK:-/tmp/gpu_check}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

t0=$(date +%s)
[ -d "$WORK/tiny-imagenet-200" ] || "$PY" benchmarks/make_tiny_imagenet.py --out "$WORK" ${SIZE:-}
t1=$(date +%s)
[ -f "$WORK/shards/index.json" ] || "$PY" -m dist_coop.cli shards --source tiny_imagenet \
    --root "$WORK/tiny-imagenet-200" --out "$WORK/shards" --max-count 1000
t2=$(date +%s)
echo "data: images $((t1 - t0)) s, shards $((t2 - t1)) s, $(du -sh "$WORK/shards" | cut -f1)" | tee -a "$OUT/gpu.txt"

run() {  # run NAME SECONDS [OVERRIDES...]: the run is stopped after SECONDS (its log says how far it got)
    local name=$1 limit=$2
    shift 2
    local start
    start=$(date +%s)
    timeout "$limit" "$PY" launch/train.py --config configs/paper/tinyimagenet_resnet18_ctf.yaml --data.shards="$WORK/shards" \
        --train.max_steps="$STEPS" --train.resume= --train.out_dir="$WORK/runs" --train.run_name="$name" \
        --tracking.backend=none --train.progress=false --data.workers=6 ${EXTRA:-} "$@" >"$OUT/$name.log" 2>&1 ||
        echo "$name FAILED (exit $?)" | tee -a "$OUT/gpu.txt"
    echo "$name: $(($(date +%s) - start)) s in all; $(grep 'training throughput' "$OUT/$name.log" || true)" |
        tee -a "$OUT/gpu.txt"
    cp "$WORK/runs/$name/results.json" "$OUT/$name.json" 2>/dev/null || true
}
run ctf 300
run plain 300 --coop.teammates=1 --coop.leader=false --coop.beta=0 --coop.sub_nets=false
run ctf_channels_last 300 --train.channels_last=true
# last, and bounded: compiling every block of three nets takes minutes, which the throughput line counts
run ctf_compiled "${COMPILE_LIMIT:-240}" --train.compile=default
