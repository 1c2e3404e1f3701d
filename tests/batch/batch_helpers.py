"""Helpers shared by the batch tests (a module of its own: several conftest.py live in tests/)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, size=(24, 16), prefix="img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out
