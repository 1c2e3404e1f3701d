#!/usr/bin/env bash
# Evaluation of stage 43 (experiments/stage43_heavy_norain.toml: the shipped heavy network taught to leave rain-free
# content alone; ship rule in its header, written before the run). Outputs in runs/stage43_cmp/.
# Usage: experiments/run_stage43_eval.sh [STEP|final] [THREADS]
#   The shipped model with that heavy network: rain-free Rain100L ground truths (runs/cleanpairs: the first 30 as both
#   input and target, symlinks), Rain100L and heavy_test routed, the synthetic per-regime set in both styles (written
#   once to runs/synth_classic and runs/synth_downpour, 160 images, seed 1234: the sets benchmarks.synthetic_regimes
#   writes by default; the shipped model is scored again beside the candidate) and the contact sheet of the 19 real
#   photos the verification hands to the heavy network.
set -euo pipefail
P=${1:-final}; T=${2:-2}; O=runs/stage43_cmp; R=runs/stage43_heavy; S=models/clip_rpn_default.safetensors
mkdir -p $O; C=$R/model_step$P.safetensors; [ -e "$C" ] || C=$R/model.safetensors; M=$O/routed_$P.safetensors
GT=$(cd ../shared/data/rain100l/gt && pwd)
if [ ! -d runs/cleanpairs ]; then
  mkdir -p runs/cleanpairs/rain runs/cleanpairs/gt
  for f in $(ls "$GT" | head -30); do ln -s "$GT/$f" runs/cleanpairs/rain/$f; ln -s "$GT/$f" runs/cleanpairs/gt/$f; done
fi
python scripts/assemble_experts.py --base $S --expert heavy_streaks="$C" -o $M
python -m benchmarks.evaluate $M --data runs --sets cleanpairs --threads $T | tee $O/clean_$P.txt
python -m benchmarks.evaluate $M --sets rain100l heavy_test --threads $T | tee $O/routed_$P.txt
for style in classic downpour; do
  [ -e runs/synth_$style/labels.json ] || cliprpn synth ../shared/data/clean -o runs/synth_$style -n 160 --size 256 \
    --seed 1234 --style $style
  python -m benchmarks.synthetic_regimes $S $M --set runs/synth_$style --threads $T | tee $O/synthetic_${style}_$P.txt
done
python scripts/make_contact_sheet.py $S $M --labels "previous model" "new model" --names 001 003 004 005 006 007 012 \
  014 022 025 027 028 029 031 033 036 038 043 047 --out $O/contact_$P.jpg --threads $T | tee $O/contact_$P.txt
