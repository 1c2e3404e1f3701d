#!/usr/bin/env bash
# Evaluation of stage 17 (experiments/stage17_perception_real.toml; ship rule in its header).
# Usage: experiments/run_stage17_eval.sh [CKPT]   (default: the final model). One thread: a training run shares the CPU.
set -euo pipefail
C=${1:-runs/stage17_perception/model.safetensors}
O=runs/stage17_eval; mkdir -p $O; n=$(basename "$C" .safetensors)
python -m benchmarks.evaluate "$C" --sets rain100l heavy_test --threads 1 | tee $O/$n.txt
python -m benchmarks.synthetic_regimes "$C" --threads 1 | tee -a $O/$n.txt
python -m benchmarks.perception --checkpoint "$C" | tee -a $O/$n.txt
