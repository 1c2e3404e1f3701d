#!/bin/bash
# Stage 11 on one GPU: the control and its two capacity variants side by side (same data, seed and 6.5-min budget),
# from the repository root on a machine that received .gpu_data (python scripts/pack_gpu_data.py --compact
# --quality 85 --gt-quality 90). Then GPU timing of the shipped model and of the two variants (the control has the shipped network).
# Results (final EMA weights, loss logs, EMA snapshots, timings) go to $OUT (default runs/stage11_gpu_out).
set -u
cd "$(dirname "$0")/.."
O=${OUT:-runs/stage11_gpu_out}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
for r in control fullres passes2; do
    python3 -m cliprpn_core.train_cli experiments/stage11_gpu_$r.toml out_dir=/tmp/s11/$r > "$O/$r.log" 2>&1 &
done
wait
for r in control fullres passes2; do
    tail -c 400 "$O/$r.log"; echo
    cp /tmp/s11/$r/model.safetensors "$O/$r.safetensors"
    cp /tmp/s11/$r/log.jsonl "$O/$r.log.jsonl"
    for s in /tmp/s11/$r/model_step*.safetensors; do cp "$s" "$O/${r}_$(basename "$s")"; done
done
ls -la "$O"
for c in models/clip_rpn_default.safetensors "$O"/fullres.safetensors "$O"/passes2.safetensors; do
    timeout 60 python3 -m benchmarks.speed --checkpoint "$c" --skip-memory --threads 8 --cuda > "$O/speed_$(basename "$c" .safetensors).json" 2>&1
    grep -E '"(checkpoint|device|ms_per_MP[^"]*|seconds_per_megapixel_1MP)"' "$O/speed_$(basename "$c" .safetensors).json"
done
