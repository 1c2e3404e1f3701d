"""Which real photos two models restore differently: the default derain (perception, routing, the verification) of
every photo in a folder by both, the 8-bit outputs compared. Used to check that a ship changes only the photos it
should (e.g. a new heavy-streaks network: only the photos perception routes to it). Also prints, for each model, the
photos the light verification hands over (restored by the handover network alone) or shares (blended), since a new
light network's mask can change them.

  python experiments/compare_real_outputs.py OLD.safetensors NEW.safetensors [--images ../shared/data/real_rain]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cliprpn_core.arch import EXPERTS  # noqa: E402
from cliprpn_core.checkpoint import load_model  # noqa: E402
from cliprpn_core.imageio import images_under, read_image, to_uint8  # noqa: E402
from cliprpn_core.inference import Derainer  # noqa: E402

LIGHT, HEAVY = EXPERTS.index("light_streaks"), EXPERTS.index("heavy_streaks")


def verdict(r) -> str:
    """'handed' / 'shared' where the light verification gave (all / part of) the photo away, else 'kept'."""
    if r.light_mask is None or torch.isnan(r.light_mask[0]) or float(r.routing[0, HEAVY]) == 0:
        return "kept"
    return "handed" if float(r.routing[0, LIGHT]) == 0 else "shared"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real_rain"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    old, new = (Derainer(load_model(p)) for p in (a.old, a.new))
    files = images_under(a.images)
    if not files:
        raise SystemExit(f"no images under {a.images}")
    same, diff = [], []
    given = {"old": {"handed": [], "shared": []}, "new": {"handed": [], "shared": []}}
    for f in files:
        x = read_image(f)[None]
        with torch.no_grad():
            ra, rb = (d.derain(x) for d in (old, new))
        ya, yb = (torch.from_numpy(to_uint8(r.images[0])).int() for r in (ra, rb))
        eq = torch.equal(ya, yb)
        (same if eq else diff).append(f.stem)
        va, vb = verdict(ra), verdict(rb)
        for name, v in (("old", va), ("new", vb)):
            if v != "kept":
                given[name][v].append(f.stem)
        print(f"{f.name}: {'identical' if eq else 'differs'} (largest 8-bit difference "
              f"{int((ya - yb).abs().max())}); light verification: old {va}, new {vb}", flush=True)
    print(f"identical {len(same)}, different {len(diff)}: {' '.join(diff)}")
    for name in ("old", "new"):
        g = given[name]
        print(f"{name}: handed over {len(g['handed'])} ({' '.join(g['handed'])}), shared {len(g['shared'])} "
              f"({' '.join(g['shared'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
