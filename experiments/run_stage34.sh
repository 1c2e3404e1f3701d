#!/usr/bin/env bash
# Stage 34, the unrouted control at the current shapes (reading in experiments/stage34_*.toml): its inits, then the
# three arms one after another (each resumes from its own state; a finished arm returns at once).
# Usage: nohup experiments/run_stage34.sh > runs/stage34.stdout 2>&1 &
set -euo pipefail
[ -e runs/stage18_shipped.safetensors ] || git show edc1138:models/clip_rpn_default.safetensors > runs/stage18_shipped.safetensors
[ -e runs/stage34_init_heavy.safetensors ] || python experiments/stage34_init.py
for arm in routed_light routed_heavy unrouted; do
  python -m cliprpn_core.train_cli experiments/stage34_$arm.toml
done
