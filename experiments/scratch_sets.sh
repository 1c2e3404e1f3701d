#!/usr/bin/env bash
# The scratch evaluation sets the stage evaluations score on, each made once under runs/ when missing (run from the
# repository root). Usage: experiments/scratch_sets.sh [clean] [synthetic] [heavy]   (default: clean synthetic)
#   clean      runs/cleanpairs: the first 30 Rain100L ground truths as both input and target (symlinks)
#   synthetic  runs/synth_classic and runs/synth_downpour: 160 labelled images, 256 px, seed 1234 (the sets
#              benchmarks.synthetic_regimes writes by default)
#   heavy      runs/synth_classic_heavy and runs/synth_downpour_heavy: the heavy-streak images of those two sets
#              (symlinks; 37 and 38), whose routed figures are the sets' heavy_streaks rows, in a quarter of the time
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
    heavy)
      "$0" synthetic
      for style in classic downpour; do
        [ -e runs/synth_${style}_heavy/labels.json ] || python - runs/synth_$style runs/synth_${style}_heavy <<'PY'
import json, os, sys
from pathlib import Path
src, dst = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
keep = {k: v for k, v in json.loads((src / "labels.json").read_text()).items() if v["expert"] == "heavy_streaks"}
for sub in ("gt", "mask", "rain"):
    (dst / sub).mkdir(parents=True, exist_ok=True)
    for k in keep:
        if (src / sub / k).exists() and not (dst / sub / k).exists():
            os.symlink(src / sub / k, dst / sub / k)
(dst / "labels.json").write_text(json.dumps(keep))
PY
      done ;;
    *) echo "unknown part $part (clean synthetic heavy)" >&2; exit 2 ;;
  esac
done
