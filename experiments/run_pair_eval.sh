#!/usr/bin/env bash
# Evaluation of a light-network test (experiments/stageN_{control,grown}.toml, N = 22, 24, 27;
# stage29_light_longer.toml, stage31_light_grown_third.toml, stage35_light_longer.toml, stage36_light_grown_fourth.toml, stage37_light_grown_half.toml, stage39_light_patch256.toml, stage40_light_downpour.toml;
# reading and ship rule in their headers).
# Usage: experiments/run_pair_eval.sh STAGE RUN STEP [full] [THREADS]
#   (STAGE: 22, 24, 27, 29, 31, 35, 36, 37, 39 or 40; RUN: control, grown or light; outputs in runs/stageSTAGE_cmp/)
#   The light network alone on Rain100L (the learning curve); with `full` the assembled model (light network = this
#   snapshot, the rest = the shipped model, grown with identity blocks for the grown run) by the ship rule's
#   benchmarks, every figure the model card gives, and the real-rain contact sheet against the shipped model.
set -euo pipefail
G=${1:?stage}; N=${2:?run}; S=${3:?step}; T=${5:-1}
R=runs/stage${G}_$N; C=$R/model_step$S.safetensors; [ -e "$C" ] || C=$R/model.safetensors
O=runs/stage${G}_cmp; mkdir -p $O
[ -s $O/${N}_light_$S.txt ] || python -m benchmarks.evaluate "$C" --sets rain100l --expert light_streaks --threads $T \
  | tee $O/${N}_light_$S.txt
if [ "${4:-}" = full ]; then
  M=$O/${N}_routed_$S.safetensors
  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --expert light_streaks="$C" -o $M
  experiments/eval_assembled.sh $M $T $O/${N}_routed_$S.txt $O/${N}_routed_$S.txt $O/${N}_contact_$S \
    $O/${N}_full_$S.txt
fi
