"""Does torch.compile (inductor, CPU) speed up a network of the shipped file on this CPU? A probe, not product code.

Times one network's restoration (``Restorer._restore_once``, no grad, fp32, channels_last as the Derainer runs it) on a
tile of the automatic CPU tile side, eager against compiled (static shapes), medians of ``--repeats`` after warm-ups,
and prints the largest difference of the two outputs. ``--pause PATTERN`` stops the other processes whose command line holds it
while timing and continues them after, so a background training run does not disturb the figures.

    python experiments/compile_probe.py [--expert 0] [--repeats 5] [--pause "cliprpn train"]
"""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.speed import timed  # noqa: E402
from cliprpn_core import load_model  # noqa: E402
from cliprpn_core.inference import cpu_tile_side  # noqa: E402


def matching(pattern):
    """Pids whose command line contains ``pattern``, this process and its parents left out (their command lines
    hold the pattern as an argument)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    own, p = set(), os.getpid()
    while p > 1:
        own.add(p)
        with open(f"/proc/{p}/stat") as f:
            p = int(f.read().rsplit(")", 1)[1].split()[1])
    return [int(x) for x in out if int(x) not in own]


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="models/clip_rpn_default.safetensors")
    ap.add_argument("--expert", type=int, default=0)
    ap.add_argument("--side", type=int, default=0, help="tile side (0: the automatic CPU tile)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    net = model.experts[a.expert]
    side = a.side or cpu_tile_side(model.config)
    x = torch.rand(1, 3, side, side).contiguous(memory_format=torch.channels_last)
    one = torch.ones(1, 1)

    def eager(x):
        with torch.no_grad():
            return net._restore_once(x, one, None)[0]

    compiled_fn = torch.compile(eager, dynamic=False)
    t = time.perf_counter()
    with torch.no_grad():
        compiled_fn(x)
    print(f"compile: {time.perf_counter() - t:.1f} s (tile {side} px, expert {a.expert})", flush=True)
    diff = (eager(x) - compiled_fn(x)).abs().max().item()  # also the warm-up of both
    paused = matching(a.pause) if a.pause else []
    print(f"pausing pids {paused}", flush=True)
    signal_all(paused, signal.SIGSTOP)
    try:
        mp = side * side / 1e6
        rows = {}
        for _ in range(2):  # alternate, two rounds
            for name, fn in (("eager", eager), ("compiled", compiled_fn)):
                med, best = timed(lambda fn=fn: fn(x), a.repeats)
                rows.setdefault(name, []).append((med / mp, best / mp))
    finally:
        signal_all(paused, signal.SIGCONT)
    for name, r in rows.items():
        print(f"{name}: " + ", ".join(f"median {m:.3f} s/MP (fastest {b:.3f})" for m, b in r))
    print(f"largest output difference: {diff:.2e}")


if __name__ == "__main__":
    main()
