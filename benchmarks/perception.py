"""Accuracy of the built-in pattern head (and of the router's expert choice) on held-out
synthetic labels: rain drawn with a seed never used in training, per attribute.

  python -m benchmarks.perception [--checkpoint CKPT] [--n 512] [--style classic|downpour|mixed|calibrated]

``--style`` draws the rain as ``synthesis.synthesize`` does with that style: "downpour" renders every heavy-rain
image as a photographed-style downpour (streaks at three depths, uneven accumulation), the others as "classic".
"""
from __future__ import annotations

import argparse
import json

import torch

from cliprpn_core import load_model, pattern_probs
from cliprpn_core.data import SyntheticSource, random_crops
from cliprpn_core.patterns import ATTRIBUTES, NUM_CLASSES
from cliprpn_core.synthesis import STYLES, synthesize

from .common import DATA, DEFAULT_CHECKPOINT


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=987654)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--style", default="classic", choices=STYLES, help="synthesis style of the held-out rain")
    a = ap.parse_args(argv)
    if a.n < 32:
        ap.error("--n must be at least 32 (images are drawn in batches of 32)")
    torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint)
    src = SyntheticSource([DATA / "clean"], min_side=a.size)
    g = torch.Generator().manual_seed(a.seed)
    correct = torch.zeros(len(ATTRIBUTES))
    route_ok, n = 0, 0
    conf = torch.zeros(4, 4, dtype=torch.long)
    with torch.no_grad():
        for _ in range(a.n // 32):
            clean = random_crops(src.images, 32, a.size, g, "cpu", (0.5, 1.0))
            s = synthesize(clean, g, style=a.style)
            logits = model.perceive(s.rainy)
            pred = torch.stack([c.argmax(-1) for c in logits.split(list(NUM_CLASSES), -1)], 1)
            correct += (pred == s.labels).float().sum(0)
            chosen = model.router(pattern_probs(logits)).argmax(-1)
            route_ok += int((chosen == s.expert).sum())
            for t, p in zip(s.expert.tolist(), chosen.tolist()):
                conf[t, p] += 1
            n += 32
    res = {"images": n, "style": a.style, "accuracy": {k: round(float(c) / n, 4) for k, c in zip(ATTRIBUTES, correct)},
           "chance": {k: round(1 / len(v), 3) for k, v in ATTRIBUTES.items()},
           "router_expert_accuracy": round(route_ok / n, 4), "router_confusion_rows_true_cols_chosen": conf.tolist()}
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
