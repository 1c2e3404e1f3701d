"""Losses (BasicSR style: small classes with a weight and a reduction) and loss schedules
(fixed, curriculum, dynamic weight averaging, uncertainty weighting)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_REDUCTIONS = ("none", "mean", "sum")


class _Loss(nn.Module):
    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unsupported reduction {reduction!r}; use one of {_REDUCTIONS}")
        self.loss_weight = loss_weight
        self.reduction = reduction

    def _reduce(self, x):
        if self.reduction == "mean":
            return self.loss_weight * x.mean()
        if self.reduction == "sum":
            return self.loss_weight * x.sum()
        return self.loss_weight * x


class L1Loss(_Loss):
    def forward(self, pred, target):
        return self._reduce((pred - target).abs())


class CharbonnierLoss(_Loss):
    def __init__(self, loss_weight=1.0, reduction="mean", eps=1e-3):
        super().__init__(loss_weight, reduction)
        self.eps = eps

    def forward(self, pred, target):
        return self._reduce(torch.sqrt((pred - target) ** 2 + self.eps ** 2))


class PSNRLoss(_Loss):
    """The PSNR deficit of each image: 10 log10(1 + MSE_i / 10^(-ceiling/10)), i.e. about
    ceiling_db - PSNR_i for images below the ceiling, and 0 for a perfect one (positive, so the dynamic
    schedules can weight it). Its gradient is that of -PSNR_i (NAFNet's PSNR loss): it follows the
    protocol, which averages per-image PSNR, and unlike L1/Charbonnier it does not settle for the median
    where rain and texture are confused. Reduced over images (``none`` gives one value per image)."""

    def __init__(self, loss_weight=1.0, reduction="mean", ceiling_db=50.0):
        super().__init__(loss_weight, reduction)
        self.floor = 10.0 ** (-ceiling_db / 10.0)

    def forward(self, pred, target):
        mse = ((pred - target) ** 2).flatten(1).mean(1)
        return self._reduce(10.0 * torch.log10(1.0 + mse / self.floor))


def _gauss(size=11, sigma=1.5, device="cpu"):
    r = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_map(x, y, data_range=1.0):
    """Per-pixel SSIM (Gaussian window 11, sigma 1.5, valid filtering), channel-wise."""
    c = x.shape[1]
    g = _gauss(device=x.device).to(x.dtype)
    kx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    f = lambda t: F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)  # noqa: E731
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    return ((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx * mx + my * my + C1) * (sxx + syy + C2))


class SSIMLoss(_Loss):
    """1 - SSIM."""

    def forward(self, pred, target):
        m = ssim_map(pred.float(), target.float())
        return self._reduce(1 - (m.mean((1, 2, 3)) if self.reduction != "none" else m))


class EdgeLoss(_Loss):
    """Charbonnier distance between Laplacians (as in MPRNet / NeRD-Rain)."""

    def __init__(self, loss_weight=1.0, reduction="mean", eps=1e-3):
        super().__init__(loss_weight, reduction)
        self.eps = eps
        self.register_buffer("k", torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3))

    def forward(self, pred, target):
        c = pred.shape[1]
        k = self.k.to(pred).repeat(c, 1, 1, 1)
        lp = F.conv2d(F.pad(pred, (1, 1, 1, 1), mode="replicate"), k, groups=c)
        lt = F.conv2d(F.pad(target, (1, 1, 1, 1), mode="replicate"), k, groups=c)
        return self._reduce(torch.sqrt((lp - lt) ** 2 + self.eps ** 2))


class FFTLoss(_Loss):
    """L1 between FFT amplitudes (streaks are oriented high-frequency energy)."""

    def forward(self, pred, target):
        a = torch.fft.rfft2(pred.float(), norm="ortho").abs()
        b = torch.fft.rfft2(target.float(), norm="ortho").abs()
        return self._reduce((a - b).abs())


class MaskLoss(_Loss):
    """BCE + soft Dice on rain-mask logits against a 0..1 target mask."""

    def forward(self, logits, target):
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        inter = (p * target).sum((1, 2, 3))
        dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
        if self.reduction == "none":
            return self.loss_weight * (bce + dice.view(-1, 1, 1, 1))
        return self._reduce(bce.mean((1, 2, 3)) + dice)


class MaskScaleLoss(_Loss):
    """Holds a mask's scale to a reference mask's: per image, the squared log ratio of the two mean rain masks
    (sigmoid of the logits; ``eps`` keeps rain-free images, whose masks are near 0, from dominating). The light
    verification reads exactly this mean, so a network trained with it keeps the scale the verification was fitted to
    while its restoration changes."""

    def __init__(self, loss_weight=1.0, reduction="mean", eps=1e-3):
        super().__init__(loss_weight, reduction)
        self.eps = eps

    def forward(self, logits, ref_logits):
        s = torch.sigmoid(logits.float()).mean((1, 2, 3))
        r = torch.sigmoid(ref_logits.float()).mean((1, 2, 3))
        return self._reduce(((s + self.eps).log() - (r + self.eps).log()).pow(2))


class LoadBalanceLoss(_Loss):
    """Switch-Transformer load balance: E * sum_i f_i * P_i (1.0 when perfectly balanced)."""

    def forward(self, router_logits, chosen):
        e = router_logits.shape[-1]
        p = router_logits.float().softmax(-1).mean(0)
        f = F.one_hot(chosen, e).float().mean(0)
        return self.loss_weight * e * (f * p).sum()


LOSSES = {"l1": L1Loss, "charbonnier": CharbonnierLoss, "psnr": PSNRLoss, "ssim": SSIMLoss, "edge": EdgeLoss,
          "fft": FFTLoss}


# ---------------------------------------------------------------------------------------------
# Schedules: map per-term losses to one scalar. ``state_dict`` round-trips as plain JSON.

class LossSchedule(nn.Module):
    """Base: a fixed weighted sum. ``weights`` maps term name -> base weight."""

    kind = "fixed"

    def __init__(self, weights: dict[str, float]):
        super().__init__()
        if not weights:
            raise ValueError("a loss schedule needs at least one term")
        for k, w in weights.items():
            if k not in LOSSES:
                raise ValueError(f"unknown loss term {k!r}; known: {sorted(LOSSES)}")
            if w < 0:
                raise ValueError(f"loss weight for {k!r} must be >= 0, got {w}")
        self.names = list(weights)
        self.base = dict(weights)

    def current_weights(self, step: int, total: int) -> dict[str, float]:
        return dict(self.base)

    def forward(self, terms: dict[str, torch.Tensor], step: int, total: int) -> torch.Tensor:
        w = self.current_weights(step, total)
        return sum(w[k] * terms[k] for k in self.names)

    def observe(self, terms: dict[str, float]):
        """Called once per step with detached loss values."""

    def state(self) -> dict:
        return {}

    def load_state(self, s: dict):
        pass


class CurriculumSchedule(LossSchedule):
    """Pixel -> structure curriculum: weights move linearly from ``start`` to ``end`` weights
    over training (cosine ease)."""

    kind = "curriculum"

    def __init__(self, start: dict[str, float], end: dict[str, float]):
        super().__init__({**{k: 0.0 for k in end}, **start})
        for k in end:
            if k not in LOSSES:
                raise ValueError(f"unknown loss term {k!r}")
        self.end = {k: end.get(k, 0.0) for k in self.names}
        self.start = {k: start.get(k, 0.0) for k in self.names}

    def current_weights(self, step, total):
        t = min(max(step / max(total, 1), 0.0), 1.0)
        a = 0.5 - 0.5 * math.cos(math.pi * t)
        return {k: (1 - a) * self.start[k] + a * self.end[k] for k in self.names}


class DWASchedule(LossSchedule):
    """Dynamic Weight Averaging (Liu et al., CVPR 2019), on top of base weights.

    Every ``period`` steps, each term's relative descent rate r_k = L_k(t-1) / L_k(t-2) (period
    means) sets its multiplier K * softmax(r / T): a term that stopped improving gets more weight.
    Multipliers average to 1, so the overall scale stays that of the base mix."""

    kind = "dwa"

    def __init__(self, weights, temperature: float = 2.0, period: int = 50):
        super().__init__(weights)
        if temperature <= 0 or period < 1:
            raise ValueError("DWA needs temperature > 0 and period >= 1")
        self.T, self.period = temperature, period
        self.mult = {k: 1.0 for k in self.names}
        self.hist: list[dict[str, float]] = []
        self._acc = {k: 0.0 for k in self.names}
        self._n = 0

    def observe(self, terms):
        for k in self.names:
            self._acc[k] += float(terms[k])
        self._n += 1
        if self._n >= self.period:
            self.hist = (self.hist + [{k: v / self._n for k, v in self._acc.items()}])[-2:]
            self._acc = {k: 0.0 for k in self.names}
            self._n = 0
            if len(self.hist) == 2:
                r = torch.tensor([self.hist[1][k] / max(self.hist[0][k], 1e-12) for k in self.names])
                m = len(self.names) * torch.softmax(r / self.T, 0)
                self.mult = {k: float(v) for k, v in zip(self.names, m)}

    def current_weights(self, step, total):
        return {k: self.base[k] * self.mult[k] for k in self.names}

    def state(self):
        return {"mult": self.mult, "hist": self.hist, "acc": self._acc, "n": self._n}

    def load_state(self, s):
        self.mult, self.hist, self._acc, self._n = s["mult"], s["hist"], s["acc"], s["n"]


class UncertaintySchedule(LossSchedule):
    """Homoscedastic uncertainty weighting (Kendall et al., CVPR 2018): learnable s_k,
    L = sum_k base_k * (exp(-s_k) L_k + s_k). Its parameters must be in the optimizer."""

    kind = "uncertainty"

    def __init__(self, weights):
        super().__init__(weights)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def current_weights(self, step, total):
        return {k: self.base[k] * float(torch.exp(-self.log_vars[i])) for i, k in enumerate(self.names)}

    def forward(self, terms, step, total):
        s = self.log_vars
        return sum(self.base[k] * (torch.exp(-s[i]) * terms[k] + s[i]) for i, k in enumerate(self.names))


def build_schedule(spec: dict) -> LossSchedule:
    """From a config dict: {type: fixed|curriculum|dwa|uncertainty, weights: {...}, ...}."""
    spec = dict(spec)
    kind = spec.pop("type", "fixed")
    if kind == "fixed":
        return LossSchedule(spec["weights"])
    if kind == "curriculum":
        return CurriculumSchedule(spec["start"], spec["end"])
    if kind == "dwa":
        return DWASchedule(spec["weights"], spec.get("temperature", 2.0), spec.get("period", 50))
    if kind == "uncertainty":
        return UncertaintySchedule(spec["weights"])
    raise ValueError(f"unknown loss schedule {kind!r}; use fixed, curriculum, dwa or uncertainty")


PRESETS = {
    "charbonnier": {"type": "fixed", "weights": {"charbonnier": 1.0}},
    "mix": {"type": "fixed", "weights": {"charbonnier": 1.0, "ssim": 0.2, "edge": 0.05, "fft": 0.01}},
    "curriculum": {"type": "curriculum", "start": {"charbonnier": 1.0},
                   "end": {"charbonnier": 1.0, "ssim": 0.4, "edge": 0.1, "fft": 0.02}},
    "dwa": {"type": "dwa", "weights": {"charbonnier": 1.0, "ssim": 0.2, "edge": 0.05, "fft": 0.01},
            "temperature": 2.0, "period": 50},
    "uncertainty": {"type": "uncertainty", "weights": {"charbonnier": 1.0, "ssim": 1.0, "edge": 1.0, "fft": 1.0}},
    # uncertainty weighting's starting weights, held fixed: its fixed counterpart in the ablation
    "equal_mix": {"type": "fixed", "weights": {"charbonnier": 1.0, "ssim": 1.0, "edge": 1.0, "fft": 1.0}},
    # the PSNR loss in place of Charbonnier; 0.005 gives it about 1.8x Charbonnier's gradient norm in the mix
    # (measured on the shipped model), so the mask and pattern terms keep their share
    "psnr": {"type": "fixed", "weights": {"psnr": 0.005}},
    # the same mix with fixed weights: the fixed counterpart of psnr_dwa in the ablation
    "psnr_mix": {"type": "fixed", "weights": {"psnr": 0.005, "ssim": 0.2, "edge": 0.05, "fft": 0.01}},
    "psnr_dwa": {"type": "dwa", "weights": {"psnr": 0.005, "ssim": 0.2, "edge": 0.05, "fft": 0.01},
                 "temperature": 2.0, "period": 50},
    # equal_mix with the PSNR loss as its pixel term (the two best findings of the loss ablation together),
    # and its dynamic counterpart under uncertainty weighting
    "psnr_equal": {"type": "fixed", "weights": {"psnr": 0.005, "ssim": 1.0, "edge": 1.0, "fft": 1.0}},
    "psnr_uncertainty": {"type": "uncertainty", "weights": {"psnr": 0.005, "ssim": 1.0, "edge": 1.0, "fft": 1.0}},
}
