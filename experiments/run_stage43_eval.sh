#!/usr/bin/env bash
# Evaluation of stage 43 (experiments/stage43_heavy_norain.toml: the shipped heavy network taught to leave rain-free
# content alone; ship rule in its header, written before the run). Outputs in runs/stage43_cmp/.
# Usage: experiments/run_stage43_eval.sh [STEP|final] [THREADS]
#   The shipped model with that heavy network: rain-free Rain100L ground truths, Rain100L and heavy_test routed, the
#   synthetic per-regime set in both styles and the contact sheet of the 19 real photos the verification hands to the
#   heavy network: the default parts of experiments/eval_heavy_network.sh, which this script ran before that one
#   existed (same commands, same output names).
set -euo pipefail
exec "$(dirname "$0")/eval_heavy_network.sh" runs/stage43_heavy runs/stage43_cmp "${1:-final}" "${2:-2}"
