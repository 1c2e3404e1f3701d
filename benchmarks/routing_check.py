"""Calibrate and measure the expert check (Derainer.derain(check=True)) on training data.

For every image the router's two best-ranked experts restore it; the model's own mask estimator measures
the rain left in each output (Derainer residual rain), and the script prints, for each ratio t of a grid,
the mean Y-PSNR when the runner-up is kept only where its output carries less than t times the first one's
residual rain (inference.check_choice; as at run time, only when both are streak experts), next to never checking (the router's top-1) and the per-image
best of the two (needs the clean image: a bound, not a method). The ratio with the best mean over the
calibration sets (mean of the per-set means) is printed last; inference.CHECK_RATIO is set from it.

Calibration sets, all training data (../shared/data): the real training pairs (heavy_train,
train_pairs_small, whole images), their light and heavy rain layers over crops of the clean photos turned
by -40..40 degrees (as benchmarks/expert_probe.py; common.calibration_sets), and synthetic rain over the clean photos.
--report SETS adds test sets (e.g. rain100l heavy_test) as extra rows that play no part in the choice.

  python -m benchmarks.routing_check [CKPT] [--n 16] [--size 256] [--seed 0] [--report rain100l heavy_test]

The protocol's Y-PSNR (metrics.psnr_y) on 8-bit-rounded outputs held in memory (the same values as saved
8-bit PNGs); for protocol figures of the checked model use `python -m benchmarks.evaluate --check`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cliprpn_core.checkpoint import load_model
from cliprpn_core.imageio import list_images, load_rgb_uint8, read_image, to_uint8
from cliprpn_core.inference import (
    CHECK_EXPERTS,
    Derainer,
    DerainOptions,
    check_candidates,
    check_choice,
)
from cliprpn_core.metrics import psnr_y

from .common import calibration_args, calibration_sets

RATIOS = [round(0.3 + 0.05 * i, 2) for i in range(15)]  # 0.30 .. 1.00


def measure(d: Derainer, rainy: torch.Tensor, clean_u8: np.ndarray) -> dict:
    """One image [3,H,W]: the check's two candidates with their residual rain and Y-PSNR."""
    probs, _ = d.perceive(rainy)
    _, ranking = d.route_and_rank(probs)
    (cands,) = check_candidates(torch.zeros_like(ranking), ranking, among=None)
    # the runtime checks only the streak experts; the others are measured to show why
    row = {"experts": cands, "checked": all(e in CHECK_EXPERTS for e in cands), "residual": [], "psnr": []}
    for e in cands:
        out = d.derain(rainy, DerainOptions(expert=e)).images[0]
        row["residual"].append(float(d.residual_rain(out[None], None, 0)))  # as derain's check measures it
        row["psnr"].append(psnr_y(to_uint8(out), clean_u8))
    return row


def decide(row: dict, t: float, every_pair: bool = False) -> int:
    """The candidate derain(check=True, check_ratio=t) keeps (every_pair: as if any two experts were compared)."""
    return check_choice(row["residual"], t) if every_pair or row["checked"] else 0


def summarize(rows: list[dict], every_pair: bool = False) -> dict:
    p = np.array([r["psnr"] for r in rows])
    out = {"top1": p[:, 0].mean(), "best": p.max(1).mean(), "n": len(rows)}
    for t in RATIOS:
        out[t] = np.mean([r["psnr"][decide(r, t, every_pair)] for r in rows])
        out[f"switched@{t}"] = sum(decide(r, t, every_pair) != 0 for r in rows)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    calibration_args(ap)
    ap.add_argument("--json", help="write every image's candidates, residual rain and Y-PSNR here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = Derainer(load_model(a.checkpoint))
    data = Path(a.data)
    if a.n < 1 or a.size % d.multiple:
        ap.error(f"--n must be >= 1 and --size a multiple of {d.multiple}")
    results, rows = {}, {}
    for name, imgs in calibration_sets(data, a.n, a.size, a.seed):
        rows[name] = [dict(measure(d, r, c), label=lab) for r, c, lab in imgs]
        results[name] = summarize(rows[name])
        print(f"measured {name}: {len(imgs)} images", file=sys.stderr, flush=True)
    calib = list(results)
    for name in a.report:
        root = data / name
        rows[name] = [dict(measure(d, read_image(f), load_rgb_uint8(root / "gt" / f.name)), name=f.stem)
                      for f in list_images(root / "rain")]
        results[f"{name} (test, report only)"] = summarize(rows[name])
    print(f"{a.checkpoint}: mean Y-PSNR, router top-1 vs expert check at ratio t (images switched to the runner-up)")
    print("| set | n | top-1 | " + " | ".join(f"t={t:g}" for t in RATIOS) + " | best of two |")
    print("|---" * (len(RATIOS) + 4) + "|")
    for name, s in results.items():
        print(f"| {name} | {s['n']} | {s['top1']:.2f} | "
              + " | ".join(f"{s[t]:.2f} ({s[f'switched@{t}']})" for t in RATIOS) + f" | {s['best']:.2f} |")
    mean = {t: np.mean([results[k][t] for k in calib]) for t in RATIOS}
    top1 = np.mean([results[k]["top1"] for k in calib])
    best = max(RATIOS, key=lambda t: mean[t])
    print(f"calibration mean of set means: top-1 {top1:.2f}; " + ", ".join(f"t={t:g} {mean[t]:.2f}" for t in RATIOS))
    every = {t: np.mean([summarize(rows[k], every_pair=True)[t] for k in calib]) for t in RATIOS}
    print("the same if any two experts were compared (not only the streak experts): "
          + ", ".join(f"t={t:g} {every[t]:.2f}" for t in RATIOS))
    print(f"best ratio on the calibration sets: {best:g} ({mean[best]:.2f} dB vs top-1 {top1:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
