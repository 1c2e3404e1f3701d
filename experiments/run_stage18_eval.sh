#!/usr/bin/env bash
# Evaluation of the stage-18 light network (experiments/stage18_light_longer.toml; ship rule in its header).
# Usage: experiments/run_stage18_eval.sh RUN_DIR STEP [full]
#   The light network alone on Rain100L (the learning curve; also the lr probe's reading), and with `full` the
#   assembled model (light network = this snapshot, the rest = the shipped model) by the ship rule's benchmarks.
set -euo pipefail
R=${1:?run dir}; S=${2:?step}
C=$R/model_step$S.safetensors; [ -e "$C" ] || C=$R/model.safetensors
O=runs/stage18_cmp; mkdir -p $O; n=$(basename "$R")_$S
[ -s $O/${n}_light.txt ] || python -m benchmarks.evaluate "$C" --sets rain100l --expert light_streaks --threads 1 | tee $O/${n}_light.txt
if [ "${3:-}" = full ]; then
  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --expert light_streaks="$C" \
    -o $O/routed_$n.safetensors
  python -m benchmarks.evaluate $O/routed_$n.safetensors --sets rain100l heavy_test --threads 1 | tee $O/routed_$n.txt
  python -m benchmarks.synthetic_regimes $O/routed_$n.safetensors --threads 1 | tee -a $O/routed_$n.txt
fi
