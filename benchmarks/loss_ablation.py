"""The dynamic-loss ablation, end to end: train the same model on the same data for the same number of
steps with each loss schedule and seed, evaluate every run on Rain100L by the protocol of method.md
(benchmarks/evaluate.py: 8-bit PNG outputs, Y-PSNR / SSIM), and print the table.

  python -m benchmarks.loss_ablation [--presets charbonnier mix dwa equal_mix uncertainty psnr_mix psnr_dwa]
                                     [--seeds 0 1] [--steps 600] [--jobs 2] [--threads T] [--out runs/loss_ablation]

Runs are `cliprpn train configs/ablation.toml loss_preset=P seed=S steps=N threads=T out_dir=OUT/P_sS`,
`--jobs` of them at a time with the machine's cores split between them (or `--threads` each, e.g. 1 when
another job holds a core). A run whose model file already
holds N trained steps of that preset and seed is not trained again, and an evaluation already written
for that model file is read back, so an interrupted ablation continues where it stopped (an interrupted
run resumes from its last checkpoint) and `--eval-only` just prints the table of what is there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean

from cliprpn_core.checkpoint import read_metadata
from cliprpn_core.losses import PRESETS

from .common import ROOT

DEFAULT_PRESETS = ("charbonnier", "mix", "dwa", "equal_mix", "uncertainty", "psnr_mix", "psnr_dwa")


def finished(model: Path, preset: str, seed: int, steps: int) -> bool:
    """True when ``model`` is the final EMA of a run with exactly this preset, seed and step count."""
    if not model.exists():
        return False
    meta = read_metadata(model)
    cfg = json.loads(meta.get("train_config", "{}"))
    return (meta.get("trained_steps") == str(steps) and cfg.get("loss_preset") == preset
            and cfg.get("seed") == seed and cfg.get("steps") == steps)


def run_one(preset, seed, a, threads, log):
    out = Path(a.out) / f"{preset}_s{seed}"
    model = out / "model.safetensors"
    if not finished(model, preset, seed, a.steps):
        if a.eval_only:
            return None
        log(f"train {out.name} ({threads} thread(s))")
        cmd = [sys.executable, "-m", "cliprpn_core.train_cli", a.config, f"loss_preset={preset}", f"seed={seed}",
               f"steps={a.steps}", f"threads={threads}", f"out_dir={out}", "ckpt_every=100"]
        with open(f"{out}.out", "w") as f:
            if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"training {out.name} failed: see {out}.out")
        if not finished(model, preset, seed, a.steps):
            raise RuntimeError(f"training {out.name} stopped before step {a.steps}: run this again to resume it")
    ev = Path(f"{out}.eval.json")
    if not (ev.exists() and ev.stat().st_mtime >= model.stat().st_mtime):
        if a.eval_only:
            return None
        log(f"evaluate {out.name}")
        cmd = [sys.executable, "-m", "benchmarks.evaluate", str(model), "--sets", "rain100l",
               "--threads", str(threads), "--json", str(ev)] + (["--data", a.data] if a.data else [])
        with open(f"{out}.eval.out", "w") as f:
            if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"evaluating {out.name} failed: see {out}.eval.out")
    r = next(iter(json.loads(ev.read_text()).values()))["rain100l"]["routed"]
    log(f"{out.name}: Rain100L {r['psnr']:.2f} / {r['ssim']:.3f}")
    return r


def describe(preset):
    spec = PRESETS[preset]
    w = spec.get("weights") or spec.get("end")
    return f"{spec['type']}: " + " + ".join(f"{v:g} {k}" for k, v in w.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), choices=list(PRESETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--config", default="configs/ablation.toml")
    ap.add_argument("--out", default="runs/loss_ablation")
    ap.add_argument("--data", default=None, help="folder holding rain100l/ (default: ../shared/data)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per run (default: the cores divided by --jobs)")
    ap.add_argument("--eval-only", action="store_true", help="print the table of the finished runs only")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error("--jobs must be at least 1")
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    jobs = [(p, s) for p in a.presets for s in a.seeds]
    errors = []

    def job(j):
        try:
            return run_one(*j, a, threads, log)
        except Exception as e:  # one failed run must not lose the others' rows
            errors.append(str(e))
            log(f"error: {e}")
            return None

    with ThreadPoolExecutor(a.jobs) as ex:
        res = dict(zip(jobs, ex.map(job, jobs)))

    print(f"\nLoss-schedule ablation: {a.config}, {a.steps} steps from scratch; Rain100L routed, Y-PSNR / SSIM "
          "(protocol of method.md)\n")
    print("| loss schedule | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean PSNR | mean SSIM |")
    print("|---|" + "---|" * (len(a.seeds) + 2))
    for p in a.presets:
        rs = [res[(p, s)] for s in a.seeds]
        cells = [f"{r['psnr']:.2f} / {r['ssim']:.3f}" if r else "–" for r in rs]
        done = [r for r in rs if r]
        m = (f"{mean(r['psnr'] for r in done):.2f} | {mean(r['ssim'] for r in done):.3f}" if len(done) == len(rs)
             else "– | –")
        print(f"| `{p}` ({describe(p)}) | " + " | ".join(cells) + f" | {m} |")
    if errors:
        print(f"\n{len(errors)} run(s) failed:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
