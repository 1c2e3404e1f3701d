"""Stage 26's split of the real training pairs (experiments/stage26a_perception_view.toml): symlinks under
runs/stage26_data/, every 5th RainTrainL pair (sorted by name, from the first) and every 3rd heavy pair held out for
validation (`*_val`), the rest to fit on (`*_fit`). Nothing is copied.

  python experiments/stage26_split.py
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "stage26_data"


def main():
    for src, every in (("rain100l_train", 5), ("heavy_train", 3)):
        for i, f in enumerate(sorted((DATA / src / "rain").iterdir())):
            part = "val" if i % every == 0 else "fit"
            for sub in ("rain", "gt"):
                link = OUT / f"{src}_{part}" / sub / f.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    os.symlink(DATA / src / sub / f.name, link)
    for p in sorted(OUT.iterdir()):
        print(p.name, len(list((p / "rain").iterdir())), "pairs")


if __name__ == "__main__":
    main()
