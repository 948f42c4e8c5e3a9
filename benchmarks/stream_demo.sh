#!/usr/bin/env bash
# The controller holding a latency target while another process loads the CPU:
# a 30 s clip (10 fps) made with ffmpeg, classified frame by frame by a trained run's Teammate A;
# halfway through, two processes multiplying matrices load both cores (and the caches) for 10 s, then stop.
#   bash benchmarks/stream_demo.sh runs/quickstart 4.0
set -euo pipefail
RUN=${1:-runs/quickstart}
TARGET=${2:-4.0}
OUT=${OUT:-/tmp}
ffmpeg -v error -y -f lavfi -i "testsrc2=size=160x120:rate=10:duration=30" -pix_fmt yuv420p "$OUT/demo_clip.mp4"
(sleep 15; for i in 1 2; do timeout 10 python3 -c "import torch; a = torch.randn(1500, 1500)
while True: a @ a" & done; wait) &
HOG=$!
dist-coop stream "$OUT/demo_clip.mp4" --run "$RUN" --target-ms "$TARGET" --plot "$OUT/stream_demo.png" | tee "$OUT/stream_demo.log" | \
  awk 'NR % 25 == 1 || /frames, target/'
wait $HOG 2>/dev/null || true
