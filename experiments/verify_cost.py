"""CPU cost of the light routing's verification (config.verify_light_mask): automatic routing with it on and off,
timed alternately on one loaded model, for an image the light network keeps (a Rain100L image) and one it hands to the
heavy network (a real downpour), both 481 x 321 (the working size every larger photo is restored at); median of
--repeats runs after a warm-up, --rounds times.

    python experiments/verify_cost.py [CKPT] [--keep ../shared/data/rain100l/rain/001.png]
        [--hand-over ../shared/data/real_rain/001.png] [--rounds 3] [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.speed import timed  # noqa: E402
from cliprpn_core import Derainer, load_model  # noqa: E402
from cliprpn_core.imageio import read_image  # noqa: E402
from cliprpn_core.inference import DerainOptions  # noqa: E402
from cliprpn_core.patterns import EXPERTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "models" / "clip_rpn_default.safetensors"))
ap.add_argument("--keep", default=str(ROOT.parent / "shared" / "data" / "rain100l" / "rain" / "001.png"))
ap.add_argument("--hand-over", default=str(ROOT.parent / "shared" / "data" / "real_rain" / "001.png"))
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--repeats", type=int, default=7)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
d = Derainer(load_model(args.checkpoint))
print(f"{args.checkpoint}: verify_light_mask = {d.model.config.verify_light_mask}", flush=True)
on, off = DerainOptions(), DerainOptions(verify=False)
for name, path in (("kept", args.keep), ("handed over", args.hand_over)):
    x = read_image(path)[None]
    mp = x.shape[-2] * x.shape[-1] / 1e6
    r_on, r_off = d.derain(x, on).routing, d.derain(x, off).routing
    print(f"{name} ({Path(path).name}, {x.shape[-1]} x {x.shape[-2]}): verified -> {EXPERTS[int(r_on.argmax())]}, "
          f"not verified -> {EXPERTS[int(r_off.argmax())]}", flush=True)
    meds = {"on": [], "off": []}
    for i in range(args.rounds):
        for k, opt in (("on", on), ("off", off)):
            med, best = timed(lambda opt=opt: d.derain(x, opt), args.repeats)
            meds[k].append(med / mp)
            print(f"  round {i + 1} verification {k}: {med / mp:.3f} s/MP (fastest {best / mp:.3f})", flush=True)
    a, b = statistics.median(meds["on"]), statistics.median(meds["off"])
    print(f"{name}: median {a:.3f} s/MP verified, {b:.3f} not verified: {a / b:.3f}x", flush=True)
