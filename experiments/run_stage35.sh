#!/usr/bin/env bash
# Stage 35, the shipped light network trained longer (reading and ship rule in experiments/stage35_light_longer.toml):
# its init from the shipped model, then the run (resumes from its own state when there is one).
# Usage: nohup experiments/run_stage35.sh > runs/stage35.stdout 2>&1 &
set -euo pipefail
[ -e runs/light_network_stage18.safetensors ] || python scripts/assemble_experts.py \
  --base models/clip_rpn_default.safetensors --extract light_streaks -o runs/light_network_stage18.safetensors
python -m cliprpn_core.train_cli experiments/stage35_light_longer.toml
