"""Per-regime figures on a labelled synthetic rain set, by the protocol of method.md (outputs written as 8-bit
PNG, Y-PSNR / SSIM read back from the files), grouped by each image's labelled expert (light streaks, heavy
streaks, raindrops, veil).

  python -m benchmarks.synthetic_regimes CKPT [CKPT...] [--set DIR | --clean DIR -n 160 --size 256 --seed 1234
                                          --style classic] [--check | --expert NAME] [--threads 1] [--json out.json]

Without --set the set is written first (as ``cliprpn synth CLEAN -o DIR -n N --size S --seed K`` writes it:
the same seed gives the same images) into a temporary folder. The synthetic set is our own rain over
../shared/data/clean, not a benchmark from the literature: its figures measure how each checkpoint does across
rain regimes (the regression check of the model card), and are not comparable with published numbers.
``--style downpour`` draws the heavy-streak images as photographed-style downpours (streaks at three depths, an
uneven accumulation veil; ``synthesis.downpour``) and the other regimes as the default ("classic") set does.
Also printed: how often routing picks the labelled expert (a diagnostic; the labels come from the synthesis).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from cliprpn_core.checkpoint import load_model
from cliprpn_core.data import write_labelled_set
from cliprpn_core.inference import Derainer, DerainOptions
from cliprpn_core.patterns import EXPERTS
from cliprpn_core.synthesis import STYLES

from .common import DATA, derain_set


def by_regime(images: list[dict], labels: dict, chosen: dict | None = None) -> dict:
    """Mean Y-PSNR / SSIM per labelled expert (and 'all') from evaluate_folders' per-image rows; with the
    routed expert per image (by file stem) also the share routed to the labelled expert."""
    groups = defaultdict(list)
    for r in images:
        groups[labels[r["name"]]["expert"]].append(r)
        groups["all"].append(r)
    out = {}
    for g in [e for e in EXPERTS if e in groups] + ["all"]:
        rows = groups[g]
        out[g] = {"n": len(rows), "psnr": round(float(np.mean([r["psnr"] for r in rows])), 3),
                  "ssim": round(float(np.mean([r["ssim"] for r in rows])), 4)}
        if chosen is not None:
            hit = [chosen[Path(r["name"]).stem] == labels[r["name"]]["expert"] for r in rows]
            out[g]["routed_to_label"] = round(float(np.mean(hit)), 3)
    return out


def evaluate(derainer: Derainer, set_dir: Path, labels: dict, check: bool = False, expert: int | None = None) -> dict:
    """Per-regime figures of ``derainer`` on the labelled set: routed (with the expert check if ``check``), or every
    image through the one ``expert`` (index) when given."""
    ev, chosen, _ = derain_set(derainer, set_dir, DerainOptions(check=check, expert=expert))
    res = by_regime(ev["images"], labels, chosen)
    res["routing"] = dict(Counter(chosen.values()))
    return res


def table(name: str, res: dict) -> str:
    lines = [f"{name}", f"  {'regime':<15}{'n':>5}{'Y-PSNR':>9}{'SSIM':>8}{'routed to label':>17}"]
    for g, v in res.items():
        if g == "routing":
            continue
        lines.append(f"  {g:<15}{v['n']:>5}{v['psnr']:>9.2f}{v['ssim']:>8.3f}{v.get('routed_to_label', 0):>16.1%}")
    lines.append(f"  routing: {res['routing']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--set", help="an existing labelled set (rain/, gt/, labels.json) instead of writing one")
    ap.add_argument("--clean", nargs="+", default=[str(DATA / "clean")], help="clean photos for the set")
    ap.add_argument("-n", "--count", type=int, default=160)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--style", choices=STYLES, default="classic",
                    help="synthesis style of the written set (downpour: heavy streaks as photographed downpours)")
    ap.add_argument("--check", action="store_true", help="also: routed with the expert check")
    ap.add_argument("--expert", choices=EXPERTS,
                    help="every image through this one expert (e.g. a network trained without routing) instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    forced = None if a.expert is None else EXPERTS.index(a.expert)
    how = "routed" if forced is None else f"forced {a.expert}"
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.set:
            set_dir = Path(a.set)
            if not (set_dir / "labels.json").exists():
                sys.exit(f"{set_dir} has no labels.json: write a labelled set with `cliprpn synth` (an interrupted "
                         "one has none; write it again)")
            labels = json.loads((set_dir / "labels.json").read_text())
            src = f"set {set_dir}"
        else:
            set_dir = Path(tmp) / "set"
            labels = write_labelled_set(a.clean, set_dir, a.count, a.size, a.seed, style=a.style)
            src = f"{a.count} images, {a.size} px, seed {a.seed}, over {' '.join(a.clean)}"
            if a.style != "classic":
                src += f", style {a.style}"
        print(f"synthetic set: {src}", flush=True)
        results = {}
        for ck in a.checkpoints:
            d = Derainer(load_model(ck))
            results[ck] = {how: evaluate(d, set_dir, labels, expert=forced)}
            print(table(f"{ck} {how}", results[ck][how]), flush=True)
            if a.check and forced is None:
                results[ck]["routed_check"] = evaluate(d, set_dir, labels, check=True)
                print(table(f"{ck} routed + expert check", results[ck]["routed_check"]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"set": src, "results": results}, indent=2))


if __name__ == "__main__":
    main()
