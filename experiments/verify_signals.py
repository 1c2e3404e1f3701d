"""What the light verification sees on each image perception routes to the light network: the light network's mean
rain mask (L, what the verification thresholds) for one or more light networks, and the handover network's mean rain
mask (H, what confirms a handover), with, on pair sets, the Y-PSNR of each network's 8-bit restoration (what a
handover gains or costs there). Written to design a verification that a retrained light network does not upset: the
shipped one hands over below L = 0.03, and a retrained light network moves L by a few thousandths on photos near it.

  python experiments/verify_signals.py BASE [OTHER ...] --set real|rain100l|rain100l_train|heavy_test|clean|synthetic|DIR
      [--limit N] [--threads 1] [--out F.tsv]

BASE and OTHER are full model files with the same perception and handover network (e.g. the shipped file and a
light network assembled onto it): routing and H come from BASE, L from each file. A pair set is a folder with rain/
and gt/; a folder of photos is read as is; synthetic is light_mask_floor.py's 160 synthetic light-streak crops. One tab-separated line per light-routed image: set, name, L per file,
H, and on pair sets the Y-PSNR of BASE's light restoration, of each OTHER's, and of the handover restoration.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cliprpn_core.arch import EXPERTS, HANDOVER  # noqa: E402
from cliprpn_core.checkpoint import load_model  # noqa: E402
from cliprpn_core.data import pair_files  # noqa: E402
from cliprpn_core.imageio import images_under, read_image, to_uint8  # noqa: E402
from cliprpn_core.inference import Derainer, DerainOptions  # noqa: E402
from cliprpn_core.metrics import psnr_y  # noqa: E402
from light_mask_floor import light_crops  # noqa: E402  (experiments/, this script's folder)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LIGHT = EXPERTS.index("light_streaks")
SETS = {"real": "real_rain", "rain100l": "rain100l", "rain100l_train": "rain100l_train", "heavy_test": "heavy_test",
        "clean": "clean"}


def items(where: Path):
    """(name, rain image, gt image or None) for a pair set or a folder of photos; images are read when used."""
    if (where / "rain").is_dir() and (where / "gt").is_dir():
        return [(r.name, r, g) for r, g in pair_files(where)]
    return [(p.name, p, None) for p in images_under(where)]


def synthetic_items(n: int, seed: int = 7):
    """light_mask_floor.py's synthetic light-streak crops (256 px, classic style, over the clean photos and the
    RainTrainL ground truths: the light network's synthetic training draws), with their clean crops."""
    s = light_crops(DATA, n, seed)
    return [(f"crop{i:03d}", s.rainy[i], s.clean[i]) for i in range(n)]


def as_image(v):
    return v if torch.is_tensor(v) else read_image(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--set", required=True)
    ap.add_argument("--limit", type=int, default=0, help="the first N images only (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the lines to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    where = DATA / SETS[a.set] if a.set in SETS else Path(a.set)
    todo = (synthetic_items(a.limit or 160) if a.set == "synthetic" else items(where))[: a.limit or None]
    if not todo:
        raise SystemExit(f"no images under {where}")
    ds = [Derainer(load_model(f)) for f in a.files]
    base = ds[0]
    light, handover = DerainOptions(expert=LIGHT, verify=False), DerainOptions(expert=HANDOVER, verify=False)
    head = ["set", "name"] + [f"L{i}" for i in range(len(ds))] + ["H"]
    if todo[0][2] is not None:
        head += [f"psnr_L{i}" for i in range(len(ds))] + ["psnr_H"]
    lines = ["\t".join(head)]
    print(lines[0], flush=True)
    skipped = 0
    for name, rp, gp in todo:
        x = as_image(rp)[None]
        with torch.no_grad():
            routing = base.route(base.perceive(x)[0])
            if not bool((routing[0].argmax() == LIGHT) and (routing[0, LIGHT] == 1)):
                skipped += 1
                continue
            rs = [d.derain(x, light) for d in ds]
            rh = base.derain(x, handover)
        row = [a.set, name] + [f"{float(r.masks.mean()):.4f}" for r in rs] + [f"{float(rh.masks.mean()):.4f}"]
        if gp is not None:
            gt = to_uint8(as_image(gp))
            row += [f"{psnr_y(to_uint8(r.images[0]), gt):.3f}" for r in rs + [rh]]
        lines.append("\t".join(row))
        print(lines[-1], flush=True)
    print(f"# {len(lines) - 1} routed to the light network, {skipped} not", flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
