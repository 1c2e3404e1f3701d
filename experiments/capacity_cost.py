"""What capacity would cost on the CPU: seconds per megapixel (1-MP image restored at full size, `work_side = 0`, with the
automatic CPU tiles; median of --repeats after a warm-up) and FLOPs per pixel of the shipped config and of larger
variants of it. The variants are randomly initialised (their blocks' residual scales set to 0.01, since a block
whose scales are all zero is skipped at inference): this times them, it says nothing about their quality.

  python experiments/capacity_cost.py [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DEFAULT_CHECKPOINT  # noqa: E402
from benchmarks.speed import FULL, flops_of, timed  # noqa: E402
from cliprpn_core import CLIPRPN, Derainer, load_model  # noqa: E402

VARIANTS = {
    "shipped": {},
    "stage 36 (bottleneck 16+16)": {"expert_blocks": 16, "middle_blocks": 16},
    "bottleneck width 128 (widths 24/48/128)": {"widths": (24, 48, 128)},
    "bottleneck width 112 (widths 24/48/112)": {"widths": (24, 48, 112)},
    "ffn_expand 3": {"ffn_expand": 3},
    "half-res 3+3 (enc/dec_blocks (1, 3))": {"enc_blocks": (1, 3), "dec_blocks": (1, 3)},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = load_model(DEFAULT_CHECKPOINT).config
    x = torch.rand(1, 3, 1024, 1024)
    xs = torch.rand(1, 3, 256, 256)
    one = torch.zeros(1, base.num_experts)
    one[0, 0] = 1
    print(f"{'variant':46s} {'s/MP':>6s} {'kFLOP/px':>9s} {'CPU tile':>8s}")
    for name, change in VARIANTS.items():
        torch.manual_seed(0)
        model = CLIPRPN(replace(base, **change)).eval()
        with torch.no_grad():  # open the residual scales: blocks left at zero are the identity and skipped
            for pname, p in model.named_parameters():
                if pname.endswith((".beta", ".gamma")):
                    p.fill_(0.01)
        d = Derainer(model)
        d.derain(x, FULL)  # at full size: the network's own cost, what the speed bar measures
        med, _ = timed(lambda: d.derain(x, FULL), a.repeats)
        with torch.no_grad():
            fl = flops_of(lambda: model.restore(xs, one)) / 256 / 256
        print(f"{name:46s} {med / 1.048576:6.2f} {fl / 1e3:9.1f} {d.auto_tile(None, 1024, 1024) or 0:8d}", flush=True)


if __name__ == "__main__":
    main()
