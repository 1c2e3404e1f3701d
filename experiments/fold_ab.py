"""A/B timing of arch.Block's inference path (residual scales folded into pw2/ffn2, sums in place) against its
gradient path (the unfolded sums) on the same loaded model: the model's parameters need no gradient, so the gradient
path builds no graph and differs only in the block arithmetic. Times the light-streaks network at full size on a
random 512 x 1024 image, the two paths alternating, and prints each path's s/MP and how far the outputs differ.

    python experiments/fold_ab.py [--checkpoint F] [--rounds 10] [--threads 2]
"""
import argparse
import statistics
import time

import torch

from cliprpn_core import default_model_path
from cliprpn_core.checkpoint import load_model
from cliprpn_core.patterns import EXPERTS

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--checkpoint", default=None)
ap.add_argument("--rounds", type=int, default=10)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
m = load_model(args.checkpoint or default_model_path()).eval().requires_grad_(False)
m = m.to(memory_format=torch.channels_last)
x = torch.rand(1, 3, 512, 1024).contiguous(memory_format=torch.channels_last)
r = torch.eye(len(EXPERTS))[EXPERTS.index("light_streaks")][None]
mp = x.shape[-2] * x.shape[-1] / 1e6
paths = {"folded (inference)": torch.no_grad, "unfolded (gradient path)": torch.enable_grad}
out = {}
for name, ctx in paths.items():
    with ctx():
        out[name] = m.restore(x, r)[0]
a, b = out.values()
print(f"max |difference| {(a - b).abs().max().item():.2e}; "
      f"8-bit values that differ: {((a * 255).round() != (b * 255).round()).float().mean().item():.2e}")
times = {name: [] for name in paths}
for _ in range(args.rounds):
    for name, ctx in paths.items():
        with ctx():
            t0 = time.perf_counter()
            m.restore(x, r)
            times[name].append((time.perf_counter() - t0) / mp)
for name, t in times.items():
    print(f"{name}: median {statistics.median(t):.3f} s/MP, fastest {min(t):.3f} ({args.rounds} rounds)")
