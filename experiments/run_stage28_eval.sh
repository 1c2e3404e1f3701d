#!/usr/bin/env bash
# Stage 28's evaluation by the ship rule in experiments/stage28_heavy_grown.toml (outputs in runs/stage28_cmp/).
# Usage: experiments/run_stage28_eval.sh curve STEP [THREADS]   heavy network alone on heavy_test at a snapshot
#        experiments/run_stage28_eval.sh full [THREADS]         the assembled model by the ship rule's benchmarks
set -euo pipefail
O=runs/stage28_cmp; mkdir -p $O; R=runs/stage28_heavy
S=models/clip_rpn_default.safetensors; M=$O/routed_final.safetensors
case ${1:?curve or full} in
  curve)
    C=$R/model_step${2:?step}.safetensors; [ -e "$C" ] || C=$R/model.safetensors
    python -m benchmarks.evaluate "$C" --sets heavy_test --expert heavy_streaks --threads ${3:-1} | tee $O/heavy_alone_$2.txt
    ;;
  full)
    T=${2:-2}
    python scripts/assemble_experts.py --base $S --expert heavy_streaks=$R/model.safetensors -o $M
    python -m benchmarks.evaluate $M --sets rain100l heavy_test --threads $T | tee $O/routed.txt
    python -m benchmarks.synthetic_regimes $M --threads $T | tee $O/synthetic.txt
    python scripts/make_contact_sheet.py $S $M --expert heavy_streaks --labels "previous model" "new model" \
      --out $O/contact_forced_heavy.jpg --threads $T | tee $O/contact_forced_heavy.txt
    python scripts/make_contact_sheet.py $S $M --labels "previous model" "new model" --out $O/contact_routed.jpg \
      --threads $T | tee $O/contact_routed.txt
    python -m benchmarks.evaluate $M --sets heavy_train --threads $T | tee $O/heavy_train.txt
    ;;
esac
