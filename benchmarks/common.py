"""What the benchmark scripts share: where the data and the shipped model are, 8-bit rounding, deraining a
paired set by the protocol, and the calibration images of the expert-check diagnostics."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cliprpn_core import default_model_path
from cliprpn_core.data import (
    RainLayerSource,
    SyntheticSource,
    random_crops,
    rotate_center,
    rotation_crop_size,
)
from cliprpn_core.imageio import list_images, load_rgb_uint8, read_image, save_image, to_uint8
from cliprpn_core.inference import DerainOptions, resize
from cliprpn_core.metrics import evaluate_folders
from cliprpn_core.patterns import EXPERTS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # data sets beside the repository (../shared/data)
DEFAULT_CHECKPOINT = default_model_path()


def upscaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """[C,H,W] or [B,C,H,W] enlarged ``factor`` times (bicubic, clamped to 0..1, as inference.resize does): the
    benchmarks' stand-in for a larger photo of the same scene, its rain drawn larger."""
    h, w = x.shape[-2:]
    one = x.dim() == 3
    y = resize(x[None] if one else x, (round(h * factor), round(w * factor)))
    return y[0] if one else y


def derain_set(derainer, set_dir, options: DerainOptions | None = None):
    """Derain every image of a paired set (rain/, gt/) with ``Derainer.derain(image, options)``, write the outputs
    as 8-bit PNG and score them from the files (metrics.evaluate_folders). Returns its result, the expert routing
    ranked first for each image (by file stem) and the seconds spent deraining."""
    chosen = {}
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        for f in list_images(Path(set_dir) / "rain"):
            r = derainer.derain(read_image(f), options)
            chosen[f.stem] = EXPERTS[int(r.routing[0].argmax())]
            save_image(r.images[0], Path(out) / (f.stem + ".png"))
        secs = time.perf_counter() - t
        ev = evaluate_folders(out, Path(set_dir) / "gt", progress=False, rain_dir=Path(set_dir) / "rain")
    return ev, chosen, secs


def probe_batches(source: RainLayerSource, n: int, size: int, rotations, gains, seed: int):
    """Yields (rotation, gain, rainy, clean): real rain layers of ``source`` over crops of its clean photos,
    the same layer crops and backgrounds for every setting; the layers are taken in turn from all of
    ``source``'s (build it with ``only`` = light or heavy)."""
    gen = torch.Generator().manual_seed(seed)
    clean = random_crops(source.clean.images, n, size, gen, "cpu", scale_range=(0.5, 1.0))
    layers = random_crops(source.layers, n, rotation_crop_size(size), gen, "cpu",
                          indices=[i % len(source.layers) for i in range(n)])
    for rot in rotations:
        lay = rotate_center(layers, torch.full((n,), float(rot)), size)
        for g in gains:
            yield rot, g, (clean + lay * g).clamp(0, 1), clean


def calibration_sets(data: Path, n: int, size: int, seed: int):
    """The expert-check diagnostics' training-data sets (routing_check, expert_fusion): yields (name, images),
    each image (rainy [3,H,W], clean 8-bit HWC, label or None): the real training pairs, their light and heavy
    rain layers over clean crops turned -40..40 degrees, synthetic rain over clean crops."""
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
            imgs += [(r, to_uint8(c)) for r, c in zip(rainy, clean)]
        yield f"{kind} layers over clean, turned -40..40", [(r, c, f"{kind}_streaks") for r, c in imgs]
    gen = torch.Generator().manual_seed(seed)
    s = SyntheticSource([data / "clean"], min_side=size).batch(4 * n, size, gen, "cpu")
    yield "synthetic rain over clean", [(r, to_uint8(c), EXPERTS[int(e)]) for r, c, e in zip(s.rainy, s.clean, s.expert)]


def calibration_args(ap: argparse.ArgumentParser) -> None:
    """The options of the scripts that measure on calibration_sets."""
    ap.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--n", type=int, default=16, help="images per rotation (layer sets); synthetic: 4n")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", nargs="*", default=[], help="test sets reported beside (not used for the choice)")
    ap.add_argument("--data", default=str(DATA))
