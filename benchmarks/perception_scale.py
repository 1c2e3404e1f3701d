"""Does routing hold when a photo is larger than the images perception was tuned on?

Every evaluation set here is 481 x 321 (0.15 MP); a user's photo is often 12 MP or more, with its rain drawn
proportionally larger. This script upscales each rainy image of a set by each factor (bicubic, as a larger
photo of the same scene would look: the rain grows with it), routes it as a user's call would
(``Derainer.perceive``, which sees an image above the working size at it, then the router's top-1), and prints, per
set and factor, how many
images go to each expert and how many go where they went at the native size. Perception only; nothing is derained.

  python -m benchmarks.perception_scale [--checkpoint CKPT] [--sets rain100l heavy_test real_rain]
                                        [--factors 1 2 3 4] [--threads 2] [--json FILE]

Sets are folders under ../shared/data with a rain/ sub-folder (paired sets) or images directly (real_rain).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cliprpn_core.checkpoint import load_model
from cliprpn_core.imageio import list_images, read_image
from cliprpn_core.inference import Derainer, split_channels
from cliprpn_core.patterns import EXPERTS

from .common import DATA, DEFAULT_CHECKPOINT, upscaled


def set_images(name: str) -> list[Path]:
    root = DATA / name
    folder = root / "rain" if (root / "rain").is_dir() else root
    if not folder.is_dir():
        raise SystemExit(f"no data set '{name}' under {DATA}: name folders that exist there "
                         "(e.g. rain100l, heavy_test, real_rain)")
    return list_images(folder)


def route_at(derainer: Derainer, image: torch.Tensor, factor: float) -> int:
    x = split_channels(image[None].float())[0]
    if factor != 1:
        x = upscaled(x, factor)
    probs, _ = derainer.perceive(x)
    return int(derainer.route(probs)[0].argmax())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--sets", nargs="+", default=["rain100l", "heavy_test", "real_rain"])
    ap.add_argument("--factors", nargs="+", type=float, default=[1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    if a.factors[0] != 1:
        a.factors = [1.0] + [f for f in a.factors if f != 1]  # agreement is counted against the native size
    torch.set_num_threads(a.threads)
    derainer = Derainer(load_model(a.checkpoint))
    result = {"checkpoint": a.checkpoint, "factors": a.factors, "sets": {}}
    for name in a.sets:
        files = set_images(name)
        t = time.perf_counter()
        chosen = {f: [] for f in a.factors}
        for path in files:
            image = read_image(path)
            for f in a.factors:
                chosen[f].append(route_at(derainer, image, f))
        native = chosen[a.factors[0]]
        rows = {}
        for f in a.factors:
            counts = {e: chosen[f].count(i) for i, e in enumerate(EXPERTS) if chosen[f].count(i)}
            same = sum(p == q for p, q in zip(chosen[f], native))
            rows[f"x{f:g}"] = {"experts": counts, "as_native": same}
            print(f"{name:12s} x{f:<4g} {len(files)} images  " + "  ".join(f"{e} {n}" for e, n in counts.items())
                  + f"  | as at x1: {same}/{len(files)}", flush=True)
        result["sets"][name] = {"images": len(files), "by_factor": rows, "seconds": round(time.perf_counter() - t, 1)}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
