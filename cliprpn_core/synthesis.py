"""Labelled rain synthesis on torch tensors (GPU or CPU), batched and seeded.

Regimes (one per expert): light streaks (Rain100L-like, Photoshop-style screen blend), heavy
streaks (dense, long, wide, with an accumulation veil, Rain200H-like), raindrops on glass
(Qian et al.), and veil/mist (Yang et al.: O = a(B + S) + (1 - a) A). Mixed rain = several streak
layers with different angles and lengths in one image.

``synthesize(clean, gen)`` returns ``RainSample(rainy, clean, mask, labels, expert)``; labels are
class indices per attribute of ``patterns.ATTRIBUTES``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .patterns import ATTRIBUTE_NAMES, ATTRIBUTES, EXPERTS, expert_for_label

REGIMES = EXPERTS
FORM_WIDE_STREAKS = ATTRIBUTES["form"].index("wide streaks")  # the form label of downpour streaks
KERNEL_SIZE = 73  # longest streak (70 px) + margin


@dataclass
class RainSample:
    rainy: torch.Tensor  # [B,3,H,W] 0..1
    clean: torch.Tensor  # [B,3,H,W] 0..1
    mask: torch.Tensor  # [B,1,H,W] 0..1 (where rain hides the background)
    labels: torch.Tensor  # [B, len(ATTRIBUTES)] long
    expert: torch.Tensor  # [B] long, the regime's expert


def _u(gen, lo, hi, device):
    return lo + (hi - lo) * torch.rand((), generator=gen, device="cpu").item()


def line_kernels(lengths, angles_deg, widths, size=None, device="cpu", taper=None):
    """Motion-blur line kernels [N,1,k,k] (sum 1): length L, angle from vertical (positive =
    falling to the right), Gaussian cross-section of std ``width``. ``taper`` (0..1 per kernel)
    blends the flat profile along the streak with a Hann window: real streaks fade at both ends."""
    lengths = torch.as_tensor(lengths, dtype=torch.float32, device=device)
    th = torch.as_tensor(angles_deg, dtype=torch.float32, device=device) * math.pi / 180
    wd = torch.as_tensor(widths, dtype=torch.float32, device=device).clamp_min(0.3)
    k = size or (int(lengths.max().item()) | 1) + 2
    r = torch.arange(k, device=device, dtype=torch.float32) - (k - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    dx, dy = torch.sin(th)[:, None, None], torch.cos(th)[:, None, None]
    along = xx * dx + yy * dy
    perp = xx * dy - yy * dx
    half = lengths[:, None, None] / 2
    prof = (along.abs() <= half).float()
    if taper is not None:
        t = torch.as_tensor(taper, dtype=torch.float32, device=device).view(-1, 1, 1)
        hann = torch.cos(math.pi / 2 * (along / half.clamp_min(1)).clamp(-1, 1)) ** 2
        prof = prof * ((1 - t) + t * hann)
    w = torch.exp(-0.5 * (perp / wd[:, None, None]) ** 2) * prof
    w = w / w.sum((1, 2), keepdim=True).clamp_min(1e-8)
    return w[:, None]


def streak_layer(b, h, w, density, length, angle, width, brightness, gen, device, taper=None, faint=None):
    """One streak layer per image, values in 0..1 [b,1,h,w]. All parameters are [b] tensors;
    ``taper`` (0..1) fades streak ends, ``faint`` (0..1) skews streak amplitudes towards faint ones."""
    # fixed kernel and padding sizes: constant shapes keep GPU kernels (and autotuners) warm
    k = KERNEL_SIZE
    pad = k // 2
    H, W = h + 2 * pad, w + 2 * pad
    u = torch.rand((b, 1, H, W), generator=gen, device="cpu").to(device)
    amp = torch.rand((b, 1, H, W), generator=gen, device="cpu").to(device)
    if faint is not None:  # amplitude ~ amp ** (1 + 2 faint): many faint streaks, a few bright ones
        f = faint.to(device).view(-1, 1, 1, 1)
        amp = amp.clamp_min(1e-6) ** (1 + 2 * f) * (1 + f)
    dots = (u < density.view(-1, 1, 1, 1).to(device)).float() * (0.35 + 0.65 * amp)
    ker = line_kernels(length.clamp_max(k - 2), angle, width, size=k, device=device, taper=taper)
    s = F.conv2d(dots.view(1, b, H, W), ker, groups=b).view(b, 1, H - ker.shape[-1] + 1, W - ker.shape[-1] + 1)
    # a single dot spreads over ~length pixels with sum-normalised kernel: rescale to its amplitude
    gain = length.to(device).view(-1, 1, 1, 1) * (width.to(device).view(-1, 1, 1, 1).clamp_min(0.5) * 2.0)
    if taper is not None:  # a Hann profile has half the area of a flat one: keep the peak comparable
        gain = gain * (1 - 0.5 * taper.to(device).view(-1, 1, 1, 1))
    return (s * gain * brightness.to(device).view(-1, 1, 1, 1)).clamp(0, 1)


def noise_streak_layer(b, h, w, threshold, span, length, angle, width, brightness, gen, device, taper=None):
    """Streaks the way image editors make them (noise, motion blur, levels): Gaussian noise smeared
    along the streak direction, normalised to unit variance, then levels map [threshold,
    threshold + span] to [0, 1]. Streaks appear where the smeared noise peaks, so lengths and
    brightness vary within the image and the ends fade. Lower thresholds give denser rain.
    All parameters are [b] tensors; returns [b,1,h,w] in 0..1."""
    k = KERNEL_SIZE
    pad = k // 2
    n = torch.randn((b, 1, h + 2 * pad, w + 2 * pad), generator=gen, device="cpu").to(device)
    ker = line_kernels(length.clamp_max(k - 2), angle, width, size=k, device=device, taper=taper)
    s = F.conv2d(n.view(1, b, h + 2 * pad, w + 2 * pad), ker, groups=b).view(b, 1, h, w)
    s = s / ker.pow(2).sum((1, 2, 3)).sqrt().view(-1, 1, 1, 1)  # unit variance whatever the kernel
    v = lambda t: t.to(device).view(-1, 1, 1, 1)  # noqa: E731
    return ((s - v(threshold)) / v(span)).clamp(0, 1) * v(brightness)


# coverage (share of pixels > 0.05) per unit dot density of streak_layer, measured on light
# settings: puts both streak generators on one density scale for the labels
COVERAGE_PER_DENSITY = 48.0


def _orientation_label(angle):
    return torch.where(angle > 7, 2, torch.where(angle < -7, 1, 0))


def _drops(b, h, w, gen, device):
    """Soft raindrop masks [b,1,h,w] and per-image refraction shift."""
    yy = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w)
    m = torch.zeros(b, 1, h, w, device=device)
    for i in range(b):
        n = int(_u(gen, 6, 30, device))
        cy = torch.rand(n, generator=gen).to(device) * h
        cx = torch.rand(n, generator=gen).to(device) * w
        r = (4 + torch.rand(n, generator=gen) * (min(h, w) / 10)).to(device)
        ar = (0.7 + 0.6 * torch.rand(n, generator=gen)).to(device)
        d = ((yy - cy.view(-1, 1, 1)) / (r * ar).view(-1, 1, 1)) ** 2 + ((xx - cx.view(-1, 1, 1)) / r.view(-1, 1, 1)) ** 2
        m[i, 0] = (1.5 * (1 - d)).clamp(0, 1).amax(0)
    return m


STYLES = ("classic", "calibrated", "downpour", "mixed")


def _smooth_field(b, h, w, gen, device, cells=(3, 5)):
    """A smooth random field [b,1,h,w] in -1..1: bicubic upsampling of a coarse grid of uniform noise."""
    gh, gw = max(2, cells[0]), max(2, cells[1])
    g = torch.rand((b, 1, gh, gw), generator=gen, device="cpu").to(device) * 2 - 1
    return F.interpolate(g, size=(h, w), mode="bicubic", align_corners=True).clamp(-1, 1)


def _blur(x, sigma):
    """Per-image Gaussian blur of [b,1,h,w] by ``sigma`` ([b] tensor, px; 0 leaves the image alone)."""
    b, _, h, w = x.shape
    k = 2 * int(math.ceil(3 * float(sigma.max().clamp_min(0.3)))) + 1
    r = torch.arange(k, device=x.device, dtype=torch.float32) - (k - 1) / 2
    s = sigma.to(x.device).clamp_min(1e-3).view(-1, 1)
    g = torch.exp(-0.5 * (r.view(1, -1) / s) ** 2)
    g = g / g.sum(1, keepdim=True)
    x = F.conv2d(F.pad(x.view(1, b, h, w), (k // 2, k // 2, 0, 0), mode="reflect"), g.view(b, 1, 1, k), groups=b)
    x = F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="reflect"), g.view(b, 1, k, 1), groups=b)
    return x.view(b, 1, h, w)


def downpour(clean: torch.Tensor, gen: torch.Generator):
    """Heavy rain as photographed (the "downpour" style of the heavy regime): streaks at three depths
    under one wind direction (far: dense, thin, faint and defocused, the sheet texture of a
    downpour; middle: the Rain200H-like streaks; near: sparse, wide, soft, out-of-focus streaks)
    and an uneven rain accumulation (O = t (B + S) + (1 - t) A with a smooth transmission map t).
    Returns (rainy [b,3,h,w], streak layer S [b,1,h,w], mean transmission [b], wind angle [b] in degrees)."""
    b, _, h, w = clean.shape
    dev = clean.device
    R = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=gen)  # noqa: E731
    base = torch.where(torch.rand(b, generator=gen) < 0.4, R(-5, 5), R(-30, 30))
    layers = (  # density, length, width, brightness, blur sigma, angle jitter
        (R(0.008, 0.025), R(8, 70), R(0.4, 0.9), R(0.03, 0.1), R(0.6, 1.6), R(-3, 3)),
        (R(0.001, 0.005), R(30, 70), R(0.8, 1.8), R(0.1, 0.35), R(0.0, 0.6), R(-3, 3)),
        (R(0.0, 0.0006), R(50, 70), R(2.0, 4.5), R(0.06, 0.18), R(1.5, 3.0), R(-3, 3)),
    )
    S = torch.zeros(b, 1, h, w, device=dev)
    for dens, length, width, bright, sigma, jitter in layers:
        L = streak_layer(b, h, w, dens, length.round(), (base + jitter).clamp(-40, 40), width, bright, gen, dev)
        S = 1 - (1 - S) * (1 - _blur(L, sigma))
    rainy = 1 - (1 - clean) * (1 - S.expand_as(clean))
    t0 = R(0.65, 0.95)
    t = (t0.to(dev).view(-1, 1, 1, 1) + R(0.03, 0.12).to(dev).view(-1, 1, 1, 1)
         * _smooth_field(b, h, w, gen, dev)).clamp(0.4, 1)
    A = (R(0.7, 1.0).view(-1, 1, 1, 1) + R(-0.04, 0.04).view(-1, 1, 1, 1) * torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1))
    rainy = t * rainy + (1 - t) * A.to(dev).clamp(0, 1)
    return rainy.clamp(0, 1), S, t0, base


def synthesize(clean: torch.Tensor, gen: torch.Generator, regime: list[int] | None = None,
               probs: tuple[float, ...] = (0.5, 0.25, 0.1, 0.15), style: str = "classic") -> RainSample:
    """Add labelled rain to a batch of clean images [B,3,H,W] in 0..1.

    ``regime``: expert index per image; drawn from ``probs`` when None. ``gen`` is a CPU
    generator: the same seed gives the same rain on any device. ``style``: "classic" (crisp
    streaks of even brightness; the shipped model was trained on it, and it scores better on
    Rain100L) or "calibrated" (light streaks matched to the statistics of the Rain200L training
    layers: fainter, tapered, lengths varying within an image, half of the images from the
    noise-blur-levels generator) or "downpour" (classic, but heavy-streak images are rendered by
    ``downpour``: streaks at three depths with defocus and an uneven accumulation veil, closer to
    photographed downpours) or "mixed" (classic, with each heavy-streak image rendered by ``downpour``
    with probability 1/2: both kinds of heavy rain for one heavy network)."""
    if clean.dim() != 4 or clean.shape[1] != 3:
        raise ValueError(f"synthesize expects [B,3,H,W], got {tuple(clean.shape)}")
    if style not in STYLES:
        raise ValueError(f"unknown synthesis style {style!r}; choose one of {', '.join(STYLES)}")
    cal = style == "calibrated"
    b, _, h, w = clean.shape
    dev = clean.device
    if regime is None:
        regime = torch.multinomial(torch.tensor(probs, dtype=torch.float32), b, replacement=True, generator=gen).tolist()
    R = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=gen)  # noqa: E731
    reg = torch.tensor(regime)
    heavy, drop, veil = (reg == 1), (reg == 2), (reg == 3)  # light (0) is the default everywhere below

    # primary streak layer, parameters by regime (draw order is part of the seeded contract)
    density = torch.where(heavy, R(0.004, 0.02), torch.where(veil, R(0.0005, 0.004),
                                                             R(0.0015, 0.008) if cal else R(0.0008, 0.006)))
    length = torch.where(heavy, R(20, 60), R(12, 65)).round()
    angle = torch.where(torch.rand(b, generator=gen) < 0.3, R(-4, 4), R(-35, 35))
    width = torch.where(heavy, R(0.6, 2.0), R(0.45, 1.2) if cal else R(0.3, 0.9))
    bright = torch.where(heavy, R(0.25, 0.6), R(0.12, 0.75) if cal else R(0.25, 0.85))
    taper = faint = None
    if cal:
        taper = torch.where(torch.rand(b, generator=gen) < 0.6, R(0.5, 1.0), torch.zeros(b))
        faint = torch.where(heavy, torch.zeros(b), R(0.0, 1.0))
    has_streaks = ~drop | (torch.rand(b, generator=gen) < 0.3)
    density = torch.where(has_streaks, density, torch.zeros(b))
    if not cal:
        S = streak_layer(b, h, w, density, length, angle, width, bright, gen, dev)
    else:
        # streak lengths vary within an image: a share of the streaks in a shorter sub-layer
        short = R(0.0, 0.6) * has_streaks
        S = streak_layer(b, h, w, density * (1 - short), length, angle, width, bright, gen, dev, taper, faint)
        S_short = streak_layer(b, h, w, density * short, (length * R(0.35, 0.7)).clamp_min(5).round(),
                               angle + R(-3, 3), width, bright, gen, dev, taper, faint)
        S = 1 - (1 - S) * (1 - S_short)
        # half of the streak images use the noise-blur-levels generator instead of dots
        noisy = has_streaks & ~veil & (torch.rand(b, generator=gen) < 0.5)
        thr, span = torch.where(heavy, R(0.0, 0.9), R(0.6, 1.6)), R(1.0, 2.5)
        if noisy.any():
            Sn = noise_streak_layer(b, h, w, thr, span, (length * 1.5).clamp_max(KERNEL_SIZE - 2), angle, width,
                                    bright, gen, dev, taper)  # thresholding shortens streaks: longer smear
            S = torch.where(noisy.to(dev).view(-1, 1, 1, 1), Sn, S)
            cover = (Sn > 0.05).float().mean((1, 2, 3)).cpu()
            density = torch.where(noisy, cover / COVERAGE_PER_DENSITY, density)
    # mixed rain: a second layer at another angle / length
    p_mixed = torch.where(heavy | veil, 0.3, 0.15) if cal else 0.3
    mixed = (torch.rand(b, generator=gen) < p_mixed) & has_streaks
    if mixed.any():
        S2 = streak_layer(b, h, w, density * R(0.3, 1.0) * mixed, (length * R(0.5, 1.5)).clamp(5, 70).round(),
                          (angle + R(-25, 25)).clamp(-45, 45), width * R(0.7, 1.3), bright * R(0.6, 1.0), gen, dev,
                          taper, faint)
        S = 1 - (1 - S) * (1 - S2)

    B = clean
    rainy = 1 - (1 - B) * (1 - S.expand_as(B))  # screen blend, as Rain100L/H were made
    # veil / accumulation (heavy and veil regimes)
    alpha = torch.where(veil, R(0.45, 0.8), torch.where(heavy, R(0.8, 0.97), torch.ones(b))).to(dev).view(-1, 1, 1, 1)
    A = R(0.75, 1.0).to(dev).view(-1, 1, 1, 1)
    grad = torch.linspace(0, 1, h, device=dev).view(1, 1, h, 1) * R(-0.15, 0.15).to(dev).view(-1, 1, 1, 1)
    a_map = (alpha + grad * (alpha < 1)).clamp(0.3, 1)
    rainy = a_map * rainy + (1 - a_map) * A
    mask = S.clone()
    # raindrops on glass
    if drop.any():
        idx = drop.nonzero().flatten().tolist()
        M = _drops(len(idx), h, w, gen, dev)
        src = rainy[idx]
        refr = F.avg_pool2d(torch.flip(src, dims=(2,)), 7, stride=1, padding=3)
        refr = 0.85 * refr + 0.15 * F.avg_pool2d(src, 9, stride=1, padding=4) + 0.05
        rainy[idx] = (1 - M) * src + M * refr.clamp(0, 1)
        mask[idx] = torch.maximum(mask[idx], M)
    rainy = rainy.clamp(0, 1)
    mask = (mask > 0.02).float() * 0.5 + 0.5 * mask.clamp(0, 1)

    # labels
    dens_lab = torch.where(density < 0.003, 0, torch.where(density < 0.01, 1, 2))
    dens_lab = torch.where(drop & ~has_streaks, 0, dens_lab)
    inten = (bright * density.clamp_max(0.03) * 80 + (1 - alpha.cpu().view(-1)) * 3)
    int_lab = torch.where(inten < 0.25, 0, torch.where(inten < 1.0, 1, 2))
    form = torch.where(drop, 2, torch.where(veil, 3, torch.where(width > 1.0, 1, 0)))
    ori = _orientation_label(angle)
    pour = None  # the heavy images re-rendered as downpours, after the classic draws
    if style == "downpour":
        pour = heavy
    elif style == "mixed":
        pour = heavy & (torch.rand(b, generator=gen) < 0.5)
    if pour is not None and pour.any():
        idx = pour.nonzero().flatten().tolist()
        r, S_d, _, base = downpour(clean[idx], gen)
        rainy[idx] = r
        mask[idx] = (S_d > 0.02).float() * 0.5 + 0.5 * S_d.clamp(0, 1)
        dens_lab[idx], int_lab[idx], form[idx] = 2, 2, FORM_WIDE_STREAKS
        ori[idx] = _orientation_label(base)
    labels = torch.stack([dens_lab, ori, int_lab, form], 1).long()
    expert = torch.tensor(regime, dtype=torch.long)
    assert labels.shape[1] == len(ATTRIBUTE_NAMES)
    return RainSample(rainy, clean, mask, labels.to(dev), expert.to(dev))


def rain_layer_stats(rainy: torch.Tensor, clean: torch.Tensor) -> dict:
    """Statistics of (rain - clean) used to calibrate synthesis against real pairs."""
    d = (rainy - clean).mean(1).flatten()
    return {
        "mean": float(d.mean()),
        "std": float(d.std()),
        "frac_gt_0.05": float((d > 0.05).float().mean()),
        "frac_gt_0.15": float((d > 0.15).float().mean()),
        "p99": float(d.quantile(0.99)) if d.numel() < 16_000_000 else float(d[:16_000_000].quantile(0.99)),
    }


__all__ = ["RainSample", "synthesize", "STYLES", "noise_streak_layer", "line_kernels", "streak_layer",
           "rain_layer_stats", "REGIMES", "expert_for_label"]
