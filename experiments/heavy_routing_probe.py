"""Would the heavy network's own mask tell light rain that perception sends to the heavy network from heavy rain?

For every image of each folder: where perception routes it (top-1, unverified), and for the images it routes to the
heavy-streaks network, that network's mean rain mask from its restoration pass (forced, at the default working size)
and the light network's. The handover confirmation (``config.verify_heavy_mask`` = (0.1, 0.2), fitted on training
images only) gives a handover to the heavy network by that mask; this asks whether the same confirmation could also
check perception's heavy routing.

  python experiments/heavy_routing_probe.py [CKPT] [--threads 2] [--json OUT.json]

Folders: the training sets (RainTrainL, heavy_train, train_pairs_small rain images: what a threshold may be fitted
on), then for reference only the real photos, the synthetic sets (runs/synth_classic, runs/synth_downpour, made by
experiments/scratch_sets.sh), Rain100L and heavy_test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cliprpn_core.arch import EXPERTS  # noqa: E402
from cliprpn_core.checkpoint import load_model  # noqa: E402
from cliprpn_core.imageio import images_under, read_image  # noqa: E402
from cliprpn_core.inference import Derainer, DerainOptions  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FOLDERS = [("rain100l_train (fit)", DATA / "rain100l_train" / "rain"), ("heavy_train (fit)", DATA / "heavy_train" / "rain"),
           ("train_pairs_small (fit)", DATA / "train_pairs_small" / "rain"), ("real_rain", DATA / "real_rain"),
           ("synth_classic", ROOT / "runs" / "synth_classic" / "rain"),
           ("synth_downpour", ROOT / "runs" / "synth_downpour" / "rain"),
           ("rain100l (test)", DATA / "rain100l" / "rain"), ("heavy_test (test)", DATA / "heavy_test" / "rain")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "models" / "clip_rpn_default.safetensors"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write every image's figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = Derainer(load_model(args.checkpoint))
    heavy, light = EXPERTS.index("heavy_streaks"), EXPERTS.index("light_streaks")
    out = {}
    for name, folder in FOLDERS:
        if not folder.is_dir():
            print(f"{name}: {folder} absent, skipped")
            continue
        rows = []
        with torch.no_grad():
            for f in images_under(folder):
                x = read_image(f)[None]
                top = EXPERTS[int(d.derain(x, DerainOptions(verify=False)).routing[0].argmax())]
                if top != "heavy_streaks":
                    rows.append({"image": f.name, "routed": top})
                    continue
                hm = float(d.derain(x, DerainOptions(expert=heavy, verify=False)).masks.mean())
                lm = float(d.derain(x, DerainOptions(expert=light, verify=False)).masks.mean())
                rows.append({"image": f.name, "routed": top, "heavy_mask": hm, "light_mask": lm})
        out[name] = rows
        hv = sorted((r for r in rows if "heavy_mask" in r), key=lambda r: r["heavy_mask"])
        masks = " ".join(f"{r['image']} {r['heavy_mask']:.3f}" for r in hv[:20])
        print(f"{name}: {len(rows)} images, {len(hv)} routed to the heavy network; heavy mask, smallest first: {masks}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
