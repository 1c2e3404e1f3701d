"""The light network's mean rain mask over its own training draws, as the light verification's threshold was fitted.

The light routing is verified by the light network's own mask (``verify_light_mask``, fitted in stage 41): an image
routed to the light network alone whose mean mask from that network's restoration pass is below the threshold (0.03)
is handed over. Stage 41 fitted it on training data only, as the smallest mean mask over the light network's training
draws: the 200 RainTrainL rain images at native size (0.0486) and 160 synthetic light-streak crops (0.0304). A
retrained light network has another mask estimator; this prints, for each file, where its masks sit on those draws:
the minimum, 1st percentile and median over the RainTrainL rain images and over 160 synthetic light-streak crops
(256 px, classic style, seed 7, over the clean photos and the RainTrainL ground truths), the smallest of both floored to
three decimals, and for reference only (never fitted on) the same over the real photos and 60 rain-free clean photos.
The RainTrainL figure reproduces stage 41's (0.0486 for the shipped network); the crops do not reproduce its draw
(their minimum is 0.0466 for the shipped network, not 0.0304), so compare files with one another, not with 0.03.

  python experiments/light_mask_floor.py FILE [FILE ...] [--threads 2] [--crops 160] [--seed 7] [--real-only]
      [--reference-only] [--json OUT.json]

--reference-only skips the training draws (only the real and rain-free photos: how a network's mask scale moved
where the verification sits); --json also writes every figure printed, per file, for scripts to read.

FILE is a full model file (a network-scope model, e.g. the shipped one or a light network assembled onto it).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cliprpn_core.arch import EXPERTS  # noqa: E402
from cliprpn_core.checkpoint import load_model  # noqa: E402
from cliprpn_core.data import SyntheticSource  # noqa: E402
from cliprpn_core.imageio import images_under, read_image  # noqa: E402
from cliprpn_core.inference import Derainer, DerainOptions  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LIGHT = EXPERTS.index("light_streaks")


def light_mask_means(d: Derainer, images) -> list[float]:
    """The light network's mean rain mask from its restoration pass on each image (forced, unverified, at the
    default working size, as the verification computes it)."""
    opts = DerainOptions(expert=LIGHT, verify=False)
    out = []
    with torch.no_grad():
        for x in images:
            out.append(float(d.derain(x[None], opts).masks.mean()))
    return out


def light_crops(data: Path, n: int, seed: int):
    """The synthetic light-streak crops the threshold was fitted on: ``n`` 256-px crops, classic style, over the clean
    photos and the RainTrainL ground truths (the light network's synthetic training draws) -> RainSample."""
    src = SyntheticSource([data / "clean", data / "rain100l_train" / "gt"], regime_probs=(1.0, 0.0, 0.0, 0.0))
    return src.batch(n, 256, torch.Generator().manual_seed(seed), "cpu")


def floor3(v: float) -> float:
    return math.floor(v * 1000) / 1000


def stats(vals: list[float]) -> dict:
    s = sorted(vals)
    return {"n": len(s), "min": s[0], "pct1": s[max(0, len(s) // 100 - 1)], "median": statistics.median(s)}


def summary(vals: list[float]) -> str:
    t = stats(vals)
    return f"n {t['n']}, min {t['min']:.4f}, 1st pct {t['pct1']:.4f}, median {t['median']:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crops", type=int, default=160)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--real-only", action="store_true",
                    help="only each real photo's mean light mask, one line per photo and one column per file (how "
                         "near the verification's threshold each photo sits)")
    ap.add_argument("--reference-only", action="store_true",
                    help="skip the training draws: only the real and rain-free photos' summaries")
    ap.add_argument("--json", help="also write the figures to this JSON file ({file: {set: {n, min, pct1, median}}}, "
                                   "plus 'floor' without --reference-only)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = Path(a.data)
    real_files = images_under(data / "real_rain")
    real = [read_image(f) for f in real_files]
    if a.real_only:
        cols = [light_mask_means(Derainer(load_model(f)), real) for f in a.files]
        print("photo " + " ".join(a.files))
        for i, p in enumerate(real_files):
            print(p.name + " " + " ".join(f"{c[i]:.4f}" for c in cols))
        return 0
    ref_only = a.reference_only
    train = [] if ref_only else [read_image(f) for f in images_under(data / "rain100l_train" / "rain")]
    crops = None if ref_only else light_crops(data, a.crops, a.seed).rainy
    clean = [read_image(f) for f in images_under(data / "clean")][:60]
    out = {}
    for f in a.files:
        d = Derainer(load_model(f))
        res = out[f] = {}
        print(f"{f}")
        if not ref_only:
            tr, sy = light_mask_means(d, train), light_mask_means(d, crops)
            res.update(train_pairs=stats(tr), synthetic_crops=stats(sy), floor=floor3(min(tr + sy)))
            print(f"  RainTrainL rain images (native size): {summary(tr)}")
            print(f"  synthetic light-streak crops (256 px, seed {a.seed}): {summary(sy)}")
            print(f"  smallest over both, floored to 3 decimals: {res['floor']:.3f}")
        rl, cl = light_mask_means(d, real), light_mask_means(d, clean)
        res.update(real_photos=stats(rl), rain_free_photos=stats(cl))
        print(f"  for reference, not fitted on: real photos {summary(rl)}; rain-free clean photos {summary(cl)}",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
