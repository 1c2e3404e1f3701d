#!/usr/bin/env bash
# Evaluation of the stage-22 capacity test (experiments/stage22_{control,grown}.toml; reading and ship rule in their
# headers). Usage: experiments/run_stage22_eval.sh RUN STEP [full] [THREADS]   (RUN: control or grown)
#   The light network alone on Rain100L (the learning curve); with `full` the assembled model (light network = this
#   snapshot, the rest = the shipped model, grown with identity blocks for the grown run) by the ship rule's
#   benchmarks, every figure the model card gives, and the real-rain contact sheet against the shipped model.
set -euo pipefail
N=${1:?run}; S=${2:?step}; T=${4:-1}
R=runs/stage22_$N; C=$R/model_step$S.safetensors; [ -e "$C" ] || C=$R/model.safetensors
O=runs/stage22_cmp; mkdir -p $O
[ -s $O/${N}_light_$S.txt ] || python -m benchmarks.evaluate "$C" --sets rain100l --expert light_streaks --threads $T \
  | tee $O/${N}_light_$S.txt
if [ "${3:-}" = full ]; then
  M=$O/${N}_routed_$S.safetensors
  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --expert light_streaks="$C" -o $M
  python -m benchmarks.evaluate $M --sets rain100l heavy_test --threads $T | tee $O/${N}_routed_$S.txt
  python -m benchmarks.synthetic_regimes $M --threads $T | tee -a $O/${N}_routed_$S.txt
  python scripts/make_contact_sheet.py models/clip_rpn_default.safetensors $M \
    --labels "previous model" "new model" --out $O/${N}_contact_$S.jpg --threads $T | tee $O/${N}_contact_$S.txt
  python -m benchmarks.evaluate $M --sets rain100l heavy_test --experts --check --self-ensemble \
    --threads $T | tee $O/${N}_full_$S.txt
fi
