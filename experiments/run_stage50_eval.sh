#!/usr/bin/env bash
# A network stage's evaluation by its rule (written for stage 50, experiments/stage50_light_half_second.toml): the stage's
# network assembled as the light-streaks (or E) network of the shipped file, each part against the shipped file.
# Usage: experiments/run_stage50_eval.sh [rule|quality|speed|curve|full]...   (default: rule curve)
#   rule   quality, then speed
#   quality Rain100L + heavy_test routed (the rule's first two parts: the others are worth running only if they pass),
#          the rain-free pairs, both synthetic sets, the real photos (which outputs change, which photos the light
#          verification hands over, by each model) with a contact sheet of the changed ones
#   speed  the network's path's speed (run it with nothing else running) and every network's FLOPs per pixel
#   curve  the network alone (forced) on CURVE_SET at its 1,000 / 2,000 / 3,000-step snapshots (--expert $E;
#          STEPS overrides the steps)
#   full   every figure the model card gives (--experts --check --self-ensemble)
# Another light-network stage: R=runs/stage51_light O=runs/stage51_cmp STEPS="1000 2000" experiments/run_stage50_eval.sh
# Another network: E names it (default light_streaks; it is assembled as that network, speed times its path, curve
# scores it forced) and CURVE_SET the set its curve is scored on (default rain100l), e.g.
#   E=heavy_streaks CURVE_SET=heavy_test R=runs/stage52_heavy O=runs/stage52_cmp experiments/run_stage50_eval.sh
set -euo pipefail
R=${R:-runs/stage50_light}; O=${O:-runs/stage50_cmp}; E=${E:-light_streaks}
# S: the file compared against (default: the shipped one); M: the file judged (default: R's network assembled onto S)
S=${S:-models/clip_rpn_default.safetensors}; M_GIVEN=${M:-}; M=${M:-$O/routed_final.safetensors}
mkdir -p $O
# M is made when a part needs it (not for the curve alone, which may run mid-training), and made again when the run's
# network is newer than it
need_m() {
  if [ ! -e $M ] || { [ -z "${M_GIVEN:-}" ] && [ $R/model.safetensors -nt $M ]; }; then
    python scripts/assemble_experts.py --base $S --expert $E=$R/model.safetensors -o $M
  fi
}
parts=${*:-rule curve}; parts=${parts//rule/quality speed}
for part in $parts; do
  case $part in
    quality)
      need_m
      python -m benchmarks.evaluate $M --sets rain100l heavy_test --threads 2 | tee $O/routed_final.txt
      experiments/scratch_sets.sh clean synthetic
      python -m benchmarks.evaluate $M --data runs --sets cleanpairs --threads 2 | tee $O/clean_final.txt
      for style in classic downpour; do
        python -m benchmarks.synthetic_regimes $S $M --set runs/synth_$style --threads 2 \
          | tee $O/synthetic_${style}_final.txt
      done
      python experiments/compare_real_outputs.py $S $M --threads 2 | tee $O/real_compare.txt
      changed=$(sed -n 's/^identical [0-9]*, different [0-9]*: //p' $O/real_compare.txt)
      if [ -n "$changed" ]; then
        python scripts/make_contact_sheet.py $S $M --labels "previous model" "new model" --names $changed \
          --out $O/changed_final.jpg --threads 2 | tee $O/changed_final.txt
      fi ;;
    speed)
      need_m
      python experiments/speed_alternating.py $S $M --rounds 3 --expert $E | tee $O/speed_$E.txt
      for f in $S $M; do  # parameters and FLOPs per pixel of each network (light first)
        python -m benchmarks.speed --checkpoint $f --flops-only
      done | tee $O/flops.txt ;;
    curve)
      for step in ${STEPS:-1000 2000 3000}; do
        C=$O/routed_$step.safetensors
        [ -e $C ] || python scripts/assemble_experts.py --base $S --expert $E=$R/model_step$step.safetensors -o $C
        python -m benchmarks.evaluate $C --sets ${CURVE_SET:-rain100l} --expert $E --threads 2 | tee $O/curve_$step.txt
      done ;;
    full)
      need_m
      python -m benchmarks.evaluate $M --sets rain100l heavy_test --experts --check --self-ensemble --threads 2 \
        --json $O/full.json | tee $O/full.txt ;;
    *) echo "unknown part $part (rule quality speed curve full)" >&2; exit 2 ;;
  esac
done
