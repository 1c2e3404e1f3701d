#!/usr/bin/env bash
# Evaluation of a heavy-network stage (experiments/stage28_heavy_grown.toml, stage30_heavy_with_light.toml,
# stage32_heavy_grown_third.toml, stage38_heavy_grown_fourth.toml; reading and ship rule in their headers). Outputs in runs/stageN_cmp/.
# Usage: experiments/run_heavy_eval.sh N curve STEP [THREADS]  heavy network alone at a snapshot: heavy_test, and
#                                                               (from stage 30 on) Rain100L, the cost of a misroute
#        experiments/run_heavy_eval.sh N full [THREADS]        the shipped model with this heavy network, by the ship
#                                                               rule's benchmarks
set -euo pipefail
N=${1:?stage}; O=runs/stage${N}_cmp; mkdir -p $O; R=runs/stage${N}_heavy
S=models/clip_rpn_default.safetensors; M=$O/routed_final.safetensors
case ${2:?curve or full} in
  curve)
    C=$R/model_step${3:?step}.safetensors; [ -e "$C" ] || C=$R/model.safetensors; T=${4:-1}
    python -m benchmarks.evaluate "$C" --sets heavy_test --expert heavy_streaks --threads $T | tee $O/heavy_alone_$3.txt
    [ "$N" -lt 30 ] || python -m benchmarks.evaluate "$C" --sets rain100l --expert heavy_streaks --threads $T \
      | tee $O/heavy_alone_r100l_$3.txt
    ;;
  full)
    T=${3:-2}
    python scripts/assemble_experts.py --base $S --expert heavy_streaks=$R/model.safetensors -o $M
    experiments/eval_assembled.sh $M $T $O/routed.txt $O/synthetic.txt $O/contact_routed $O/full.txt
    python scripts/make_contact_sheet.py $S $M --expert heavy_streaks --labels "previous model" "new model" \
      --out $O/contact_forced_heavy.jpg --threads $T | tee $O/contact_forced_heavy.txt
    python -m benchmarks.evaluate $M --sets heavy_train --threads $T | tee $O/heavy_train.txt
    ;;
esac
