#!/usr/bin/env bash
# Stage 27's evaluation by the ship rule in experiments/stage27_grown.toml (outputs in runs/stage27_cmp/).
# Usage: experiments/run_stage27_eval.sh speed   (first, with nothing else running: CPU timing of both files)
#        experiments/run_stage27_eval.sh quality [THREADS]
set -euo pipefail
O=runs/stage27_cmp; mkdir -p $O
S=models/clip_rpn_default.safetensors; M=$O/grown_routed_final.safetensors
[ -e $M ] || python scripts/assemble_experts.py --base $S --expert light_streaks=runs/stage27_grown/model.safetensors -o $M
case ${1:?speed or quality} in
  speed)
    python -m benchmarks.speed --checkpoint $S --repeats 5 --skip-memory | tee $O/speed_shipped.txt
    python -m benchmarks.speed --checkpoint $M --repeats 5 | tee $O/speed_grown.txt
    ;;
  quality)
    experiments/run_pair_eval.sh 27 grown final full ${2:-2}
    ;;
esac
