"""Routing by outcome: fit the router's learned correction on training pairs so that top-1 routing sends each image
to the expert that restores it best.

Perception (the pattern head, or CLIP) says what rain an image has; the router turns that into an expert: a fixed,
interpretable prior plus a learned linear correction (:class:`arch.ExpertRouter`). Trained on synthetic labels, the
router sends an image to the expert of its rain *type*. When the experts are networks trained one at a time on
their own data, what matters is which expert restores the image best, and that can be measured on training pairs:

- :func:`measure` runs every expert on every pair and scores each output as the protocol does (8-bit, Y-PSNR);
- :func:`fit` moves only the router's linear correction (the prior and perception stay as they are) to minimise the
  expected PSNR lost to the best expert under a softmax of the router's logits, pulled towards its current weights;
- :func:`stats` says how top-1 routing does on measured pairs (mean PSNR routed, of the best expert, how often the
  best was picked).

``scripts/fit_router.py`` is the command line. Plain PyTorch; the derainer is a :class:`inference.Derainer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .arch import ExpertRouter
from .imageio import to_uint8
from .inference import DerainOptions
from .metrics import psnr_y


@dataclass
class Measured:
    """What :func:`measure` found: per pair, its name, the perceived pattern probabilities [N, PATTERN_DIM] and the
    Y-PSNR of each expert's 8-bit output [N, E]."""
    names: list
    probs: torch.Tensor
    psnr: torch.Tensor

    def subset(self, idx) -> Measured:
        idx = list(idx)
        return Measured([self.names[i] for i in idx], self.probs[idx], self.psnr[idx])


def measure(derainer, pairs: Iterable, progress: Callable | None = None) -> Measured:
    """Run every expert on every pair. ``pairs``: (name, rainy [1,3,H,W] or [3,H,W] 0..1, clean 8-bit HWC)."""
    names, probs, scores = [], [], []
    e = derainer.model.config.num_experts
    for name, rainy, clean in pairs:
        rainy = rainy[None] if rainy.dim() == 3 else rainy
        if tuple(rainy.shape[-2:]) != tuple(clean.shape[:2]):
            raise ValueError(f"pair {name}: rainy {tuple(rainy.shape[-2:])} and clean {tuple(clean.shape[:2])} "
                             f"differ in size")
        p, _ = derainer.perceive(rainy)
        row = [psnr_y(to_uint8(derainer.derain(rainy, DerainOptions(expert=k)).images[0]), clean) for k in range(e)]
        names.append(name)
        probs.append(p[0].float())
        scores.append(torch.tensor(row, dtype=torch.float64))
        if progress:
            progress(len(names))
    if not names:
        raise ValueError("no pairs to measure the experts on")
    return Measured(names, torch.stack(probs), torch.stack(scores))


def router_logits(router: ExpertRouter, probs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return router.logits(probs.to(router.linear.weight.device)).cpu()


def stats(logits: torch.Tensor, psnr: torch.Tensor) -> dict:
    """Top-1 routing by ``logits`` [N,E] on measured pairs: mean PSNR routed, of the best expert per pair (the
    oracle), the mean PSNR lost to it, and the share of pairs routed to their best expert."""
    pick = logits.argmax(1)
    routed = psnr.gather(1, pick[:, None])[:, 0]
    best = psnr.max(1).values
    return {"n": int(psnr.shape[0]), "routed_psnr": round(float(routed.mean()), 3),
            "oracle_psnr": round(float(best.mean()), 3), "lost_db": round(float((best - routed).mean()), 3),
            "chose_best": round(float((psnr.argmax(1) == pick).double().mean()), 3),
            "routing": torch.bincount(pick, minlength=psnr.shape[1]).tolist()}


def fit(router: ExpertRouter, m: Measured, steps: int = 400, lr: float = 0.05, pull: float = 0.01,
        temperature: float = 0.5, cap_db: float = 10.0) -> dict:
    """Fit ``router.linear`` in place on the measured pairs ``m``. Loss: the softmax(logits / temperature)-weighted
    PSNR each pair loses to its best expert (capped at ``cap_db``, so one catastrophic expert does not outweigh
    everything else), plus ``pull`` times the squared distance to the starting weights. Deterministic (full-batch
    Adam). Returns the top-1 :func:`stats` before and after on ``m``."""
    if steps < 0 or lr <= 0 or temperature <= 0 or pull < 0:
        raise ValueError("fit needs steps >= 0, lr > 0, temperature > 0 and pull >= 0")
    lin = router.linear
    dev = lin.weight.device
    probs = m.probs.float().to(dev)
    regret = (m.psnr.max(1, keepdim=True).values - m.psnr).clamp(max=cap_db).float().to(dev)
    before = stats(router_logits(router, m.probs), m.psnr)
    w0, b0 = lin.weight.detach().float().clone(), lin.bias.detach().float().clone()
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    with torch.no_grad():
        fixed = 4.0 * probs @ router.prior.to(probs)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            logits = fixed + probs @ w.T + b
            loss = ((logits / temperature).softmax(1) * regret).sum(1).mean()
            loss = loss + pull * ((w - w0).square().sum() + (b - b0).square().sum())
            loss.backward()
            opt.step()
    with torch.no_grad():
        lin.weight.copy_(w.to(lin.weight.dtype))
        lin.bias.copy_(b.to(lin.bias.dtype))
    return {"before": before, "after": stats(router_logits(router, m.probs), m.psnr)}
