#!/usr/bin/env bash
# Evaluation of stage 42 (experiments/stage42_heavy_downpour.toml: the shipped heavy network trained further on
# downpour-style synthetic rain; ship rule in its header, written before the run). Outputs in runs/stage42_cmp/.
# Usage: experiments/run_stage42_eval.sh curve STEP [THREADS]  the heavy network of a snapshot alone: heavy_test and
#                                                              the downpour-style synthetic heavy regime (the curve)
#        experiments/run_stage42_eval.sh full [STEP] [THREADS] the shipped model with that heavy network (final by
#                                                              default) by every benchmark of the ship rule
set -euo pipefail
O=runs/stage42_cmp; R=runs/stage42_heavy; S=models/clip_rpn_default.safetensors; mkdir -p $O
snapshot() { local c=$R/model_step$1.safetensors; [ -e "$c" ] || c=$R/model.safetensors; echo "$c"; }
case ${1:?curve or full} in
  curve)
    P=${2:?step}; T=${3:-2}; C=$(snapshot "$P")
    python -m benchmarks.evaluate "$C" --sets heavy_test --expert heavy_streaks --threads $T | tee $O/heavy_alone_$P.txt
    python -m benchmarks.synthetic_regimes "$C" --style downpour --expert heavy_streaks --threads $T \
      | tee $O/downpour_alone_$P.txt
    ;;
  full)
    P=${2:-final}; T=${3:-2}; C=$(snapshot "$P"); M=$O/routed_$P.safetensors
    python scripts/assemble_experts.py --base $S --expert heavy_streaks="$C" -o $M
    python -m benchmarks.evaluate $M --sets rain100l heavy_test --threads $T | tee $O/routed_$P.txt
    python -m benchmarks.synthetic_regimes $S $M --threads $T | tee $O/synthetic_$P.txt
    python -m benchmarks.synthetic_regimes $S $M --style downpour --threads $T | tee $O/downpour_$P.txt
    python scripts/make_contact_sheet.py $S $M --labels "previous model" "new model" --names 001 003 004 005 006 007 \
      012 014 022 025 027 028 029 031 033 036 038 043 047 --out $O/contact_$P.jpg --threads $T | tee $O/contact_$P.txt
    ;;
  *) echo "usage: $0 curve STEP [THREADS] | full [STEP] [THREADS]" >&2; exit 2 ;;
esac
