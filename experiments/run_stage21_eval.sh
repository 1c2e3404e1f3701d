#!/usr/bin/env bash
# Evaluation of the stage-21 light network (experiments/stage21_light_9k.toml; ship rule in its header).
# Usage: experiments/run_stage21_eval.sh STEP [full] [THREADS]
#   The light network alone on Rain100L (the learning curve); with `full` the assembled model (light network = this
#   snapshot, the rest = the shipped model) by the ship rule's benchmarks, then every figure the model card gives
#   and the real-rain contact sheet against the shipped model (runs/stage21_cmp/contact_STEP.jpg).
set -euo pipefail
S=${1:?step}; T=${3:-1}
R=runs/stage21_light; C=$R/model_step$S.safetensors; [ -e "$C" ] || C=$R/model.safetensors
O=runs/stage21_cmp; mkdir -p $O
[ -s $O/light_$S.txt ] || python -m benchmarks.evaluate "$C" --sets rain100l --expert light_streaks --threads $T | tee $O/light_$S.txt
if [ "${2:-}" = full ]; then
  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --expert light_streaks="$C" \
    -o $O/routed_$S.safetensors
  python -m benchmarks.evaluate $O/routed_$S.safetensors --sets rain100l heavy_test --threads $T | tee $O/routed_$S.txt
  python -m benchmarks.synthetic_regimes $O/routed_$S.safetensors --threads $T | tee -a $O/routed_$S.txt
  python scripts/make_contact_sheet.py models/clip_rpn_default.safetensors $O/routed_$S.safetensors \
    --labels "previous model" "new model" --out $O/contact_$S.jpg --threads $T | tee $O/contact_$S.txt
  python -m benchmarks.evaluate $O/routed_$S.safetensors --sets rain100l heavy_test --experts --check --self-ensemble \
    --threads $T | tee $O/full_$S.txt
fi
