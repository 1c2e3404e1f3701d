"""Tiny PIL-only charts (no matplotlib dependency): loss curves and pattern-score bars."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def line_chart(series: dict[str, list[float]], width=640, height=360, title="", log_y=True,
               x_label: str | None = None) -> Image.Image:
    """Curves in one chart; x = index. Non-finite values are skipped."""
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    L, R, T, B = 50, 10, 24, 24
    d.rectangle([L, T, width - R, height - B], outline=(0, 0, 0))
    d.text((L, 4), title, fill=(0, 0, 0))
    vals = [v for s in series.values() for v in s if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
    if not vals:
        d.text((L + 10, T + 10), "no data yet", fill=(0, 0, 0))
        return im
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    lo, hi = f(min(vals)), f(max(vals))
    if hi - lo < 1e-9:
        hi = lo + 1
    n = max(len(s) for s in series.values())
    for tick in range(5):
        yv = lo + (hi - lo) * tick / 4
        y = height - B - (height - T - B) * tick / 4
        d.text((2, y - 6), f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}", fill=(80, 80, 80))
    for ci, (name, s) in enumerate(series.items()):
        col = _COLORS[ci % len(_COLORS)]
        pts = [(L + (width - L - R) * i / max(n - 1, 1), height - B - (height - T - B) * (f(v) - lo) / (hi - lo))
               for i, v in enumerate(s) if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        d.text((width - R - 150, T + 4 + 12 * ci), name, fill=col)
    d.text((L, height - B + 6), x_label or f"steps (0..{n - 1})", fill=(80, 80, 80))
    return im


def bar_chart(groups: dict[str, list[tuple[str, float]]], width=640, title="") -> Image.Image:
    """Horizontal bars grouped by attribute: {attribute: [(class, prob), ...]}."""
    rows = sum(len(v) + 1 for v in groups.values())
    height = 24 + 16 * rows
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    d.text((6, 4), title, fill=(0, 0, 0))
    y = 22
    for gi, (g, items) in enumerate(groups.items()):
        d.text((6, y), g, fill=(0, 0, 0))
        y += 16
        col = _COLORS[gi % len(_COLORS)]
        for name, p in items:
            d.text((16, y), name[:22], fill=(60, 60, 60))
            x0 = 180
            d.rectangle([x0, y + 2, x0 + int((width - x0 - 60) * float(p)), y + 12], fill=col)
            d.text((width - 52, y), f"{float(p):.2f}", fill=(0, 0, 0))
            y += 16
    return im


def to_array(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
