#!/usr/bin/env bash
# The scratch evaluation sets the stage evaluations score on, each made once under runs/ when missing (run from the
# repository root). Usage: experiments/scratch_sets.sh [clean] [synthetic]   (default: both)
#   clean      runs/cleanpairs: the first 30 Rain100L ground truths as both input and target (symlinks)
#   synthetic  runs/synth_classic and runs/synth_downpour: 160 labelled images, 256 px, seed 1234 (the sets
#              benchmarks.synthetic_regimes writes by default)
set -euo pipefail
for part in ${*:-clean synthetic}; do
  case $part in
    clean)
      GT=$(cd ../shared/data/rain100l/gt && pwd)
      if [ ! -d runs/cleanpairs ]; then
        mkdir -p runs/cleanpairs/rain runs/cleanpairs/gt
        for f in $(ls "$GT" | head -30); do ln -s "$GT/$f" runs/cleanpairs/rain/$f; ln -s "$GT/$f" runs/cleanpairs/gt/$f; done
      fi ;;
    synthetic)
      for style in classic downpour; do
        [ -e runs/synth_$style/labels.json ] || cliprpn synth ../shared/data/clean -o runs/synth_$style -n 160 \
          --size 256 --seed 1234 --style $style
      done ;;
    *) echo "unknown part $part (clean synthetic)" >&2; exit 2 ;;
  esac
done
