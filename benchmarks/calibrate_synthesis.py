"""Compare the statistics of (rain - clean) of synthetic rain with those of the real training
pairs in ../shared/data (never a test set), and draw the histograms.

  python -m benchmarks.calibrate_synthesis [--out docs/calibration.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cliprpn_core.data import PairedSource, SyntheticSource, random_crops
from cliprpn_core.plotting import line_chart
from cliprpn_core.synthesis import STYLES, rain_layer_stats, synthesize

from .common import DATA, ROOT

BINS = np.linspace(-0.05, 0.8, 35)


def hist(rainy, clean):
    d = (rainy - clean).mean(1).flatten().numpy()
    h, _ = np.histogram(d, bins=BINS, density=True)
    return h.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "calibration.png"))
    ap.add_argument("--n", type=int, default=48)
    a = ap.parse_args()
    torch.manual_seed(0)
    pairs = PairedSource([DATA / "train_pairs_small", DATA / "heavy_train"], min_side=128)
    light_idx = [i for i, h in enumerate(pairs.heavy) if not h]
    heavy_idx = [i for i, h in enumerate(pairs.heavy) if h]
    real = {}
    for name, idx in (("real light (Rain200L train pairs)", light_idx), ("real heavy (heavy_train, RainTrainH, Rain200H)", heavy_idx)):
        r = torch.cat([pairs.rain[i].float().flatten(1) for i in idx], 1)[None, :, :, None] / 255
        c = torch.cat([pairs.gt[i].float().flatten(1) for i in idx], 1)[None, :, :, None] / 255
        real[name] = (r, c)
    clean = SyntheticSource([DATA / "clean"], min_side=256)
    g = torch.Generator().manual_seed(0)
    crops = random_crops(clean.images, a.n, 256, g, "cpu", (0.5, 1.0))
    syn = {}
    for style in STYLES:
        for reg, name in ((0, "light_streaks"), (1, "heavy_streaks")):
            syn[f"synthetic {name} ({style})"] = synthesize(crops, torch.Generator().manual_seed(reg), regime=[reg] * a.n,
                                                            style=style)
    stats, series = {}, {}
    for k, (r, c) in real.items():
        stats[k] = rain_layer_stats(r, c)
        series[k] = hist(r, c)
    for k, s in syn.items():
        stats[k] = rain_layer_stats(s.rainy, s.clean)
        series[k] = hist(s.rainy, s.clean)
    print(json.dumps({k: {m: round(v, 4) for m, v in d.items()} for k, d in stats.items()}, indent=2))
    im = line_chart({k: [v + 1e-4 for v in s] for k, s in series.items()}, width=980, height=420,
                    title="histogram density of mean(rain - clean) per pixel (log scale)",
                    x_label=f"rain - clean, {BINS[0]:.2f} .. {BINS[-1]:.2f} in {len(BINS) - 1} bins")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    im.save(a.out)
    print("figure:", a.out)


if __name__ == "__main__":
    main()
