#!/usr/bin/env bash
# Evaluation of a heavy-network stage trained with `route_all_to = 1` (stage 44 on; stage 43's
# experiments/run_stage43_eval.sh ran the same parts): the shipped model with the stage's heavy network assembled in,
# each part against the shipped model. Outputs in OUT_DIR.
# Usage: experiments/eval_heavy_network.sh RUN_DIR OUT_DIR [STEP|final] [THREADS] [PARTS...]
#   PARTS (default: all of them, in this order):
#   clean      rain-free Rain100L ground truths (runs/cleanpairs: the first 30 as both input and target, symlinks)
#   routed     Rain100L and heavy_test routed
#   synthetic  the synthetic per-regime set in both styles (written once to runs/synth_classic and
#              runs/synth_downpour, 160 images, seed 1234: the sets benchmarks.synthetic_regimes writes by default;
#              the shipped model is scored again beside the candidate)
#   contact    the contact sheet of the 19 real photos the verification hands to the heavy network (since chain
#              stage 23 the shipped model keeps its own handover network for them: identical outputs there)
#   direct     the contact sheet of the six real photos perception routes to the heavy network
#   haze       the contact sheet of the four of them whose haze the shipped heavy network lifts most (004 022 028 029)
set -euo pipefail
R=${1:?run dir}; O=${2:?out dir}; P=${3:-final}; T=${4:-2}; shift $(( $# < 4 ? $# : 4 ))
PARTS=${*:-clean routed synthetic contact}
S=models/clip_rpn_default.safetensors
mkdir -p "$O"; C=$R/model_step$P.safetensors; [ -e "$C" ] || C=$R/model.safetensors; M=$O/routed_$P.safetensors
python scripts/assemble_experts.py --base $S --expert heavy_streaks="$C" -o "$M"
sheet() {  # sheet NAME PHOTOS...
  local n=$1; shift
  python scripts/make_contact_sheet.py $S "$M" --labels "previous model" "new model" --names "$@" \
    --out "$O/${n}_$P.jpg" --threads "$T" | tee "$O/${n}_$P.txt"
}
for part in $PARTS; do
  case $part in
    clean)
      experiments/scratch_sets.sh clean
      python -m benchmarks.evaluate "$M" --data runs --sets cleanpairs --threads "$T" | tee "$O/clean_$P.txt" ;;
    routed)
      python -m benchmarks.evaluate "$M" --sets rain100l heavy_test --threads "$T" | tee "$O/routed_$P.txt" ;;
    synthetic)
      experiments/scratch_sets.sh synthetic
      for style in classic downpour; do
        python -m benchmarks.synthetic_regimes $S "$M" --set runs/synth_$style --threads "$T" \
          | tee "$O/synthetic_${style}_$P.txt"
      done ;;
    contact)
      sheet contact 001 003 004 005 006 007 012 014 022 025 027 028 029 031 033 036 038 043 047 ;;
    haze)
      sheet haze 004 022 028 029 ;;
    direct)
      sheet direct 008 010 035 042 049 050 ;;
    *) echo "unknown part $part (clean routed synthetic contact haze direct)" >&2; exit 2 ;;
  esac
done
