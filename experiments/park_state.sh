#!/usr/bin/env bash
# Keep an unfinished run's training state in the repository, so that a fresh checkout can resume it (runs/ is not
# tracked and does not travel to another checkout).
#   experiments/park_state.sh park RUN     copies runs/RUN/state.safetensors and log.jsonl
#                                          to experiments/checkpoints/RUN/ (then commit it)
#   experiments/park_state.sh unpark RUN   copies it back to runs/RUN/, where train_cli resumes from it
# A run's init file must exist again before it resumes (the trainer builds the model from it before loading the
# state): the configs say how to make it (e.g. scripts/assemble_experts.py --extract).
set -euo pipefail
op=${1:?park or unpark}; run=${2:?run name, e.g. stage28_heavy}
keep=experiments/checkpoints/$run; live=runs/$run
case $op in
  park)
    [ -s "$live/state.safetensors" ] || { echo "no $live/state.safetensors to park" >&2; exit 1; }
    mkdir -p "$keep"
    cp "$live/state.safetensors" "$keep/state.safetensors.tmp" && mv "$keep/state.safetensors.tmp" "$keep/state.safetensors"
    [ -e "$live/log.jsonl" ] && cp "$live/log.jsonl" "$keep/log.jsonl"
    python - "$keep/state.safetensors" <<'PY'
import sys
from safetensors import safe_open
m = safe_open(sys.argv[1], "pt").metadata()
print(f"parked {sys.argv[1]}: step {m['step']} of {m['steps']}")
PY
    ;;
  unpark)
    [ -s "$keep/state.safetensors" ] || { echo "no $keep/state.safetensors to unpark" >&2; exit 1; }
    [ -e "$live/state.safetensors" ] && { echo "$live/state.safetensors exists: not overwritten" >&2; exit 1; }
    mkdir -p "$live"
    cp "$keep/state.safetensors" "$live/state.safetensors"
    [ -e "$keep/log.jsonl" ] && cp "$keep/log.jsonl" "$live/log.jsonl"
    echo "unparked $live/state.safetensors"
    ;;
  *) echo "usage: $0 park|unpark RUN" >&2; exit 2 ;;
esac
