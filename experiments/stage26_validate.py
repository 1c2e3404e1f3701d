"""Stage 26's selection measure: where each checkpoint's top-1 routing sends the held-out real pairs of
experiments/stage26_split.py (RainTrainL pairs should go to the light network, heavy pairs to the heavy one), with
the checkpoint's own perception view (config.head_view). Perception only: nothing is restored.

  python experiments/stage26_validate.py CKPT [CKPT ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cliprpn_core import Derainer, load_model  # noqa: E402
from cliprpn_core.imageio import list_images, read_image  # noqa: E402
from cliprpn_core.patterns import EXPERTS  # noqa: E402

SPLIT = Path(__file__).resolve().parents[1] / "runs" / "stage26_data"
SETS = {"rain100l_train_val": 0, "heavy_train_val": 1}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for ck in a.checkpoints:
        d = Derainer(load_model(ck))
        right, total, parts = 0, 0, []
        for name, want in SETS.items():
            files = list_images(SPLIT / name / "rain")
            if not files:
                raise SystemExit(f"{SPLIT / name} is empty: run experiments/stage26_split.py first")
            counts = [0] * len(EXPERTS)
            for f in files:
                probs, _ = d.perceive(read_image(f)[None])
                counts[int(d.route(probs)[0].argmax())] += 1
            right += counts[want]
            total += len(files)
            parts.append(f"{name}: " + ", ".join(f"{EXPERTS[e]} {c}" for e, c in enumerate(counts) if c))
        print(f"{ck} (head_view {d.model.config.head_view}): {right}/{total} held-out pairs to their network; "
              + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
