"""Rain-pattern vocabulary shared by the CLIP perceiver, the built-in pattern head, the router
and the synthesiser.

A *pattern* is a set of independent attributes, each a small categorical distribution. The same
layout is produced by CLIP zero-shot matching and by the CLIP-free pattern head, so the router
does not care which one perceived the image.
"""
from __future__ import annotations

from dataclasses import dataclass

# attribute -> ordered class names. Order is part of the checkpoint format: never reorder.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "density": ("sparse", "moderate", "dense"),
    "orientation": ("vertical", "slanted left", "slanted right"),
    "intensity": ("light", "moderate", "heavy"),
    "form": ("thin streaks", "wide streaks", "raindrops on glass", "mist and accumulation"),
}

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)
NUM_CLASSES: tuple[int, ...] = tuple(len(v) for v in ATTRIBUTES.values())
PATTERN_DIM: int = sum(NUM_CLASSES)

# Experts are regimes of rain that need different restoration. The router maps a pattern
# distribution onto them; synthetic labels give the ground-truth expert for training.
EXPERTS: tuple[str, ...] = ("light_streaks", "heavy_streaks", "raindrops", "veil")

# Prompt bank: several templates per class (zero-shot ensembling as in CLIP / DA-CLIP).
TEMPLATES: tuple[str, ...] = (
    "a photo with {}.",
    "a picture taken in {}.",
    "an outdoor photo degraded by {}.",
    "a rainy scene with {}.",
    "an image showing {}.",
)

CLASS_PHRASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "density": (
        ("a few sparse rain streaks", "light scattered rain"),
        ("a moderate amount of rain streaks", "medium rain"),
        ("dense rain streaks everywhere", "very dense rain"),
    ),
    "orientation": (
        ("vertical rain streaks", "rain falling straight down"),
        ("rain streaks slanted to the left", "rain blown diagonally to the left"),
        ("rain streaks slanted to the right", "rain blown diagonally to the right"),
    ),
    "intensity": (
        ("faint light rain", "a light drizzle"),
        ("moderate rainfall", "steady rain"),
        ("heavy rainfall", "a torrential downpour"),
    ),
    "form": (
        ("thin rain streaks", "fine thin lines of rain"),
        ("wide blurry rain streaks", "thick rain streaks"),
        ("raindrops on the glass", "water droplets on a window"),
        ("rain mist and haze", "rain accumulation and fog"),
    ),
}


@dataclass(frozen=True)
class PatternLabel:
    """Class index per attribute (synthetic labels come with the rain synthesis)."""

    density: int
    orientation: int
    intensity: int
    form: int

    def as_list(self) -> list[int]:
        return [self.density, self.orientation, self.intensity, self.form]


def expert_for_label(density: int, intensity: int, form: int) -> int:
    """Ground-truth expert for a synthetic label (used to supervise routing)."""
    if form == 2:
        return EXPERTS.index("raindrops")
    if form == 3:
        return EXPERTS.index("veil")
    if form == 1 or density == 2 or intensity == 2:
        return EXPERTS.index("heavy_streaks")
    return EXPERTS.index("light_streaks")


def prior_routing_matrix():
    """Interpretable initial mapping pattern-probabilities -> expert logits (rows: PATTERN_DIM).

    The router learns on top of this; with no training it already routes sensibly.
    """
    import torch

    w = torch.zeros(PATTERN_DIM, len(EXPERTS))
    off = {}
    o = 0
    for name, classes in ATTRIBUTES.items():
        off[name] = o
        o += len(classes)
    L, H, D, V = range(4)
    w[off["density"] + 0, L] = 1.0
    w[off["density"] + 2, H] = 1.0
    w[off["intensity"] + 0, L] = 1.0
    w[off["intensity"] + 2, H] = 1.0
    w[off["form"] + 0, L] = 1.0
    w[off["form"] + 1, H] = 1.5
    w[off["form"] + 2, D] = 3.0
    w[off["form"] + 3, V] = 3.0
    return w


def split_pattern(vec):
    """Split a [..., PATTERN_DIM] tensor into per-attribute chunks."""
    return dict(zip(ATTRIBUTE_NAMES, vec.split(list(NUM_CLASSES), dim=-1)))


def describe(probs) -> str:
    """One readable line per image, e.g. 'density: dense (0.81) | orientation: ...'."""
    parts = []
    for name, p in split_pattern(probs).items():
        i = int(p.argmax())
        parts.append(f"{name}: {ATTRIBUTES[name][i]} ({float(p[i]):.2f})")
    return " | ".join(parts)
