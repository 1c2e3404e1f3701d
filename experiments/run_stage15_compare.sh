#!/usr/bin/env bash
# The equal-budget comparison of experiments/stage15_unrouted_control.toml (reading rule there).
# Usage: experiments/run_stage15_compare.sh STEP   (STEP = 1000 or 3000: the specialists' step; the unrouted
# network's is twice it). Needs runs/stage9, runs/stage10 (light specialist; its step-1,000 snapshot as
# runs/stage15_cmp/light_step1000.safetensors), runs/stage14_heavy and runs/stage15_unrouted.
set -euo pipefail
S=${1:?specialist step}
U=$((2 * S))
mkdir -p runs/stage15_cmp
if [ "$S" = 3000 ]; then L=runs/stage10/model.safetensors; H=runs/stage14_heavy/model.safetensors
else L=runs/stage15_cmp/light_step$S.safetensors; H=runs/stage14_heavy/model_step$S.safetensors; fi
UN=runs/stage15_unrouted/model_step$U.safetensors
[ "$U" = 6000 ] && [ ! -e "$UN" ] && UN=runs/stage15_unrouted/model.safetensors
python scripts/assemble_experts.py --base runs/stage9/model.safetensors --expert light_streaks=$L \
  --expert heavy_streaks=$H -o runs/stage15_cmp/routed_$S.safetensors
experiments/eval_routed_unrouted.sh runs/stage15_cmp/routed_$S.safetensors "$UN" runs/stage15_cmp/routed_$S.txt \
  runs/stage15_cmp/unrouted_$U.txt 2
