#!/usr/bin/env bash
# Stage 35, the shipped light network trained longer (reading and ship rule in experiments/stage35_light_longer.toml):
# its init from the shipped model, then the run (resumes from its own state when there is one).
# Usage: nohup experiments/run_stage35.sh > runs/stage35.stdout 2>&1 &
set -euo pipefail
# the base is the stage-19 file (the default when the run started; the shipped file is stage 20 since)
[ -e runs/stage19_shipped.safetensors ] || git show 0fe0ea1:models/clip_rpn_default.safetensors > runs/stage19_shipped.safetensors
[ -e runs/light_network_stage18.safetensors ] || python scripts/assemble_experts.py \
  --base runs/stage19_shipped.safetensors --extract light_streaks -o runs/light_network_stage18.safetensors
python -m cliprpn_core.train_cli experiments/stage35_light_longer.toml
