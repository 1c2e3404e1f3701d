"""Draw docs/pipeline.png (the README's overview picture) with PIL only."""
from pathlib import Path

from PIL import Image, ImageDraw

W, H = 980, 300
im = Image.new("RGB", (W, H), "white")
d = ImageDraw.Draw(im)


def box(x, y, w, h, text, fill):
    d.rounded_rectangle([x, y, x + w, y + h], 10, fill=fill, outline=(40, 40, 40), width=2)
    lines = text.split("\n")
    for i, t in enumerate(lines):
        d.text((x + 10, y + h / 2 - 7 * len(lines) + 14 * i), t, fill=(0, 0, 0))
    return (x, y, w, h)


def arrow(a, b):
    ax, ay = a[0] + a[2], a[1] + a[3] / 2
    bx, by = b[0], b[1] + b[3] / 2
    d.line([ax, ay, bx, by], fill=(40, 40, 40), width=2)
    d.polygon([(bx, by), (bx - 9, by - 5), (bx - 9, by + 5)], fill=(40, 40, 40))


img = box(10, 120, 110, 60, "rainy image\n(any size, batch)", (230, 230, 230))
per = box(160, 30, 190, 70, "CLIP Rain Perceiver\ndensity, orientation,\nintensity, form", (198, 219, 239))
rou = box(390, 30, 160, 70, "Expert Router\ntop-k / temperature /\noverride", (199, 233, 192))
enc = box(160, 200, 190, 60, "shared encoder +\nMask Estimator (multi-scale)", (253, 208, 162))
att = box(390, 200, 160, 60, "mask-guided\ncross-attention", (253, 208, 162))
ex = box(590, 90, 200, 140, "experts (only routed ones run)\n- light streaks\n- heavy streaks\n- raindrops\n- veil / mist", (218, 218, 235))
out = box(830, 120, 140, 60, "derained image\n+ rain MASK", (230, 230, 230))
arrow(img, per)
arrow(per, rou)
arrow(img, enc)
arrow(enc, att)
arrow(rou, ex)
arrow(att, ex)
arrow(ex, out)
d.text((10, 8), "CLIP-RPN: perceive the rain, route to a specialist, restore with mask-guided cross-attention", fill=(0, 0, 0))
out_path = Path(__file__).resolve().parents[1] / "docs" / "pipeline.png"
out_path.parent.mkdir(exist_ok=True)
im.save(out_path)
print(out_path)
