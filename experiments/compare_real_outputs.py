"""Which real photos two models restore differently: the default derain (perception, routing, the verification) of
every photo in a folder by both, the 8-bit outputs compared. Used to check that a ship changes only the photos it
should (e.g. a new heavy-streaks network: only the photos perception routes to it).

  python experiments/compare_real_outputs.py OLD.safetensors NEW.safetensors [--images ../shared/data/real_rain]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cliprpn_core.checkpoint import load_model  # noqa: E402
from cliprpn_core.inference import Derainer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real_rain"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    old, new = (Derainer(load_model(p)) for p in (a.old, a.new))
    same, diff = [], []
    for f in sorted(Path(a.images).glob("*.png")):
        x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            ya, yb = ((d.derain(x).images.clamp(0, 1) * 255).round().to(torch.uint8) for d in (old, new))
        eq = torch.equal(ya, yb)
        (same if eq else diff).append(f.stem)
        print(f"{f.name}: {'identical' if eq else 'differs'} (largest 8-bit difference "
              f"{int((ya.int() - yb.int()).abs().max())})", flush=True)
    print(f"identical {len(same)}, different {len(diff)}: {' '.join(diff)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
