"""Make the example inputs the workflows load (example_inputs/clean.png and rainy.png).

The scene is drawn procedurally here (sky, hills, houses, trees, a road; numpy + PIL only), so no
photo from a data set is shipped; the rain is added by the pack's own synthesis
(``cliprpn_core.synthesis.synthesize``, light streaks, fixed seed). The pack copies both files
into ComfyUI's input folder when it loads (nodes/_host.py: install_example_inputs), where the
workflows' Load Image nodes find them.

    python scripts/make_example_inputs.py            # rewrites example_inputs/*.png
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "example_inputs"
W, H = 384, 256
SCENE_SEED = 7
RAIN_SEED = 3
RAIN_REGIME = "light_streaks"


def smooth_noise(rng, h, w, scale):
    small = rng.random((max(2, h // scale), max(2, w // scale))).astype(np.float32)
    im = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def scene(seed: int = SCENE_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.zeros((H, W, 3), np.float32)
    # sky: blue to pale towards the horizon, soft clouds
    t = (yy / (H * 0.55))[..., None]
    img[:] = (1 - t) * np.array([0.33, 0.52, 0.78]) + t * np.array([0.78, 0.84, 0.90])
    clouds = np.clip(smooth_noise(rng, H, W, 24) * 1.6 - 0.75, 0, 1)[..., None]
    img = img * (1 - 0.7 * clouds) + 0.95 * 0.7 * clouds
    # distant hills, then nearer hills
    for base, amp, col, freq in ((0.50, 0.08, (0.42, 0.52, 0.58), 0.011), (0.60, 0.06, (0.30, 0.45, 0.30), 0.023)):
        ridge = H * (base - amp * (np.sin(xx[0] * freq + rng.random() * 6) + 0.5 * np.sin(xx[0] * freq * 2.7)))
        hill = yy > ridge[None, :]
        tex = smooth_noise(rng, H, W, 6)[..., None] * 0.12 - 0.06
        img = np.where(hill[..., None], np.array(col) + tex, img)
    # ground and a road
    ground = yy > H * 0.72
    grass = np.array([0.32, 0.50, 0.22]) + smooth_noise(rng, H, W, 3)[..., None] * 0.16 - 0.08
    img = np.where(ground[..., None], grass, img)
    road = (yy > H * 0.80) & (yy < H * 0.93)
    img = np.where(road[..., None], np.array([0.28, 0.28, 0.30]) + rng.normal(0, 0.015, (H, W, 1)), img)
    dash = road & (np.abs(yy - H * 0.865) < 1.5) & ((xx // 22) % 2 == 0)
    img = np.where(dash[..., None], np.array([0.92, 0.88, 0.70]), img)
    # houses with windows and roofs
    x = 18
    while x < W - 40:
        bw, bh = int(rng.integers(40, 70)), int(rng.integers(45, 90))
        top, bottom = int(H * 0.80) - bh, int(H * 0.80)
        wall = np.array([(0.70, 0.42, 0.32), (0.82, 0.76, 0.62), (0.62, 0.63, 0.66), (0.86, 0.82, 0.74)][rng.integers(4)])
        img[top:bottom, x:x + bw] = wall + rng.normal(0, 0.02, (bottom - top, bw, 3))
        for r in range(top + 8, bottom - 14, 16):
            for c in range(x + 6, x + bw - 10, 14):
                lit = rng.random() < 0.35
                img[r:r + 9, c:c + 7] = (0.95, 0.85, 0.45) if lit else (0.20, 0.26, 0.34)
        img[bottom - 16:bottom, x + bw // 2 - 5:x + bw // 2 + 5] = (0.35, 0.22, 0.15)  # door
        roof_h = int(rng.integers(12, 22))
        for i in range(roof_h):
            inset = int(i * (bw / 2) / roof_h)
            img[top - roof_h + i, max(0, x - 3 + (bw // 2 - inset)):x + 3 + bw // 2 + inset] = (0.45, 0.18, 0.14)
        x += bw + int(rng.integers(14, 40))
    # trees in front of the houses
    for _ in range(7):
        cx, cy, r = rng.integers(0, W), int(H * 0.78) - rng.integers(0, 20), rng.integers(9, 18)
        img[cy:cy + r + 6, cx - 2:cx + 2] = (0.30, 0.20, 0.12)
        blob = (xx - cx) ** 2 + ((yy - cy + r * 0.6) * 1.2) ** 2 < r ** 2
        leaf = np.array([0.18, 0.38, 0.16]) + smooth_noise(rng, H, W, 2)[..., None] * 0.18
        img = np.where(blob[..., None], leaf, img)
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    out = Image.fromarray((img * 255).round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(out)


def add_rain(clean: np.ndarray, seed: int = RAIN_SEED, regime: str = RAIN_REGIME) -> np.ndarray:
    sys.path.insert(0, str(REPO))
    from cliprpn_core.patterns import EXPERTS
    from cliprpn_core.synthesis import synthesize
    x = torch.from_numpy(np.array(clean)).float().div(255).permute(2, 0, 1)[None]
    s = synthesize(x, torch.Generator().manual_seed(seed), regime=[EXPERTS.index(regime)])
    return (s.rainy[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def main():
    OUT.mkdir(exist_ok=True)
    clean = scene()
    rainy = add_rain(clean)
    for name, arr in (("clean.png", clean), ("rainy.png", rainy)):
        Image.fromarray(arr).save(OUT / name, optimize=True)
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
