"""Speed, memory, size and FLOPs of a CLIP-RPN model (default: the shipped one).

  python benchmarks/speed.py [--checkpoint CKPT] [--threads 2]

Prints: seconds per megapixel (1-MP image, whole pipeline: perception, routing, restoration;
median of 3 after a warm-up), peak RSS of a separate process deraining an 8-MP image with tiling,
parameters and FLOPs per pixel of the model and of each expert.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cliprpn_core import Derainer, default_model_path, load_model  # noqa: E402


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def peak_rss_child(ck, threads, h, w, tile):
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(ROOT)!r})
torch.set_num_threads({threads})
from cliprpn_core import Derainer, load_model
d = Derainer(load_model({str(ck)!r}))
x = torch.rand(1, 3, {h}, {w})
r = d.derain(x, tile={tile})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024 ** 2, time.perf_counter() - t  # KiB -> GiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(default_model_path()))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint)
    cfg = model.config
    d = Derainer(model)
    res = {"checkpoint": a.checkpoint, "threads": a.threads, "torch": torch.__version__}

    x = torch.rand(1, 3, 1024, 1024)
    d.derain(x)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        d.derain(x)
        times.append(time.perf_counter() - t)
    res["seconds_per_megapixel_1MP"] = round(statistics.median(times) / (1024 * 1024 / 1e6), 3)

    n = sum(p.numel() for p in model.parameters())
    res["parameters"] = n
    res["parameters_pattern_head"] = sum(p.numel() for p in model.pattern_head.parameters())
    res["parameters_per_expert"] = [sum(p.numel() for p in e.parameters()) for e in model.experts]
    s = 256
    xs = torch.rand(1, 3, s, s)
    one = torch.zeros(1, cfg.num_experts)
    one[0, 0] = 1
    with torch.no_grad():
        res["flops_per_pixel_restore_top1"] = round(flops_of(lambda: model.restore(xs, one)) / s / s)
        res["flops_per_pixel_pattern_head_at_1MP"] = round(flops_of(lambda: model.perceive(xs)) / 1e6)
        feats = model.encode(xs)
        b = feats[-1]
        per = []
        for e in model.experts:
            per.append(round(flops_of(lambda e=e: e(b, model.ups[-1], feats[-2])) / s / s))
        res["flops_per_pixel_per_expert"] = per
    if not a.skip_memory:
        gib, secs = peak_rss_child(a.checkpoint, a.threads, 2448, 3264, 512)
        res["peak_rss_GiB_8MP_tiled_512"] = round(gib, 3)
        res["seconds_8MP_tiled_incl_startup"] = round(secs, 1)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
