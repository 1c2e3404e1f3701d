#!/usr/bin/env bash
# The figures of an equal-budget comparison (routed against unrouted; experiments/run_stage15_compare.sh and
# experiments/run_stage34_compare.sh choose the files): the routed model as a user's call runs it, and the unrouted
# network as it would be used, one network (the light-streaks path it trained) for every image; each on Rain100L,
# heavy_test and the synthetic per-regime set.
# Usage: experiments/eval_routed_unrouted.sh ROUTED_MODEL UNROUTED_MODEL ROUTED_TXT UNROUTED_TXT THREADS
set -euo pipefail
R=${1:?routed model}; U=${2:?unrouted model}; RT=${3:?routed txt}; UT=${4:?unrouted txt}; T=${5:?threads}
python -m benchmarks.evaluate "$R" --sets rain100l heavy_test --threads "$T" | tee "$RT"
python -m benchmarks.synthetic_regimes "$R" --threads "$T" | tee -a "$RT"
python -m benchmarks.evaluate "$U" --sets rain100l heavy_test --expert light_streaks --threads "$T" | tee "$UT"
python -m benchmarks.synthetic_regimes "$U" --expert light_streaks --threads "$T" | tee -a "$UT"
