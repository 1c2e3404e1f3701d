#!/usr/bin/env bash
# The four evaluations every ship rule of a network stage reads, run on an assembled candidate (the shipped model with
# one network replaced): routed Rain100L + heavy_test, the synthetic per-regime set, the real-rain contact sheet against
# the shipped model, and every figure the model card gives (--experts --check --self-ensemble).
# Called by experiments/run_pair_eval.sh and experiments/run_heavy_eval.sh (`full`) and experiments/run_perception_eval.sh,
# which choose the output names.
# Usage: experiments/eval_assembled.sh MODEL THREADS ROUTED_TXT SYNTHETIC_TXT CONTACT_STEM FULL_TXT
#   SYNTHETIC_TXT may be ROUTED_TXT: the synthetic figures are then appended to it. CONTACT_STEM gets .jpg and .txt.
#   FULL_TXT '-' skips the last, longest evaluation (experiments/run_perception_eval.sh).
set -euo pipefail
M=${1:?model}; T=${2:?threads}; RT=${3:?routed txt}; ST=${4:?synthetic txt}; CS=${5:?contact stem}; FT=${6:?full txt}
S=models/clip_rpn_default.safetensors
python -m benchmarks.evaluate "$M" --sets rain100l heavy_test --threads "$T" | tee "$RT"
if [ "$ST" = "$RT" ]; then A=-a; else A=; fi
python -m benchmarks.synthetic_regimes "$M" --threads "$T" | tee $A "$ST"
python scripts/make_contact_sheet.py $S "$M" --labels "previous model" "new model" --out "$CS.jpg" --threads "$T" \
  | tee "$CS.txt"
[ "$FT" = - ] || python -m benchmarks.evaluate "$M" --sets rain100l heavy_test --experts --check --self-ensemble \
  --threads "$T" | tee "$FT"
