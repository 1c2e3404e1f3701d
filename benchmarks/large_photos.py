"""How well is a photo larger than the training images derained, at full size and at the working size?

Every rainy/clean pair here is 481 x 321. As a stand-in for larger photos, each pair is upscaled by each factor
(bicubic, rain and clean alike: a larger photo of the same scene, its rain drawn larger) and derained twice: with
the default options (the working size, ``inference.WORK_SIDE``: restored at a shorter side of 321 px, the rain
removed there upsampled and taken off the full-size image) and at full size (``work_side = 0``). Prints the mean
Y-PSNR / SSIM of each against the upscaled clean image, and of the input. The metrics are the protocol's (Y channel,
outputs rounded to 8 bits in memory, as saved 8-bit PNGs would be), but the upscaled sets are not a literature
benchmark: the figures compare the two ways of deraining, not this model with published ones.

  python -m benchmarks.large_photos [--checkpoint CKPT] [--sets rain100l_train rain100l] [--factors 2 3] [--n 16]
                                    [--threads 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cliprpn_core import Derainer, DerainOptions, load_model
from cliprpn_core.imageio import list_images, read_image, to_uint8
from cliprpn_core.metrics import psnr_y, ssim_y

from .common import DATA, DEFAULT_CHECKPOINT, upscaled

WAYS = {"working size": DerainOptions(), "full size": DerainOptions(work_side=0)}


def pairs(name: str, n: int) -> list[tuple[Path, Path]]:
    root = DATA / name
    if not (root / "rain").is_dir():
        raise SystemExit(f"no paired set '{name}' (rain/ and gt/) under {DATA}")
    gts = {p.stem: p for p in list_images(root / "gt")}
    out = [(p, gts[p.stem]) for p in list_images(root / "rain") if p.stem in gts]
    return out[:n] if n else out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--sets", nargs="+", default=["rain100l_train", "rain100l"])
    ap.add_argument("--factors", nargs="+", type=float, default=[2.0, 3.0])
    ap.add_argument("--n", type=int, default=16, help="pairs per set, the first in name order (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    d = Derainer(load_model(a.checkpoint))
    result = {"checkpoint": a.checkpoint, "sets": {}}
    for name in a.sets:
        todo = pairs(name, a.n)
        result["sets"][name] = rows = {}
        for k in a.factors:
            t = time.perf_counter()
            scores = {way: [] for way in ("input", *WAYS)}
            for rain_path, gt_path in todo:
                rain, gt = upscaled(read_image(rain_path), k), to_uint8(upscaled(read_image(gt_path), k))
                outs = {"input": rain, **{way: d.derain(rain, opt).images[0] for way, opt in WAYS.items()}}
                for way, img in outs.items():
                    p8 = to_uint8(img)
                    scores[way].append((psnr_y(p8, gt), ssim_y(p8, gt)))
            row = {way: {"psnr": round(sum(p for p, _ in v) / len(v), 3),
                         "ssim": round(sum(s for _, s in v) / len(v), 4)} for way, v in scores.items()}
            row["images"], row["seconds"] = len(todo), round(time.perf_counter() - t, 1)
            rows[f"x{k:g}"] = row
            print(f"{name} x{k:g} ({len(todo)} pairs): " + "  ".join(
                f"{way} {row[way]['psnr']:.3f} / {row[way]['ssim']:.4f}" for way in ("input", *WAYS)), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
