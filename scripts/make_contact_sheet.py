"""Contact sheet of real rainy photos: input | one model | another model (default settings: routed, one pass).

  python scripts/make_contact_sheet.py OLD.safetensors NEW.safetensors [--images ../shared/data/real_rain]
         [--count 8] [--width 320] [--out docs/real_rain_contact_sheet.jpg] [--labels "stage 6" "stage 7"]
         [--names 001 008] [--expert heavy_streaks]

The photos are chosen without looking at them: ``count`` evenly spaced files of the sorted folder (first and
last included), unless ``--names`` lists them (file names or stems). Each row is one photo; the routing each model
chose is printed under its column. ``--expert`` forces one expert in both models (to compare one expert network).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing the package
from cliprpn_core.checkpoint import load_model  # noqa: E402
from cliprpn_core.imageio import list_images, read_image, to_uint8  # noqa: E402
from cliprpn_core.inference import Derainer, DerainOptions  # noqa: E402
from cliprpn_core.patterns import EXPERTS  # noqa: E402


def evenly_spaced(files, count):
    if count >= len(files):
        return list(files)
    step = (len(files) - 1) / (count - 1) if count > 1 else 0
    return [files[round(i * step)] for i in range(count)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "real_rain"))
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--width", type=int, default=400)
    ap.add_argument("--labels", nargs=2, default=["previous model", "new model"])
    ap.add_argument("--out", default=str(ROOT / "docs" / "real_rain_contact_sheet.jpg"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--names", nargs="+", help="these photos (file names or stems) instead of evenly spaced ones")
    ap.add_argument("--expert", choices=EXPERTS, help="force this expert in both models")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    files = list_images(a.images)
    if a.names:
        by = {k: f for f in files for k in (f.name, f.stem)}
        missing = [n for n in a.names if n not in by]
        if missing:
            ap.error(f"not in {a.images}: {', '.join(missing)}")
        files = [by[n] for n in a.names]
    else:
        files = evenly_spaced(files, a.count)
    opt = DerainOptions(expert=None if a.expert is None else EXPERTS.index(a.expert))
    models = [Derainer(load_model(p), device="cpu", dtype="fp32") for p in (a.old, a.new)]
    rows = []
    for f in files:
        x = read_image(f)
        cells = [(Image.fromarray(to_uint8(x)), f.name)]
        for d in models:
            r = d.derain(x, opt)
            cells.append((Image.fromarray(to_uint8(r.images[0])), EXPERTS[int(r.routing[0].argmax())]))
        rows.append(cells)
    w = a.width
    h = max(round(c.height * w / c.width) for row in rows for c, _ in row)
    head, foot = 26, 18
    sheet = Image.new("RGB", (3 * w, head + len(rows) * (h + foot)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(["rainy input", *a.labels]):
        draw.text((j * w + 6, 6), title, fill="black")
    for i, row in enumerate(rows):
        y = head + i * (h + foot)
        for j, (im, note) in enumerate(row):
            t = im.resize((w, round(im.height * w / im.width)), Image.LANCZOS)
            sheet.paste(t, (j * w, y))
            label = note if j == 0 else (f"forced: {note}" if a.expert else f"routed: {note}")
            draw.text((j * w + 6, y + t.height + 3), label, fill="black")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=90)
    print(f"{out}: {len(rows)} photos ({', '.join(f.name for f in files)})")


if __name__ == "__main__":
    main()
