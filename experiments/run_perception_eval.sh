#!/usr/bin/env bash
# Evaluation of a perception stage (experiments/stage33_perception_downpour.toml; reading and ship rule in its header):
# the trained pattern head and router with the restoration networks they were trained beside (the shipped ones).
# Outputs in runs/stageN_cmp/.
# Usage: experiments/run_perception_eval.sh N [THREADS] [STEP]   (STEP: a snapshot, else the final model)
set -euo pipefail
N=${1:?stage}; T=${2:-2}; O=runs/stage${N}_cmp; mkdir -p $O; R=runs/stage${N}_perception
C=$R/model.safetensors; [ -z "${3:-}" ] || C=$R/model_step$3.safetensors; K=${3:-final}
experiments/eval_assembled.sh $C $T $O/routed_$K.txt $O/synthetic_$K.txt $O/contact_$K -
python -m benchmarks.perception --checkpoint $C --threads $T > $O/perc_classic_$K.json
python -m benchmarks.perception --checkpoint $C --threads $T --style downpour > $O/perc_downpour_$K.json
python -m benchmarks.perception_scale --checkpoint $C --sets rain100l_train heavy_train rain100l heavy_test real_rain \
  --threads $T | tee $O/perception_scale_$K.txt
