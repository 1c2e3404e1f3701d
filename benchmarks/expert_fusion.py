"""Measure per-pixel fusion of the two streak experts against the expert check, on training data.

The expert check (Derainer.derain(check=True)) keeps one of the two streak experts per image. This script asks
whether blending their outputs pixel by pixel does better, with weights the model can compute without the clean
image: w = the heavy expert's share, o = (1 - w) * light output + w * heavy output, where w comes from

- ``avg a``: a constant a;
- ``pix g s``: the model's residual rain mask on the light output minus the one on the heavy output, times g,
  clipped to 0..1, Gaussian-blurred by s px (take the heavy output where the light one leaves rain it removed);
- ``inmask g s``: the model's rain mask of the input, times g, clipped, blurred (heavy output where the rain is).

Each rule is applied either to every image the check looks at ("fuse all") or only to those the check keeps
with the light expert ("check, then fuse": the check's switches to the heavy expert stay whole-image).
Images whose two best-ranked experts are not both streak experts keep their top-1 output in every row, as at
run time. The calibration sets are benchmarks/routing_check.py's (common.calibration_sets, training data only); a rule would be
adopted only if the mean of the four set means beats the check at inference.CHECK_RATIO by at least 0.10 dB.
--report adds test sets as rows that play no part in that choice.

  python -m benchmarks.expert_fusion [CKPT] [--n 16] [--size 256] [--report rain100l heavy_test]

Protocol Y-PSNR (metrics.psnr_y) on 8-bit-rounded outputs held in memory: a diagnostic, not a benchmark figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cliprpn_core.checkpoint import load_model
from cliprpn_core.imageio import list_images, load_rgb_uint8, read_image, to_uint8
from cliprpn_core.inference import (
    CHECK_EXPERTS,
    CHECK_RATIO,
    Derainer,
    DerainOptions,
    check_candidates,
    check_choice,
)
from cliprpn_core.metrics import psnr_y

from .common import calibration_args, calibration_sets

LIGHT, HEAVY = CHECK_EXPERTS


def gaussian_blur(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a [H,W] map (replicate padding)."""
    if sigma <= 0:
        return w
    r = int(3 * sigma)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    w = F.conv2d(F.pad(w[None, None], (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    w = F.conv2d(F.pad(w, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return w[0, 0]


def measure(d: Derainer, rainy: torch.Tensor, clean: np.ndarray) -> dict:
    """One image: top-1 Y-PSNR, and for a checked image both streak outputs with the maps the rules need."""
    probs, _ = d.perceive(rainy)
    _, ranking = d.route_and_rank(probs)
    (cands,) = check_candidates(torch.zeros_like(ranking), ranking)
    row = {"cands": cands, "clean": clean}
    if len(cands) == 1:
        row["top1"] = psnr_y(to_uint8(d.derain(rainy, DerainOptions(expert=cands[0])).images[0]), clean)
        return row
    row["m_in"] = d.estimate_mask(rainy)[0, 0]
    for e in (LIGHT, HEAVY):
        out = d.derain(rainy, DerainOptions(expert=e)).images[0]
        row[e] = {"out": out, "res": d.estimate_mask(out[None])[0, 0], "psnr": psnr_y(to_uint8(out), clean)}
    row["top1"] = row[cands[0]]["psnr"]
    return row


def check_pick(row: dict, ratio: float = CHECK_RATIO) -> int:
    c = row["cands"]
    return c[check_choice([float(row[e]["res"].mean()) for e in c], ratio)]


def weight(row: dict, kind: str, g: float, s: float) -> torch.Tensor | float:
    if kind == "avg":
        return g
    if kind == "pix":
        w = (row[LIGHT]["res"] - row[HEAVY]["res"]) * g
    else:  # inmask
        w = row["m_in"] * g
    return gaussian_blur(w.clamp(0, 1), s)


def rule_psnr(row: dict, rule) -> float:
    if "m_in" not in row:  # not checked: top-1 in every rule
        return row["top1"]
    mode, kind, g, s = rule
    if mode == "check":
        return row[check_pick(row)]["psnr"]
    if mode == "check+fuse" and check_pick(row) == HEAVY:
        return row[HEAVY]["psnr"]
    w = weight(row, kind, g, s)
    return psnr_y(to_uint8(row[LIGHT]["out"] * (1 - w) + row[HEAVY]["out"] * w), row["clean"])


RULES = [("check", None, 0, 0)] + [
    (mode, kind, g, s) for mode in ("fuse all", "check+fuse") for kind, g, s in
    [("avg", 0.25, 0), ("avg", 0.5, 0)]
    + [("pix", g, s) for g in (5, 10, 20) for s in (2, 5)]
    + [("inmask", g, s) for g in (1, 2, 4) for s in (0, 3)]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    calibration_args(ap)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = Derainer(load_model(a.checkpoint))
    data = Path(a.data)
    rows = {}
    for name, imgs in calibration_sets(data, a.n, a.size, a.seed):
        rows[name] = [measure(d, r, c) for r, c, _ in imgs]
        print(f"measured {name}: {len(imgs)} images", file=sys.stderr, flush=True)
    calib = list(rows)
    for name in a.report:
        root = data / name
        rows[f"{name} (report)"] = [measure(d, read_image(f), load_rgb_uint8(root / "gt" / f.name))
                                    for f in list_images(root / "rain")]
    print(f"{a.checkpoint}: mean Y-PSNR per set; calibration = mean of the {len(calib)} training-data set means")
    print("| rule | calibration | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 2) + "|")
    top1 = {k: np.mean([r["top1"] for r in v]) for k, v in rows.items()}
    print("| top-1 (no check) | " + f"{np.mean([top1[k] for k in calib]):.2f} | "
          + " | ".join(f"{top1[k]:.2f}" for k in rows) + " |")
    for rule in RULES:
        means = {k: np.mean([rule_psnr(r, rule) for r in v]) for k, v in rows.items()}
        mode, kind, g, s = rule
        label = f"check (ratio {CHECK_RATIO:g})" if mode == "check" else f"{mode}: {kind} {g:g}" + (
            f", blur {s:g}" if kind != "avg" else "")
        print(f"| {label} | {np.mean([means[k] for k in calib]):.2f} | "
              + " | ".join(f"{means[k]:.2f}" for k in rows) + " |", flush=True)


if __name__ == "__main__":
    main()
