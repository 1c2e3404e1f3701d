"""benchmarks.speed's full-size default-path figure for several checkpoints, timed alternately (same 1-MP random
image, options and timing helper: perception, then the light-streaks network at full size, median and fastest of
--repeats runs after a warm-up), --rounds times. On a machine whose speed drifts, compare files within one call only.
--expert NAME times that network's path instead (perception, then NAME's network forced; e.g. heavy_streaks).

    python experiments/speed_alternating.py FILE [FILE ...] [--rounds 3] [--repeats 5] [--threads 2] [--expert NAME]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.speed import FULL, default_path, timed  # noqa: E402
from cliprpn_core import Derainer, load_model  # noqa: E402
from cliprpn_core.patterns import EXPERTS  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("files", nargs="+")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--expert", choices=EXPERTS, default=None, help="time this network's path (default: the light path)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
x = torch.rand(1, 3, 1024, 1024)
mp = 1024 * 1024 / 1e6
derainers = {f: Derainer(load_model(f)) for f in args.files}


def run(d):
    if args.expert is None:
        return default_path(d, x, FULL)
    d.perceive(x)  # as default_path: perception runs, its answer unused
    return d.derain(x, replace(FULL, expert=EXPERTS.index(args.expert)))



medians = {f: [] for f in args.files}
for i in range(args.rounds):
    for f, d in derainers.items():
        run(d)
        med, best = timed(lambda d=d: run(d), args.repeats)
        medians[f].append(med / mp)
        print(f"round {i + 1} {f}: full size {med / mp:.3f} s/MP (fastest {best / mp:.3f})", flush=True)
base = statistics.median(medians[args.files[0]])
for f, m in medians.items():
    print(f"{f}: median of round medians {statistics.median(m):.3f} s/MP, {statistics.median(m) / base:.3f}x the first file")
