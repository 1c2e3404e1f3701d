#!/bin/bash
# The GPU stage-7 candidate and its unrouted control, side by side on one GPU (same data, seed and 8-min budget),
# from the repository root on a machine that received .gpu_data (python scripts/pack_gpu_data.py --compact
# --quality 85 --gt-quality 90) and runs/stage6.safetensors (git show 74d57e4:models/clip_rpn_default.safetensors).
# Results (final EMA weights, loss logs, two snapshots of the routed run) go to $OUT (default runs/stage7_gpu_out).
set -u
cd "$(dirname "$0")/.."
O=${OUT:-runs/stage7_gpu_out}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
python3 -m cliprpn_core.train_cli experiments/stage7_gpu.toml out_dir=/tmp/s7/routed max_minutes=8.6 \
    > "$O/routed.log" 2>&1 &
python3 -m cliprpn_core.train_cli experiments/stage7_gpu.toml out_dir=/tmp/s7/unrouted route_all_to=0 \
    max_minutes=8.6 > "$O/unrouted.log" 2>&1 &
wait
for r in routed unrouted; do
    tail -c 600 "$O/$r.log"; echo
    cp /tmp/s7/$r/model.safetensors "$O/$r.safetensors"
    cp /tmp/s7/$r/log.jsonl "$O/$r.log.jsonl"
done
cp /tmp/s7/routed/model_step1000.safetensors /tmp/s7/routed/model_step2000.safetensors "$O/" 2>/dev/null
ls -la "$O"
