#!/usr/bin/env bash
# Stage 62: stage 60's light network judged again, on a light verification re-fitted to its own masks (no training).
# Stage 60 (experiments/stage60_light_large_crops.toml; its network experiments/checkpoints/stage60_light/, sha256
# 41100e9dd6f5db0a...) passed every quality part of its rule but one: the real photos handed over, 21 against 15-19
# (005, 024, 030, 034 moved from shared to handed over; 023 from kept to shared). Its light mask is lower on those
# photos. The verification's thresholds are in the light network's mask units and were fitted to the shipped light
# network's masks on its training draws (verify_light_mask 0.03, stage 41: the smallest mean mask over them; the ramp's
# end 0.04, stage 54: below the smallest, 0.0466-0.0486), so a network whose masks run lower or higher needs them
# re-fitted the same way. The re-fit, fixed before the masks were measured: s = the smallest mean light mask over both
# training draws of experiments/light_mask_floor.py (the 200 RainTrainL rain images and the 160 synthetic light-streak
# crops; the 'min' figures it prints) for stage 60's network divided by the same for the shipped light network; the
# re-fitted thresholds are 0.03*s and 0.04*s, rounded to 4 decimals (verify_heavy_mask unchanged). The real photos and
# the rain-free photos the script also prints are not fitted on. This re-fit was motivated by stage 60's failure on
# the handover count, as stage 54's ramp was by stage 51's failure on one photo.
#   python experiments/light_mask_floor.py models/clip_rpn_default.safetensors runs/stage60_cmp/routed_final.safetensors
#     --threads 2 > runs/stage60_floor.txt
# Ship rule, written before the re-fit was computed or evaluated (2026-12-07; stage 60's rule unchanged, against the
# shipped chain stage 28: Rain100L routed 38.205, heavy_test 28.968, rain-free pairs 47.034): Rain100L routed >= 38.245;
# heavy_test routed >= 28.948; rain-free pairs >= 46.834; the synthetic light regime of both sets no more than 0.05
# below the shipped file's and 'all' no more than 0.03 below; between 15 and 19 real photos handed over, and on the
# contact sheet of the photos whose outputs change clearly worse on none (by eye); the light path's full-size time at
# most 1.10x the shipped file's (medians of three alternating rounds; stage 60 did not run it) and its FLOPs per pixel
# at most 234.8 k (the architecture is stage 51's).
#
# Usage: experiments/run_stage62_refit.sh [quality] [speed]   (O=runs/stage62_cmp; needs runs/stage60_floor.txt)
set -euo pipefail
S=models/clip_rpn_default.safetensors
N=experiments/checkpoints/stage60_light/model.safetensors
O=runs/stage62_cmp; mkdir -p $O; M=$O/routed_final.safetensors
F=runs/stage60_floor.txt
read -r T B < <(python - "$F" "$S" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.split(r"^(?=\S)", text, flags=re.M)
mins = {}
for b in blocks:
    lines = b.splitlines()
    if not lines or not lines[0].endswith(".safetensors"):
        continue
    vals = [float(v) for l in lines[1:3] for v in re.findall(r"min ([0-9.]+)", l)]
    mins[lines[0].strip()] = min(vals)
shipped = mins.pop(sys.argv[2])
(new,) = mins.values()
s = new / shipped
print(f"{round(0.03 * s, 4)} {round(0.04 * s, 4)}")
print(f"smallest light mask over the training draws: shipped {shipped:.4f}, stage 60 {new:.4f}, s = {s:.4f}",
      file=sys.stderr)
PY
)
echo "re-fitted verification: verify_light_mask $T, verify_light_ramp $B" | tee $O/refit.txt
[ -e $M ] || python scripts/assemble_experts.py --base $S --expert light_streaks=$N \
  --verify-light-mask $T --verify-light-ramp $B -o $M
S=$S M=$M O=$O E=light_streaks exec experiments/run_stage50_eval.sh "${@:-quality}"
