#!/usr/bin/env bash
# Evaluation of the stage-20 heavy network (experiments/stage20_heavy_tolerant.toml; ship rule in its header):
# assembled as the heavy network of the shipped model, by the ship rule's benchmarks, then the heavy network forced on
# Rain100L (how well it tolerates light rain). Usage: experiments/run_stage20_eval.sh [STEP]
set -euo pipefail
R=runs/stage20_heavy; S=${1:-final}
C=$R/model_step$S.safetensors; [ -e "$C" ] || C=$R/model.safetensors
O=runs/stage20_cmp; mkdir -p $O
python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --expert heavy_streaks="$C" \
  -o $O/routed_$S.safetensors
python -m benchmarks.evaluate $O/routed_$S.safetensors --sets rain100l heavy_test --threads 2 | tee $O/routed_$S.txt
python -m benchmarks.synthetic_regimes $O/routed_$S.safetensors --threads 2 | tee -a $O/routed_$S.txt
python -m benchmarks.evaluate $O/routed_$S.safetensors --sets rain100l --expert heavy_streaks --threads 2 | tee $O/heavy_on_rain100l_$S.txt
