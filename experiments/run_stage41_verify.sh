#!/usr/bin/env bash
# Stage 41: the light routing verified by the light network's own rain mask (no training; the shipped weights).
# Perception sends photographed downpours and rain haze to the light network (40 of the 50 real photos), which leaves
# them in place; teaching perception or the light network downpours failed (stages 33, 40: the light network lost
# 0.28 dB on Rain100L at 1,000 steps with 15 % downpours). But the light network's mask estimator recognises the rain
# it learned: its mean rain mask over an image is at least 0.0486 on every RainTrainL training pair (native size),
# at least 0.0304 on 160 synthetic light-streak training crops (256 px, `SyntheticSource`, seed 7; the light network's
# other training data), and 0.0445 on Rain100L, but the median real photo gets 0.034 and rain-free photos 0.015
# (runs/ scratch: the shipped model's masks over these sets; the heavy network's mask fires on rain-free textures
# (clean photos: median 0.11, max 0.45), so it does not tell rain from no rain and is not used). The rule, fitted on
# training data only: an image perception routes to the light network alone whose light-network mask mean is below
# 0.030 (the smallest over the light network's training draws) goes to the heavy network instead. The mask comes
# from the light network's own restoration pass, so an image it keeps costs nothing more; an image it hands over is
# restored twice. Written into the shipped file's config (`verify_light_mask = 0.03`; weights unchanged) by
# `python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --verify-light-mask 0.03 -o F`.
# Ship rule, written before the evaluation (2026-12-06; Rain100L is the development set; against the shipped chain
# stage 20: Rain100L routed 38.020, heavy_test 28.444, synthetic all 30.29 with light / heavy / drops / veil 34.97 /
# 23.84 / 24.68 / 26.64): the real-photo contact sheet (input | shipped | verified; 001 002 009 011 013 014 019 022 026
# 029 036 043, and every photo the rule hands over) judged by eye: clearly better on at least three photos, clearly
# worse on none; routed Rain100L >= 38.000; heavy_test routed >= 28.424; synthetic 'all' >= 30.26 with no regime more
# than 0.15 dB below the shipped model's; the default path's CPU time on an image the light network keeps unchanged
# (at most 1.06x the shipped file's by experiments/speed_alternating.py, three rounds).
# Usage: experiments/run_stage41_verify.sh [THREADS]
set -euo pipefail
T=${1:-2}; O=runs/stage41_cmp; mkdir -p $O; F=$O/verified.safetensors
python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --verify-light-mask 0.03 -o $F
python -m benchmarks.evaluate $F --sets rain100l heavy_test --threads $T | tee $O/routed.txt
python -m benchmarks.synthetic_regimes $F --threads $T | tee $O/synthetic.txt
python scripts/make_contact_sheet.py models/clip_rpn_default.safetensors $F --labels "previous model" "new model" \
  --names 001 002 009 011 013 014 019 022 026 029 036 043 --out $O/contact.jpg --threads $T
python experiments/speed_alternating.py models/clip_rpn_default.safetensors $F --rounds 3 | tee $O/speed.txt
