"""Fit a model's router on measured expert quality (cliprpn_core.router_fit): every expert restores every training
pair, and the router's learned correction is fitted so that top-1 routing picks the expert that restores best.
Perception and the experts are not changed; the other tensors are copied as they are.

  python scripts/fit_router.py CKPT --pairs ../shared/data/rain100l_train --pairs ../shared/data/heavy_train \
      [--synth-clean ../shared/data/clean -n 120 --size 256 --seed 7] -o OUT.safetensors [--holdout-every 5] \
      [--measurements m.json] [--threads 2]

Every --holdout-every-th pair (in name order) is held out of the fit and reported apart. --measurements: a JSON file
of the per-pair measurements (written when absent, read when present and made from the same checkpoint), so the
fit can be repeated without running the experts again. Ctrl-C leaves no partial output.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cliprpn_core.checkpoint import file_sha256, load_model, read_metadata, save_model  # noqa: E402
from cliprpn_core.data import pair_files, write_labelled_set  # noqa: E402
from cliprpn_core.imageio import atomic_write_bytes, load_rgb_uint8, read_image  # noqa: E402
from cliprpn_core.inference import Derainer  # noqa: E402
from cliprpn_core.router_fit import Measured, fit, measure, router_logits, stats  # noqa: E402


def pairs_of(dirs):
    """(name, rainy [1,3,H,W], clean 8-bit HWC) of every pair under ``dirs``, in order."""
    for d in dirs:
        for rp, gp in pair_files(d):
            yield f"{Path(d).name}/{rp.name}", read_image(rp), load_rgb_uint8(gp)


def save_measured(m: Measured, path, ckpt_sha: str):
    data = {"checkpoint_sha256": ckpt_sha, "names": m.names, "probs": m.probs.tolist(), "psnr": m.psnr.tolist()}
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))


def load_measured(path, ckpt_sha: str) -> Measured:
    data = json.loads(Path(path).read_text())
    if data.get("checkpoint_sha256") != ckpt_sha:
        raise SystemExit(f"error: {path} was measured on another checkpoint; delete it or give another path")
    return Measured(data["names"], torch.tensor(data["probs"]), torch.tensor(data["psnr"], dtype=torch.float64))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--pairs", action="append", default=[], help="a paired folder (rain/, gt/); repeatable")
    ap.add_argument("--synth-clean", help="also a labelled synthetic set over these clean photos (all four regimes)")
    ap.add_argument("-n", type=int, default=120, help="synthetic images (with --synth-clean)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--holdout-every", type=int, default=5, help="hold every N-th pair out of the fit (0: none)")
    ap.add_argument("--measurements", help="JSON cache of the measurements (written, or read if present)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--pull", type=float, default=0.01)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write the report here too")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if Path(a.out).resolve() == Path(a.checkpoint).resolve():
        ap.error("-o must not be the input checkpoint (write a new file, check it, then replace)")
    digest = file_sha256(a.checkpoint)
    model = load_model(a.checkpoint)
    if a.measurements and Path(a.measurements).exists():
        m = load_measured(a.measurements, digest)
        print(f"read {len(m.names)} measured pairs from {a.measurements}")
    else:
        if not a.pairs and not a.synth_clean:
            ap.error("give --pairs and/or --synth-clean (or an existing --measurements file)")
        from tqdm import tqdm
        derainer = Derainer(model)
        with tempfile.TemporaryDirectory() as tmp:
            dirs = list(a.pairs)
            if a.synth_clean:
                write_labelled_set([a.synth_clean], Path(tmp) / "synthetic", a.n, a.size, a.seed, progress=False)
                dirs.append(str(Path(tmp) / "synthetic"))
            total = sum(len(pair_files(d)) for d in dirs)
            with tqdm(total=total, desc="measure experts", unit="img") as bar:
                m = measure(derainer, pairs_of(dirs), progress=lambda n: bar.update(1))
        if a.measurements:
            save_measured(m, a.measurements, digest)
    n = len(m.names)
    held = [i for i in range(n) if a.holdout_every and i % a.holdout_every == 0]
    fit_idx = sorted(set(range(n)) - set(held))
    train, val = m.subset(fit_idx), m.subset(held)
    val_before = stats(router_logits(model.router, val.probs), val.psnr) if held else None
    res = fit(model.router, train, steps=a.steps, lr=a.lr, pull=a.pull, temperature=a.temperature)
    report = {"checkpoint": f"{a.checkpoint} sha256:{digest[:16]}", "fit_pairs": len(fit_idx), "held_out": len(held),
              "fit": res, "held_out_before": val_before,
              "held_out_after": stats(router_logits(model.router, val.probs), val.psnr) if held else None,
              "settings": {k: getattr(a, k) for k in ("steps", "lr", "pull", "temperature", "holdout_every")},
              "data": list(a.pairs) + ([f"synthetic over {a.synth_clean}: n={a.n} size={a.size} seed={a.seed}"]
                                       if a.synth_clean else [])}
    for part in ("before", "after"):
        print(f"fit pairs, {part}:      {res[part]}")
    if held:
        print(f"held-out pairs, before: {report['held_out_before']}")
        print(f"held-out pairs, after:  {report['held_out_after']}")
    meta = {k: v for k, v in read_metadata(a.checkpoint).items() if k not in ("format", "format_version", "config")}
    meta["router_fit"] = json.dumps({k: report[k] for k in ("checkpoint", "fit_pairs", "settings", "data")})
    save_model(model, a.out, extra_meta=meta)
    print(f"wrote {a.out}")
    if a.json:
        atomic_write_bytes(a.json, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
