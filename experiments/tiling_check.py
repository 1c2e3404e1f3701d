"""How much the automatic CPU tiling changes outputs: Rain100L test pairs enlarged 2x (bicubic, 962x642, so the
Derainer tiles them by its CPU tile) restored tiled (the default) and whole, each scored against the enlarged ground
truth (Y-PSNR on 8-bit outputs), and the two outputs against each other (Y-PSNR and the largest 8-bit difference). A diagnostic on enlarged images, not a
protocol figure.

  python experiments/tiling_check.py [--checkpoint CKPT] [--n 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATA, DEFAULT_CHECKPOINT  # noqa: E402
from cliprpn_core import Derainer, DerainOptions, load_model  # noqa: E402
from cliprpn_core.imageio import list_images, to_uint8  # noqa: E402
from cliprpn_core.metrics import psnr_y  # noqa: E402


def enlarged(path: Path) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    return np.array(im.resize((im.width * 2, im.height * 2), Image.BICUBIC))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = Derainer(load_model(a.checkpoint))
    rows = []
    for f in list_images(DATA / "rain100l" / "rain")[: a.n]:
        rain, gt = enlarged(f), enlarged(DATA / "rain100l" / "gt" / f.name)
        x = torch.from_numpy(rain).permute(2, 0, 1)[None].float() / 255
        outs, secs = [], []
        for opt in (DerainOptions(work_side=0), DerainOptions(tile=0, work_side=0)):  # at full size: tiled, whole
            t = time.perf_counter()
            outs.append(to_uint8(d.derain(x, opt).images[0]))
            secs.append(time.perf_counter() - t)
        diff = int(np.abs(outs[0].astype(int) - outs[1]).max())
        rows.append((psnr_y(outs[0], gt), psnr_y(outs[1], gt), psnr_y(outs[0], outs[1]), *secs, diff))
        print(f"{f.stem}: tiled {rows[-1][0]:.3f} whole {rows[-1][1]:.3f} tiled-vs-whole {rows[-1][2]:.2f} dB, "
              f"largest difference {diff}/255 ({secs[0]:.2f} s / {secs[1]:.2f} s)", flush=True)
    r = np.array(rows)
    print(f"mean over {len(rows)} (tile {d.auto_tile(None, *x.shape[-2:])}): tiled {r[:, 0].mean():.3f} dB, whole "
          f"{r[:, 1].mean():.3f} dB, tiled vs whole {r[:, 2].mean():.2f} dB, largest difference {int(r[:, 5].max())}/255; "
          f"seconds per image tiled {r[:, 3].mean():.2f}, whole {r[:, 4].mean():.2f}")


if __name__ == "__main__":
    main()
