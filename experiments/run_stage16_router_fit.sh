#!/usr/bin/env bash
# Stage 16: the router fitted on measured expert quality (cliprpn_core/router_fit.py, scripts/fit_router.py).
# The shipped model routes by rain type (router trained on synthetic labels), but its experts are now whole networks
# trained one at a time, and on Rain100L the router sends 4 images to the heavy network where the light one restores
# them better (routed 36.265 against 36.434 with every image forced to light). The fit: every expert restores every
# training pair — RainTrainL (200), the heavy pairs (18) and 80 synthetic 256-px pairs of all four regimes over
# ../shared/data/clean (seed 7; the synthetic benchmark uses seed 1234) — and only the router's linear correction is
# fitted (perception and the experts unchanged), every 5th pair held out of the fit and reported apart.
# Usage: experiments/run_stage16_router_fit.sh CKPT OUT_DIR
# Reading / ship rule, written before any measurement (2026-12-04; Rain100L is the development set):
#   the fitted router ships with CKPT's networks if (1) on the held-out pairs the PSNR lost to the best expert falls,
#   (2) Rain100L routed >= CKPT's routed + 0.05 dB, (3) heavy_test routed >= CKPT's - 0.05 dB, and (4) the synthetic set
#   'all' >= CKPT's - 0.05 with no regime more than 0.15 dB below CKPT's.
set -euo pipefail
CK=${1:?checkpoint}
OUT=${2:?output folder}
mkdir -p "$OUT"
python scripts/fit_router.py "$CK" --pairs ../shared/data/rain100l_train --pairs ../shared/data/heavy_train \
  --synth-clean ../shared/data/clean -n 80 --size 256 --seed 7 --holdout-every 5 \
  -o "$OUT/fitted.safetensors" --measurements "$OUT/measured.json" --json "$OUT/fit.json" --threads 2
