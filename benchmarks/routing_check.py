"""Calibrate and measure the expert check (Derainer.derain(check=True)) on training data.

For every image the router's two best-ranked experts restore it; the model's own mask estimator measures
the rain left in each output (Derainer residual rain), and the script prints, for each ratio t of a grid,
the mean Y-PSNR when the runner-up is kept only where its output carries less than t times the first one's
residual rain (inference.check_choice; as at run time, only when both are streak experts), next to never checking (the router's top-1) and the per-image
best of the two (needs the clean image: a bound, not a method). The ratio with the best mean over the
calibration sets (mean of the per-set means) is printed last; inference.CHECK_RATIO is set from it.

Calibration sets, all training data (../shared/data): the real training pairs (heavy_train,
train_pairs_small, whole images), their light and heavy rain layers over crops of the clean photos turned
by -40..40 degrees (as benchmarks/expert_probe.py), and synthetic rain over the clean photos.
--report SETS adds test sets (e.g. rain100l heavy_test) as extra rows that play no part in the choice.

  python benchmarks/routing_check.py [CKPT] [--n 16] [--size 256] [--seed 0] [--report rain100l heavy_test]

The protocol's Y-PSNR (metrics.psnr_y) on 8-bit-rounded outputs held in memory (the same values as saved
8-bit PNGs); for protocol figures of the checked model use benchmarks/evaluate.py --check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from cliprpn_core.checkpoint import load_model  # noqa: E402
from cliprpn_core.data import RainLayerSource, SyntheticSource  # noqa: E402
from cliprpn_core.imageio import list_images, load_rgb_uint8, read_image  # noqa: E402
from cliprpn_core.inference import CHECK_EXPERTS, Derainer, check_candidates, check_choice  # noqa: E402
from cliprpn_core.metrics import psnr_y  # noqa: E402
from cliprpn_core.patterns import EXPERTS  # noqa: E402
from expert_probe import probe_batches  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RATIOS = [round(0.3 + 0.05 * i, 2) for i in range(15)]  # 0.30 .. 1.00


def _u8(t: torch.Tensor) -> np.ndarray:
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def measure(d: Derainer, rainy: torch.Tensor, clean_u8: np.ndarray) -> dict:
    """One image [3,H,W]: the check's two candidates with their residual rain and Y-PSNR."""
    probs, _ = d.perceive(rainy)
    with torch.inference_mode():
        ranking = d.model.router.logits(probs.to(d.device)).float().cpu()
    (cands,) = check_candidates(torch.zeros_like(ranking), ranking, among=None)
    # the runtime checks only the streak experts; the others are measured to show why
    row = {"experts": cands, "checked": all(e in CHECK_EXPERTS for e in cands), "residual": [], "psnr": []}
    for e in cands:
        out = d.derain(rainy, override=e).images[0]
        row["residual"].append(float(d._residual_rain(out[None], None, 0)))  # as derain(check=True) measures it
        row["psnr"].append(psnr_y(_u8(out), clean_u8))
    return row


def decide(row: dict, t: float, every_pair: bool = False) -> int:
    """The candidate derain(check=True, check_ratio=t) keeps (every_pair: as if any two experts were compared)."""
    return check_choice(row["residual"], t) if every_pair or row["checked"] else 0


def summarize(rows: list[dict], every_pair: bool = False) -> dict:
    p = np.array([r["psnr"] for r in rows])
    out = {"top1": p[:, 0].mean(), "best": p.max(1).mean(), "n": len(rows)}
    for t in RATIOS:
        out[t] = np.mean([r["psnr"][decide(r, t, every_pair)] for r in rows])
        out[f"switched@{t}"] = sum(decide(r, t, every_pair) != 0 for r in rows)
    return out


def calibration_sets(data: Path, n: int, size: int, seed: int):
    pairs = [data / "heavy_train", data / "train_pairs_small"]
    real = []
    for root in pairs:
        for f in list_images(root / "rain"):
            real.append((read_image(f), load_rgb_uint8(root / "gt" / f.name), None))
    yield "real training pairs", real
    for kind in ("light", "heavy"):
        src = RainLayerSource(pairs, [data / "clean"], min_side=size, only=kind, max_rotation=0.0)
        imgs = []
        for _, _, rainy, clean in probe_batches(src, n, size, [-40, -20, 0, 20, 40], [1.0], seed):
            imgs += [(r, _u8(c)) for r, c in zip(rainy, clean)]
        yield f"{kind} layers over clean, turned -40..40", [(r, c, f"{kind}_streaks") for r, c in imgs]
    gen = torch.Generator().manual_seed(seed)
    s = SyntheticSource([data / "clean"], min_side=size).batch(4 * n, size, gen, "cpu")
    yield "synthetic rain over clean", [(r, _u8(c), EXPERTS[int(e)]) for r, c, e in zip(s.rainy, s.clean, s.expert)]


def calibration_args(ap: argparse.ArgumentParser) -> None:
    """The options of the scripts that measure on calibration_sets (this one and expert_fusion.py)."""
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "models" / "clip_rpn_default.safetensors"))
    ap.add_argument("--n", type=int, default=16, help="images per rotation (layer sets); synthetic: 4n")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", nargs="*", default=[], help="test sets reported beside (not used for the choice)")
    ap.add_argument("--data", default=str(DATA))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    calibration_args(ap)
    ap.add_argument("--json", help="write every image's candidates, residual rain and Y-PSNR here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = Derainer(load_model(a.checkpoint))
    data = Path(a.data)
    if a.n < 1 or a.size % d.multiple:
        ap.error(f"--n must be >= 1 and --size a multiple of {d.multiple}")
    results, rows = {}, {}
    for name, imgs in calibration_sets(data, a.n, a.size, a.seed):
        rows[name] = [dict(measure(d, r, c), label=lab) for r, c, lab in imgs]
        results[name] = summarize(rows[name])
        print(f"measured {name}: {len(imgs)} images", file=sys.stderr, flush=True)
    calib = list(results)
    for name in a.report:
        root = data / name
        rows[name] = [dict(measure(d, read_image(f), load_rgb_uint8(root / "gt" / f.name)), name=f.stem)
                      for f in list_images(root / "rain")]
        results[f"{name} (test, report only)"] = summarize(rows[name])
    print(f"{a.checkpoint}: mean Y-PSNR, router top-1 vs expert check at ratio t (images switched to the runner-up)")
    print("| set | n | top-1 | " + " | ".join(f"t={t:g}" for t in RATIOS) + " | best of two |")
    print("|---" * (len(RATIOS) + 4) + "|")
    for name, s in results.items():
        print(f"| {name} | {s['n']} | {s['top1']:.2f} | "
              + " | ".join(f"{s[t]:.2f} ({s[f'switched@{t}']})" for t in RATIOS) + f" | {s['best']:.2f} |")
    mean = {t: np.mean([results[k][t] for k in calib]) for t in RATIOS}
    top1 = np.mean([results[k]["top1"] for k in calib])
    best = max(RATIOS, key=lambda t: mean[t])
    print(f"calibration mean of set means: top-1 {top1:.2f}; " + ", ".join(f"t={t:g} {mean[t]:.2f}" for t in RATIOS))
    every = {t: np.mean([summarize(rows[k], every_pair=True)[t] for k in calib]) for t in RATIOS}
    print("the same if any two experts were compared (not only the streak experts): "
          + ", ".join(f"t={t:g} {every[t]:.2f}" for t in RATIOS))
    print(f"best ratio on the calibration sets: {best:g} ({mean[best]:.2f} dB vs top-1 {top1:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
