"""Pack the training data for a GPU machine that gets only the repository (64 MiB in all travels).

  python scripts/pack_gpu_data.py [--data ../shared/data] [--out .gpu_data] [--quality 90] [--compact]

Writes OUT/clean/ (the clean photos re-encoded as JPEG, which is what stage 1 of the shipped model trained on)
and OUT/heavy_train/, OUT/train_pairs_small/ (the real pairs, copied as they are: their rain layers are
used pixel for pixel). With --compact the pair sets (also rain100l_train/, the Rain100L training split, which
does not fit otherwise) are written as OUT/<set>/gt/ (JPEG, --gt-quality) and OUT/<set>/layer/ (the rain layer
max(rainy - clean, 0), lossless WebP, pixel for pixel); training reads such a folder as rainy = clean + layer
(data.PairedSource), so the rain is exact and only the background carries JPEG loss. Nothing is written for
test sets. OUT is git-ignored (`.gpu_data/` in .gitignore); name it in the device tool's `carry` and point the
config there, e.g.

  cliprpn train configs/gpu_continue.toml   (its data paths already read .gpu_data/)

Prints the size, which must stay under the transfer limit together with the repository.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cliprpn_core.data import pair_files  # noqa: E402
from cliprpn_core.imageio import images_under, load_rgb_uint8  # noqa: E402

PAIR_SETS = ("heavy_train", "train_pairs_small")
COMPACT_SETS = ("heavy_train", "train_pairs_small", "rain100l_train")


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def pack_compact(src: Path, dst: Path, gt_quality: int) -> int:
    """The pairs under src as dst/gt/NAME.jpg (JPEG at gt_quality) + dst/layer/NAME.webp (the rain layer
    max(rainy - clean, 0), lossless): what data.PairedSource reads back as rainy = clean + layer.
    -> how many channel values had rainy < clean (dropped from the layer)."""
    (dst / "gt").mkdir(parents=True)
    (dst / "layer").mkdir()
    clipped = 0
    for rp, gp in pair_files(src):
        rain, gt = load_rgb_uint8(rp).astype(np.int16), load_rgb_uint8(gp).astype(np.int16)
        clipped += int((rain < gt).sum())
        Image.fromarray(gt.astype(np.uint8)).save(dst / "gt" / (rp.stem + ".jpg"), quality=gt_quality)
        Image.fromarray(np.clip(rain - gt, 0, 255).astype(np.uint8)).save(
            dst / "layer" / (rp.stem + ".webp"), lossless=True, quality=100, method=6)
    return clipped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / ".gpu_data"))
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--compact", action="store_true",
                    help="pairs as JPEG clean + lossless rain layer (adds rain100l_train)")
    ap.add_argument("--gt-quality", type=int, default=90, help="JPEG quality of the clean images of --compact pairs")
    ap.add_argument("--limit-mb", type=float, default=48.0, help="fail if the pack is larger than this")
    a = ap.parse_args(argv)
    data, out = Path(a.data), Path(a.out)
    if not (data / "clean").is_dir():
        sys.exit(f"no clean photos under {data}: pass --data pointing at the shared data folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in images_under(data / "clean"):  # as training reads clean_dirs
        dst = (tmp / "clean" / f.relative_to(data / "clean")).with_suffix(".jpg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").save(dst, quality=a.quality)
    sets = COMPACT_SETS if a.compact else PAIR_SETS
    clipped = 0
    for s in sets:
        if not (data / s).is_dir():
            continue
        if a.compact:
            clipped += pack_compact(data / s, tmp / s, a.gt_quality)
        else:
            shutil.copytree(data / s, tmp / s)
    if clipped:
        print(f"note: {clipped} pixel channels where rainy < clean were dropped from the packed rain layers")
    mb = size_mb(tmp)
    if mb > a.limit_mb:
        shutil.rmtree(tmp)
        sys.exit(f"the pack is {mb:.1f} MiB, over --limit-mb {a.limit_mb:g}: lower --quality")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # whole or not at all
    print(f"{out}: {mb:.1f} MiB ({len(images_under(out / 'clean'))} clean photos, JPEG q{a.quality}; "
          f"{', '.join(s for s in sets if (out / s).is_dir())})")


if __name__ == "__main__":
    main()
