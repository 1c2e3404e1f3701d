"""Make the pack's Registry icon, docs/icon.png (square, 400x400, the Registry's largest icon size).

Drawn from the pack's own imagery: the shipped example input (example_inputs/rainy.png, a procedurally
drawn scene with the pack's synthetic rain) cut diagonally: the upper-left half as it is, the lower-right
half derained by the shipped default model. No outside picture is used.

    python scripts/make_icon.py            # rewrites docs/icon.png (a few seconds on a CPU)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIZE = 400
OUT = REPO / "docs" / "icon.png"


def main() -> int:
    from cliprpn_core.inference import load_derainer

    rainy = Image.open(REPO / "example_inputs" / "rainy.png").convert("RGB")
    w, h = rainy.size
    side = min(w, h)
    left = (w - side) // 2
    rainy = rainy.crop((left, 0, left + side, side))
    x = torch.from_numpy(np.asarray(rainy, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    d, _ = load_derainer(device="cpu", dtype="fp32")
    clean = d.derain(x).images[0].permute(1, 2, 0).clamp(0, 1).numpy()
    derained = Image.fromarray((clean * 255 + 0.5).astype(np.uint8))

    rainy, derained = (im.resize((SIZE, SIZE), Image.LANCZOS) for im in (rainy, derained))
    cut = Image.new("L", (SIZE, SIZE), 0)  # 255 where the derained half shows
    ImageDraw.Draw(cut).polygon([(SIZE, 0), (SIZE, SIZE), (0, SIZE)], fill=255)
    icon = Image.composite(derained, rainy, cut)
    draw = ImageDraw.Draw(icon)
    draw.line([(SIZE, 0), (0, SIZE)], fill=(255, 255, 255), width=6)
    # rounded frame so the icon reads as one tile on light and dark pages
    frame = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(frame).rounded_rectangle([0, 0, SIZE - 1, SIZE - 1], radius=SIZE // 8, fill=255)
    out = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    out.paste(icon, (0, 0), frame)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out.save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
