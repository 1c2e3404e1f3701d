#!/bin/bash
# Stage 11 on one GPU: the control and its two capacity variants side by side (same data, seed and 6.5-min budget),
# from the repository root on a machine that received .gpu_data (python scripts/pack_gpu_data.py --compact
# --quality 85 --gt-quality 90). Then GPU timing of the shipped model and of the two variants (the control has the shipped network).
# Results (final EMA weights, loss logs, EMA snapshots, timings) go to $OUT (default runs/stage11_gpu_out).
set -u
cd "$(dirname "$0")/.."
O=$(mkdir -p "${OUT:-runs/stage11_gpu_out}" && cd "${OUT:-runs/stage11_gpu_out}" && pwd)
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
for r in control fullres passes2; do
    python3 -m cliprpn_core.train_cli experiments/stage11_gpu_$r.toml out_dir=/tmp/s11/$r > "$O/$r.log" 2>&1 &
done
wait
# at most 8 files come back from a device call: one tar per run (log, loss log, final EMA weights, EMA snapshots)
# and one file of timings
for r in control fullres passes2; do
    tail -c 400 "$O/$r.log"; echo
    (cd /tmp/s11/$r && tar -cf "$O/$r.tar" model.safetensors log.jsonl model_step*.safetensors) \
        && tar -rf "$O/$r.tar" -C "$O" "$r.log" && rm "$O/$r.log"
done
ls -la "$O"
for c in models/clip_rpn_default.safetensors /tmp/s11/fullres/model.safetensors /tmp/s11/passes2/model.safetensors; do
    echo "== $c"
    timeout 60 python3 -m benchmarks.speed --checkpoint "$c" --skip-memory --threads 8 --cuda 2>&1
done > "$O/speed.txt"
grep -E '== |"(device|ms_per_MP[^"]*|seconds_per_megapixel_1MP)"' "$O/speed.txt"
# Recorded run (2026-12-04): the fullres run failed at start (grow_from's identity probe ran on the CPU against a model
# already on cuda: fixed) and the returned files were cut at 8; fullres was then run alone for 3.6 min (2,155 steps,
# 14 threads: python3 -m cliprpn_core.train_cli experiments/stage11_gpu_fullres.toml out_dir=/tmp/fr budget_minutes=3.6
# max_minutes=3.9 threads=14). Results in docs/experiments.md.
