#!/usr/bin/env bash
# The equal-budget comparison of stage 34 (reading in experiments/stage34_unrouted.toml's header).
# Usage: experiments/run_stage34_compare.sh STEP [THREADS]   (STEP = 500 or 1000: the routed arms' step; the
# unrouted network's is twice it). Outputs in runs/stage34_cmp/.
set -euo pipefail
S=${1:?arm step}; T=${2:-2}; U=$((2 * S)); O=runs/stage34_cmp; mkdir -p $O
B=runs/stage18_shipped.safetensors
pick() { if [ -e "$1/model_step$2.safetensors" ]; then echo "$1/model_step$2.safetensors"; else echo "$1/model.safetensors"; fi; }
L=$(pick runs/stage34_light $S); H=$(pick runs/stage34_heavy $S); UN=$(pick runs/stage34_unrouted $U)
python scripts/assemble_experts.py --base $B --expert light_streaks=$L --expert heavy_streaks=$H -o $O/routed_$S.safetensors
experiments/eval_routed_unrouted.sh $O/routed_$S.safetensors "$UN" $O/routed_$S.txt $O/unrouted_$U.txt $T
