"""Probe each streak expert on real rain of the training data, turned to other angles and scaled.

The real rain layers (rain - clean) of the training pairs are composited over crops of the clean photos,
turned by each --rotations angle and scaled by each --gains factor; every expert restores the same
images (forced routing) and the script prints the mean Y-PSNR per expert, and on how many images each
expert is the best. Training data only (../shared/data/train_pairs_small, heavy_train, clean): it shows
what an expert learned about the few real layers it was trained on, e.g. whether the light-streaks expert
removes Rain200L-style streaks only at the angles of those layers.

  python -m benchmarks.expert_probe [CKPT] [--layers light|heavy] [--rotations -40 -20 0 20 40]
                                    [--gains 1.0] [--n 16] [--size 256] [--seed 0]

The protocol's Y-PSNR on 8-bit-rounded tensors held in memory, but over crops with composited real rain,
not a test set: a diagnostic, not a benchmark figure.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cliprpn_core.arch import route
from cliprpn_core.checkpoint import load_model
from cliprpn_core.data import RainLayerSource
from cliprpn_core.imageio import to_uint8
from cliprpn_core.metrics import psnr_y
from cliprpn_core.patterns import EXPERTS

from .common import DATA, DEFAULT_CHECKPOINT, probe_batches


def y_psnr_8bit(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image Y-PSNR [B] of 0..1 tensors [B,3,H,W], both rounded to 8 bits, by metrics.psnr_y."""
    return torch.tensor([psnr_y(to_uint8(p), to_uint8(r)) for p, r in zip(pred, ref)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--layers", choices=("light", "heavy"), default="light")
    ap.add_argument("--rotations", type=float, nargs="+", default=[-40, -20, 0, 20, 40])
    ap.add_argument("--gains", type=float, nargs="+", default=[1.0])
    ap.add_argument("--experts", nargs="+", default=["light_streaks", "heavy_streaks"], choices=EXPERTS)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(DATA))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint).eval()
    if a.size % model.config.pad_multiple or a.n % 4:
        ap.error(f"--size must be a multiple of {model.config.pad_multiple} and --n a multiple of 4")
    d = Path(a.data)
    src = RainLayerSource([d / "heavy_train", d / "train_pairs_small"], [d / "clean"], min_side=a.size,
                          only=a.layers, max_rotation=0.0)
    idx = [EXPERTS.index(e) for e in a.experts]
    print(f"{a.checkpoint}: {a.layers} training layers over clean crops, {a.n} images of {a.size} px per setting")
    print("| rotation | gain | input | " + " | ".join(a.experts) + " | best: " + " / ".join(a.experts) + " |")
    print("|---" * (3 + 2 * len(idx)) + "|")
    with torch.no_grad():
        for rot, g, rainy, clean in probe_batches(src, a.n, a.size, a.rotations, a.gains, a.seed):
            res = []
            for e in idx:
                w = route(torch.zeros(a.n, model.config.num_experts), override=e)  # every image to expert e
                res.append(torch.cat([y_psnr_8bit(model.restore(rainy[i:i + 4], w[i:i + 4])[0], clean[i:i + 4])
                                      for i in range(0, a.n, 4)]))
            best = torch.stack(res).argmax(0)
            print(f"| {rot:+.0f} | {g:g} | {y_psnr_8bit(rainy, clean).mean():.2f} | "
                  + " | ".join(f"{r.mean():.2f}" for r in res) + " | "
                  + " / ".join(str(int((best == j).sum())) for j in range(len(idx))) + " |", flush=True)


if __name__ == "__main__":
    main()
