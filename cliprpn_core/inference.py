"""Inference for any size and batch: channel handling, validation, padding, feathered tiling,
per-image perception and routing, fp32/fp16/bf16. Used by the CLI, the nodes and batch jobs."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu_memory
from .arch import CLIPRPN, HANDOVER, pattern_probs, route, route_pattern
from .config import TRAINING_SHORT_SIDE, check_passes
from .patterns import EXPERTS, PATTERN_DIM

MIN_SIDE = 8
MIN_WORK_SIDE = 64  # a working size below this would leave the networks too little of the image
AUTO_TILE_PIXELS = 2_000_000  # larger images are tiled automatically
DEFAULT_TILE = 512
# On the CPU, a full-resolution activation larger than glibc's ceiling for reusing freed memory (32 MiB, its largest
# dynamic mmap threshold) is mapped fresh and page-faulted in at every allocation: a whole 1-MP image ran at about
# 3.1 s/MP where 384-px tiles (activations of 27 MiB) ran at 1.5-1.7, overlap included (benchmarks/speed.py). So on the
# CPU an image is tiled by the largest tile whose widest activation stays under CPU_TILE_BYTES, once the image is at
# least twice that tile's area (below that the overlap costs more than the page faults), unless the process keeps
# freed memory for reuse (cpu_memory, the CLI).
CPU_TILE_BYTES = 28 << 20
DEFAULT_OVERLAP = 64
# The working size: an image whose shorter side is above WORK_SIDE is restored at that shorter side, and the rain
# removed there (upsampled) is taken off the full-size image, which keeps its own detail. The networks learned rain
# on 481 x 321 photos; a larger photo draws its rain larger, and restored at full size it kept most of it (training
# pairs upscaled 2x: 29.9 dB at full size, 36.8 at the working size; 3x: 24.9, below the input's 26.2, against 36.8;
# docs/experiments.md). DerainOptions.work_side = 0 restores at full size.
WORK_SIDE = TRAINING_SHORT_SIDE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_supports(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` runs ``dtype`` well, as torch alone can tell: bf16 on CUDA GPUs that support it,
    fp16 on any CUDA GPU; nothing below fp32 on other devices."""
    if device.type != "cuda":
        return False
    return torch.cuda.is_bf16_supported() if dtype == torch.bfloat16 else dtype == torch.float16


def resolve_dtype(name: str, device, supports: Callable[[torch.dtype], bool] | None = None) -> torch.dtype:
    """The one dtype policy (CLI, nodes, batch jobs). fp32/fp16/bf16 as named (bf16 is refused on Apple MPS);
    'auto' -> fp32 on the CPU, else bf16 where the device runs it well (never on MPS), else fp16 where it
    does, else fp32. ``supports(dtype)`` says what the device runs well; default :func:`torch_supports`
    (a host such as ComfyUI passes its own answer)."""
    dev = torch.device(device)
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
        if name == "bf16" and dev.type == "mps":
            raise ValueError("bf16 is not supported on Apple MPS; use fp16 or fp32")
        return DTYPES[name]
    if dev.type == "cpu":
        return torch.float32
    if supports is None:
        def supports(dt):
            return torch_supports(dt, dev)
    if dev.type != "mps" and supports(torch.bfloat16):
        return torch.bfloat16
    if supports(torch.float16):
        return torch.float16
    return torch.float32


class DeviceError(ValueError):
    """The device asked for is not a device name, or is not present on this machine."""


def resolve_device(name="auto") -> torch.device:
    """'auto' -> the first CUDA GPU if torch sees one, else the CPU. Other names (cpu, cuda, cuda:N, mps)
    are checked against this machine: DeviceError says what is there instead of failing later."""
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import re
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if not m:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N (N = GPU index) or mps")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceError(f"device {name!r}: torch {torch.__version__} ({build}) sees no CUDA GPU on this machine; "
                              "use cpu (or auto, which picks a GPU when there is one)")
        n = torch.cuda.device_count()
        if index is not None and int(index) >= n:
            raise DeviceError(f"device {name!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"device {name!r}: Apple's MPS backend is not available here; use cpu or auto")
    elif kind == "cpu" and index not in (None, "0"):
        raise DeviceError(f"device {name!r}: there is one CPU device; use cpu")
    return torch.device(name)


@dataclass
class DerainResult:
    images: torch.Tensor  # [B,C,H,W], same channels as the input, 0..1
    masks: torch.Tensor  # [B,1,H,W] rain mask 0..1
    pattern: torch.Tensor  # [B,PATTERN_DIM] per-attribute probabilities
    routing: torch.Tensor  # [B,E] expert weights
    perceived_by: str  # "clip:<model>", "pattern-head" or "given"
    seconds: float
    # per image: the light network's mean rain mask where light routing was verified (kept or handed over), else NaN
    light_mask: torch.Tensor | None = None
    # per image: the heavy network's mean rain mask where a handover was confirmed by it (verify_heavy_mask) or
    # perception's heavy routing was verified by it (verify_heavy_routing), else NaN
    heavy_mask: torch.Tensor | None = None
    # every image restored by the network the light verification hands over to (DerainOptions.expert == HANDOVER)
    handover: bool = False


def check_images(x: torch.Tensor, what: str = "image") -> torch.Tensor:
    """Validate a [B,C,H,W] (or [C,H,W]) 0..1 batch; returns [B,C,H,W] float32."""
    if not torch.is_tensor(x):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"{what} must be [B,C,H,W] or [C,H,W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if b == 0:
        raise ValueError(f"{what} batch is empty")
    if c not in (1, 2, 3, 4):
        raise ValueError(f"{what} has {c} channels; CLIP-RPN takes 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA). "
                         "Convert it to RGB first")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"{what} is {w}x{h} pixels; CLIP-RPN needs at least {MIN_SIDE}x{MIN_SIDE}. "
                         "Upscale it or use a larger crop")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf values; fix the upstream node or file that produced it")
    return x


def split_channels(x):
    """-> (rgb [B,3,H,W], alpha or None, original channel count)."""
    c = x.shape[1]
    if c in (1, 2):
        return x[:, :1].expand(-1, 3, -1, -1), (x[:, 1:2] if c == 2 else None), c
    return x[:, :3], (x[:, 3:4] if c == 4 else None), c


def merge_channels(rgb, alpha, c):
    if c in (1, 2):
        g = rgb.mean(1, keepdim=True)
        return g if c == 1 else torch.cat([g, alpha], 1)
    return rgb if c == 3 else torch.cat([rgb, alpha], 1)


def _pad_to(x, m):
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x


def _starts(n, t, stride):
    if n <= t:
        return [0]
    s = list(range(0, n - t, stride))
    return s + [n - t]


def _ramp(n, ov, lo_edge, hi_edge, device):
    """Blend weights along one tile side: on an interior side, the outer half of the overlap
    (where zero padding at the tile edge corrupts features) gets weight 0, the inner half a
    linear ramp. Image borders keep weight 1."""
    w = torch.ones(n, device=device)
    margin = ov // 2
    ramp_len = ov - margin
    if ov > 0:
        r = torch.cat([torch.zeros(margin, device=device),
                       (torch.arange(ramp_len, device=device, dtype=torch.float32) + 0.5) / ramp_len])
        if not lo_edge:
            w[:ov] = torch.minimum(w[:ov], r)
        if not hi_edge:
            w[-ov:] = torch.minimum(w[-ov:], r.flip(0))
    return w


ENSEMBLE_FLIPS = ((), (-1,), (-2,), (-2, -1))


def tile_grid(h, w, tile, overlap, multiple):
    """Tile origins on the ``multiple`` grid (keeps attention cells aligned with the untiled run)."""
    t = max(multiple, (tile // multiple) * multiple)
    ov = min(max(0, (overlap + multiple - 1) // multiple * multiple), t - multiple)
    stride = t - ov
    return t, ov, [(y, x) for y in _starts(h, t, stride) for x in _starts(w, t, stride)]


def run_tiled(fn: Callable, x: torch.Tensor, tile: int | None, overlap: int, multiple: int,
              out_channels: tuple[int, ...], progress: Callable | None = None, preview: Callable | None = None):
    """Apply ``fn(tile) -> tuple of [B,c,th,tw]`` over feathered overlapping tiles of a padded
    batch. ``tile=None`` or a tile covering the image runs once.

    ``preview``, when given, is called after each tile (before ``progress``) with ``get(stride=1)``, which
    returns the first output blended so far and where it is covered, ``(out [B,c,h',w'], covered [1,1,h',w']
    bool)``, on every ``stride``-th pixel; nothing is computed unless ``get`` is called (a caller showing
    previews calls it at most every so often)."""
    b, _, h, w = x.shape
    if not tile or (tile >= h and tile >= w):
        outs = fn(x)
        if preview:
            o = outs[0]
            preview(lambda stride=1: (o[..., ::stride, ::stride].float(),
                                      torch.ones(1, 1, *o[..., ::stride, ::stride].shape[-2:], dtype=torch.bool)))
        if progress:
            progress(1, 1)
        return outs
    t, ov, grid = tile_grid(h, w, tile, overlap, multiple)
    th, tw = min(t, h), min(t, w)
    acc = [torch.zeros(b, c, h, w, device=x.device, dtype=torch.float32) for c in out_channels]
    wsum = torch.zeros(1, 1, h, w, device=x.device, dtype=torch.float32)
    for i, (y0, x0) in enumerate(grid):
        outs = fn(x[..., y0:y0 + th, x0:x0 + tw])
        wy = _ramp(th, ov, y0 == 0, y0 + th >= h, x.device)
        wx = _ramp(tw, ov, x0 == 0, x0 + tw >= w, x.device)
        wt = (wy[:, None] * wx[None, :])[None, None]
        for a, o in zip(acc, outs):
            a[..., y0:y0 + th, x0:x0 + tw] += o.to(a.device, torch.float32) * wt  # tiles may run on the GPU
        wsum[..., y0:y0 + th, x0:x0 + tw] += wt
        if preview:
            preview(lambda stride=1: (acc[0][..., ::stride, ::stride] / wsum[..., ::stride, ::stride].clamp_min(1e-8),
                                      wsum[..., ::stride, ::stride] > 0))
        if progress:
            progress(i + 1, len(grid))
    return tuple(a / wsum for a in acc)


def _preview_of(preview: Callable | None, h: int, w: int, fill: Callable, dims: tuple = ()) -> Callable | None:
    """Adapts ``preview(image)`` to run_tiled's ``preview(get)``: ``image(max_side=None)`` -> the blend so far,
    completed by ``fill(out, covered, stride)``, cropped to ``h`` x ``w``, flipped back over ``dims``, on the CPU."""
    if preview is None:
        return None

    def on_tile(get):
        def image(max_side=None):
            s = max(1, -(-max(h, w) // int(max_side))) if max_side else 1
            o, covered = get(s)
            return fill(o.float(), covered.to(o.device), s)[..., :-(-h // s), :-(-w // s)].flip(dims).clamp(0, 1).cpu()
        preview(image)
    return on_tile


def count_tiles(h, w, tile, overlap, multiple) -> int:
    if not tile or (tile >= h and tile >= w):
        return 1
    hp, wp = h + (-h) % multiple, w + (-w) % multiple
    return len(tile_grid(hp, wp, tile, overlap, multiple)[2])


# Expert check: the runner-up expert replaces the router's first choice when its output carries less than
# CHECK_RATIO times the rain the mask estimator still finds in the first one's output. Only the streak experts
# are compared: the mask estimator sees streaks, not a veil, and on training data switching away from the veil
# expert cost 1.7 dB on veil images. The ratio is the best on training data only (real training pairs, their rain
# layers over clean photos, synthetic rain): `python -m benchmarks.routing_check` (models/MODEL_CARD.md).
CHECK_RATIO = 0.4
LIGHT, HEAVY = EXPERTS.index("light_streaks"), EXPERTS.index("heavy_streaks")
CHECK_EXPERTS = (LIGHT, HEAVY)


def handover_weight(heavy_mask: float, lo: float, hi: float) -> float:
    """The heavy network's share of a handed-over image (``config.verify_heavy_mask`` = (lo, hi)): 0 where its mean
    rain mask is at most ``lo``, 1 where it is at least ``hi``, linear between (a step at ``hi`` when lo == hi)."""
    if heavy_mask >= hi:
        return 1.0
    if heavy_mask <= lo:
        return 0.0
    return (heavy_mask - lo) / (hi - lo)


def light_handover_share(light_mask: float, threshold: float, ramp: float) -> float:
    """The handover's share by the light network's own mean rain mask (``config.verify_light_mask`` = ``threshold``,
    ``config.verify_light_ramp`` = ``ramp``): 1 below the threshold; with a ramp, falling linearly from 1 at the
    threshold to 0 at the ramp's end; 0 at or above it (at or above the threshold without a ramp)."""
    if light_mask < threshold:
        return 1.0
    if ramp <= threshold or light_mask >= ramp:
        return 0.0
    return (ramp - light_mask) / (ramp - threshold)


def _mix(light, heavy, w: float) -> tuple:
    """(image, mask) of a shared handover: (1 - w) x the light network's + w x the heavy network's."""
    return tuple((1 - w) * a + w * b for a, b in zip(light, heavy))


def check_candidates(routing: torch.Tensor, ranking: torch.Tensor | None = None, k: int = 2,
                     among: tuple[int, ...] | None = CHECK_EXPERTS) -> list[list[int]]:
    """Per image, the experts an expert check compares, best first: the top ``k`` of ``ranking`` [B,E]
    (router logits) when given, else the experts with nonzero ``routing`` weight by weight (a top-1
    routing without a ranking leaves one candidate: nothing to check). When they are not all in ``among``
    (None: any expert) only the first is kept: that image is not checked."""
    if ranking is not None:
        ranking = torch.as_tensor(ranking, dtype=torch.float32)
        if ranking.shape != routing.shape:
            raise ValueError(f"ranking has shape {tuple(ranking.shape)}, expected {tuple(routing.shape)}")
        out = [r.argsort(descending=True, stable=True)[:k].tolist() for r in ranking]
    else:
        out = []
        for r in routing:
            order = r.argsort(descending=True, stable=True)
            out.append([int(e) for e in order[:k] if r[e] > 0])
    if among is not None:
        out = [c if all(e in among for e in c) else c[:1] for c in out]
    return out


def check_choice(residuals: list[float], ratio: float = CHECK_RATIO) -> int:
    """Index of the candidate an expert check keeps: the first (the router's choice) unless a later
    one leaves less than ``ratio`` times the rain of the one kept so far."""
    best = 0
    for j in range(1, len(residuals)):
        if residuals[j] < ratio * residuals[best]:
            best = j
    return best


@dataclass(frozen=True)
class DerainOptions:
    """How :meth:`Derainer.derain` restores: what the CLI's flags, the nodes' inputs and the benchmarks set.

    ``top_k``/``temperature``: the router's mix of experts per image; ``expert``: a manual choice of one
    expert for every image instead (never checked), by index, or ``HANDOVER`` ("handover") for the network the light
    verification hands its images to (the model's handover network, the heavy-streaks network in a model without
    one; the routing row says heavy streaks); ``tile``: tile side in pixels (None: the whole image,
    tiled automatically above AUTO_TILE_PIXELS, and on the CPU by cpu_tile_side once the image is twice its
    area; 0: the whole image, never tiled) with ``overlap`` pixels
    of feathered overlap; ``self_ensemble``: average the restorations of the image and its horizontal,
    vertical and double flips (4 runs; flips keep streaks streak-like, 90° turns would not); ``passes``:
    restoration passes (None: the model's ``config.passes``; each pass restores the previous output with
    the same routing; the mask is the first pass's); ``check``: the expert check (see
    :meth:`Derainer.derain`) with its ``check_ratio``; ``work_side``: the working size (see WORK_SIDE; 0: full
    size), under which every other option applies to the image brought to that shorter side; ``verify``: the
    model's verification of light routing (``config.verify_light_mask``) and of heavy routing
    (``config.verify_heavy_routing``; see :meth:`Derainer.derain`), on by default where the model sets them."""
    top_k: int = 1
    temperature: float = 1.0
    expert: int | str | None = None
    tile: int | None = None
    overlap: int = DEFAULT_OVERLAP
    self_ensemble: bool = False
    passes: int | None = None
    check: bool = False
    check_ratio: float = CHECK_RATIO
    work_side: int = WORK_SIDE
    verify: bool = True

    def checked(self) -> DerainOptions:
        """The options with ``passes`` as an int in range (ValueError otherwise), a valid check ratio and working
        size."""
        opt = self if self.passes is None else replace(self, passes=check_passes(self.passes))
        if isinstance(opt.expert, str) and opt.expert != HANDOVER:
            raise ValueError(f"expert must be an expert's index or {HANDOVER!r}, got {opt.expert!r}")
        if opt.check and not 0 < opt.check_ratio:
            raise ValueError(f"check_ratio must be > 0, got {opt.check_ratio}")
        check_work_side(opt.work_side)
        return opt


def check_work_side(work_side) -> int:
    """A valid working size (0, or at least MIN_WORK_SIDE pixels), else a ValueError that says what to give."""
    if isinstance(work_side, bool) or not isinstance(work_side, int) or not (
            work_side == 0 or work_side >= MIN_WORK_SIDE):
        raise ValueError(f"work_side must be 0 (restore at full size) or a shorter side of at least {MIN_WORK_SIDE} "
                         f"pixels (default {WORK_SIDE}, the training photos'), got {work_side!r}")
    return work_side


def work_size(h: int, w: int, work_side: int) -> tuple[int, int] | None:
    """The size an ``h`` x ``w`` image is restored at: its shorter side brought to ``work_side`` (aspect kept), or
    None (full size) when ``work_side`` is 0 or the shorter side is not above it."""
    if not work_side or min(h, w) <= work_side:
        return None
    s = work_side / min(h, w)
    return max(work_side, round(h * s)), max(work_side, round(w * s))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bicubic resampling of [B,C,H,W] (antialiased when shrinking), clamped to 0..1. Bicubic kept the rain
    sharper than bilinear on the way down: 0.6-0.9 dB more at the working size (docs/experiments.md)."""
    y = F.interpolate(x.float(), size=tuple(size), mode="bicubic", align_corners=False,
                      antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])
    return y.clamp_(0, 1)


@dataclass
class _Batch:
    """One derain call's input, normalised: padded RGB, what was split off, and the routing decided."""
    rgb: torch.Tensor  # [B,3,H',W'] padded to the model's multiple
    alpha: torch.Tensor | None
    channels: int
    h: int
    w: int
    routing: torch.Tensor  # [B,E] float32 on the CPU
    ranking: torch.Tensor | None  # [B,E] what the expert check ranks by
    pattern: torch.Tensor  # [B,PATTERN_DIM] (NaN: not perceived)
    source: str
    mask: torch.Tensor | None  # [B,1,H',W'] padded, 0..1
    check: bool  # the expert check runs (never under a manual expert)
    verify: float = 0.0  # > 0: light routing verified at this light-network mask mean (automatic routing only)
    verify_heavy: bool = False  # heavy routing verified by the heavy network's mask (config.verify_heavy_routing)
    light_mask: torch.Tensor | None = None  # [B] the light network's mean mask where verified, else NaN
    # [B] the heavy network's mean mask where a handover was confirmed or heavy routing verified, else NaN
    heavy_mask: torch.Tensor | None = None


class _Steps:
    """Progress across every tile run of one derain call: ``step(i, n)`` inside a run, ``advance(n)`` after it."""

    def __init__(self, total: int, progress: Callable | None):
        self.total, self.progress, self.done = total, progress, 0

    def step(self, i, n):
        if self.progress:
            self.progress(self.done + i, self.total)

    def advance(self, n):
        self.done += n


def _freed_memory_reused() -> bool:
    """Whether large freed blocks are reused here (cpu_memory: a process of our own, its main thread, whose heap
    glibc grows for them); then a whole image runs faster than tiles (1.1 against 1.5 s/MP on 1 MP)."""
    return cpu_memory.applied() and threading.current_thread() is threading.main_thread()


def cpu_tile_side(config, itemsize: int = 4) -> int:
    """The side of the automatic CPU tile (see CPU_TILE_BYTES): the largest multiple of the model's padding multiple
    whose widest full-resolution activation (``widths[0] * ffn_expand`` channels) fits in CPU_TILE_BYTES."""
    m = config.pad_multiple
    per_pixel = config.widths[0] * max(2, config.ffn_expand) * itemsize
    return max(m, int((CPU_TILE_BYTES / per_pixel) ** 0.5) // m * m)


class Derainer:
    """Model + optional CLIP perceiver on a device/dtype. Thread-compatible, stateless per call."""

    def __init__(self, model: CLIPRPN, perceiver=None, device="cpu", dtype: str | torch.dtype = "fp32"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_dtype(dtype, self.device) if isinstance(dtype, str) else dtype
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype).to(memory_format=torch.channels_last)
        self.perceiver = perceiver
        self.multiple = model.config.pad_multiple
        self.cpu_tile = cpu_tile_side(model.config, self.dtype.itemsize)

    # -- perception and routing -----------------------------------------------------------
    @torch.inference_mode()
    def perceive(self, images: torch.Tensor, work_side: int = WORK_SIDE):
        """-> (probs [B,PATTERN_DIM] on CPU, source). CLIP drives perception when loaded. An image above the working
        size is perceived at it, as :meth:`derain` perceives it (so a Perceiver node routes as the Derain node)."""
        return self._perceive(split_channels(check_images(images))[0], check_work_side(work_side))

    def _perceive(self, rgb, work_side):
        """:meth:`perceive` on an RGB batch already checked (``check_images``) and a checked ``work_side``."""
        size = work_size(*rgb.shape[-2:], work_side)
        if size is not None:
            rgb = resize(rgb, size)
        if self.perceiver is not None:
            return self.perceiver.probs(rgb).float().cpu(), f"clip:{self.perceiver.name}"
        logits = self.model.perceive(rgb.to(self.device, self.dtype))
        return pattern_probs(logits).cpu(), "pattern-head"

    @torch.inference_mode()
    def route_and_rank(self, probs, top_k=1, temperature=1.0, override=None):
        """The routing step (:func:`arch.route_pattern`) on the model's device -> (expert weights [B,E],
        router logits [B,E]: the ranking the expert check compares by), both on the CPU."""
        weights, logits = route_pattern(self.model.router, probs.to(self.device), top_k, temperature, override)
        return weights.cpu(), logits.cpu()

    def route(self, probs, top_k=1, temperature=1.0, override=None):
        """Expert weights [B,E] on the CPU (see :meth:`route_and_rank`)."""
        return self.route_and_rank(probs, top_k, temperature, override)[0]

    # -- masks and restoration --------------------------------------------------------------
    def _prep(self, x):
        """A batch already checked (``check_images``) -> (RGB padded to the model's multiple, alpha, channels, h, w)."""
        rgb, alpha, c = split_channels(x)
        h, w = rgb.shape[-2:]
        return _pad_to(rgb, self.multiple), alpha, c, h, w

    def auto_tile(self, tile, h, w):
        """The tile an ``h`` x ``w`` image runs with: a given one (0 or None after it: whole), else on the CPU the CPU
        tile (see CPU_TILE_BYTES), else DEFAULT_TILE above AUTO_TILE_PIXELS, else whole (None)."""
        if tile is None:
            if self.device.type == "cpu" and h * w >= 2 * self.cpu_tile ** 2 and not _freed_memory_reused():
                return self.cpu_tile
            if h * w > AUTO_TILE_PIXELS:
                return DEFAULT_TILE
        return tile or None

    @torch.inference_mode()
    def estimate_mask(self, images, tile=None, overlap=DEFAULT_OVERLAP, progress=None, preview=None,
                      work_side=WORK_SIDE):
        """Rain masks [B,1,H,W] (0..1). ``preview``: called after each tile with ``image(max_side=None)``,
        which returns the image's mask so far [1,1,h',w'] on the CPU (0 where not yet estimated), its
        longer side at most ``max_side``; nothing is computed unless it is called. ``work_side``: as
        :class:`DerainOptions`: a larger image's mask is estimated at the working size (what the restoration sees)
        and upsampled; ``tile`` and the preview then apply to the working size."""
        x = check_images(images)
        size = work_size(*x.shape[-2:], check_work_side(work_side))
        if size is not None:
            m = self.estimate_mask(resize(x, size), tile, overlap, progress, preview, work_side=0)
            return F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False).clamp_(0, 1)
        rgb, _, _, h, w = self._prep(x)
        tile = self.auto_tile(tile, h, w)
        out = []
        for i in range(rgb.shape[0]):  # one image at a time bounds memory on large batches
            fn = lambda t: (torch.sigmoid(self.model.estimate_mask(  # noqa: E731
                t.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)).float()),)
            (m,) = run_tiled(fn, rgb[i:i + 1], tile, overlap, self.multiple, (1,), progress,
                             _preview_of(preview, h, w, lambda o, covered, s: o * covered))
            out.append(m[..., :h, :w].cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def derain(self, images, options: DerainOptions | None = None, *, routing=None, pattern=None, mask=None,
               ranking=None, progress=None, preview=None) -> DerainResult:
        """Restore a batch as ``options`` (:class:`DerainOptions`, default: the defaults) say.

        ``routing`` [B,E] or ``pattern`` [B,PATTERN_DIM] may come from outside (nodes); otherwise each
        image is perceived and routed on its own. ``mask`` [B,1,H,W] or [B,H,W] (0..1) replaces the
        estimated mask in the cross-attention. ``progress(done, total)`` is called after each tile run.

        The expert check (``options.check``): each image is restored by its two best-ranked experts and keeps
        the runner-up only when the model's own mask estimator finds less than ``check_ratio`` times the rain
        in its output that it finds in the first one's (see :func:`check_choice`); the image goes through
        one expert (top-1), about three times the work of a plain run. Only the streak experts are compared
        (CHECK_EXPERTS: an image whose two best are not both streak experts is not checked). The ranking is
        ``ranking`` [B,E] (router logits, e.g. from an Expert Router node), else the nonzero weights of a
        given ``routing``, else the router's logits on the perceived pattern. A manual expert is never
        checked.

        ``preview``: called after each restored tile with ``image(max_side=None)``, which returns the image
        being restored as it stands [1,3,h',w'] on the CPU (restored tiles blended in, the input elsewhere),
        its longer side at most ``max_side``; nothing is computed unless it is called. The expert check's
        residual-rain runs are not previewed.

        Light routing verified (``options.verify`` and a model whose ``config.verify_light_mask`` is above 0, whole-
        network experts): an image routed to the light-streaks network alone keeps it only if the mean of that
        network's own rain mask, from its restoration pass, reaches ``verify_light_mask``; otherwise it is restored
        by the heavy-streaks network instead (and the result's routing says so). The light network's mask estimator
        recognises the rain it learned; photographed downpours and rain haze, which perception takes for light rain,
        score far below. With ``config.verify_heavy_mask`` = (lo, hi) set, the handover is confirmed by the heavy
        network's own mean mask from its restoration pass: the image is restored as (1 - w) x the light network's
        restoration + w x the heavy network's, w = 0 at or below lo, 1 at or above hi, linear between (the routing
        row carries w; ``heavy_mask`` in the result): a rain-free photo, in which neither network finds its rain,
        keeps the light network's light touch. With ``config.verify_light_ramp`` above the threshold, an image whose
        light mask lies between the two is shared as well: the handover's share falls linearly from 1 at the threshold
        to 0 at the ramp's end (times the heavy network's confirmation), so a light mask near the threshold moves the
        restoration a little instead of switching networks. A model with a handover network (``config.handover_network``) has
        its handovers restored by that network in place of the heavy-streaks network (the routing row still says
        heavy streaks; ``heavy_mask`` is the handover network's). An image kept costs nothing more, one handed over is restored twice
        (under the self-ensemble, an image shared between the two by 0 < w < 1 has every flip restored by both).
        Heavy routing verified (``options.verify`` and a model with ``config.verify_heavy_routing``, whole-network
        experts): an image routed to the heavy-streaks network alone is restored by it, and where the mean of that
        network's own rain mask is below ``verify_heavy_mask``'s hi, the light network restores it too and the two are
        mixed with the heavy network's share w as for a confirmed handover (the routing row carries w; ``heavy_mask``
        in the result): light rain that perception takes for heavy rain gets the light network's restoration. An image
        at or above hi costs nothing more; one below it is restored twice (every flip by both when 0 < w < 1).
        Only routing decided automatically is verified: perceived here, or given with a router's ranking (an Expert
        Router node without an override); never a manual expert, a routing given without a ranking, or under the
        expert check.

        The working size (``options.work_side``): an image whose shorter side is above it is perceived, routed and
        restored as described above at that shorter side (tiles, preview and a given mask included); the rain
        removed there, upsampled, is taken off the full-size image, and the mask is upsampled."""
        opt = (options or DerainOptions()).checked()  # before any work is done
        return self._derain(check_images(images), opt, routing, pattern, mask, ranking, progress, preview)

    def _derain(self, x, opt: DerainOptions, routing, pattern, mask, ranking, progress, preview) -> DerainResult:
        """:meth:`derain` on a checked batch ``x`` with checked options (the working-size copy is not checked again)."""
        t0 = time.perf_counter()
        size = work_size(*x.shape[-2:], opt.work_side)
        if size is not None:
            small = resize(x, size)
            r = self._derain(small, replace(opt, work_side=0), routing, pattern, mask, ranking, progress, preview)
            rain = F.interpolate(small - r.images, size=x.shape[-2:], mode="bicubic", align_corners=False)
            masks = F.interpolate(r.masks, size=x.shape[-2:], mode="bilinear", align_corners=False)
            return DerainResult((x - rain).clamp_(0, 1), masks.clamp_(0, 1), r.pattern, r.routing, r.perceived_by,
                                time.perf_counter() - t0, r.light_mask, r.heavy_mask, r.handover)
        batch = self._normalise(x, opt, routing, pattern, mask, ranking)
        outs, masks = self._restore_batch(batch, opt, progress, preview)
        out = merge_channels(torch.cat(outs), batch.alpha, batch.channels)
        return DerainResult(out, torch.cat(masks), batch.pattern, batch.routing, batch.source,
                            time.perf_counter() - t0, batch.light_mask, batch.heavy_mask, opt.expert == HANDOVER)

    # -- derain, step by step -------------------------------------------------------------------
    def _normalise(self, images, opt: DerainOptions, routing, pattern, mask, ranking) -> _Batch:
        """Input normalisation: the images (checked by :meth:`derain`) split and padded; the routing decided (a manual expert,
        else the given routing, else perceived and routed here) and brought to one row per image; the
        ranking, the pattern and the mask likewise."""
        rgb, alpha, c, h, w = self._prep(images)
        b, e = rgb.shape[0], self.model.config.num_experts
        source, check = "given", opt.check
        automatic = opt.expert is None and (routing is None or ranking is not None)  # what verification may change
        if opt.expert is not None:  # a manual expert choice wins over any routing (and is not checked)
            if opt.expert == HANDOVER and e <= HEAVY:
                raise ValueError(f"expert {HANDOVER!r} needs a model with a heavy-streaks expert; this one has {e} experts")
            routing = route(torch.zeros(b, e), override=HEAVY if opt.expert == HANDOVER else opt.expert)
            check = False
        elif routing is None:
            if pattern is None:
                pattern, source = self._perceive(rgb[..., :h, :w], WORK_SIDE)
            routing, logits = self.route_and_rank(pattern, opt.top_k, opt.temperature)
            if check and ranking is None:  # the check ranks by the router's logits
                ranking = logits
        routing = torch.as_tensor(routing, dtype=torch.float32)
        if routing.shape != (b, e):
            if routing.shape[0] == 1 and routing.shape[1] == e:
                routing = routing.expand(b, -1)
            else:
                raise ValueError(f"routing has shape {tuple(routing.shape)}, expected ({b}, {e}) (one row per image)")
        if ranking is not None:
            ranking = torch.as_tensor(ranking, dtype=torch.float32)
            if ranking.dim() == 2 and ranking.shape[0] == 1 and b > 1:
                ranking = ranking.expand(b, -1)  # one row for the whole batch, as routing
        if pattern is None:
            pattern = torch.full((b, PATTERN_DIM), float("nan"))  # not perceived
        if mask is not None:
            mask = self._guide_mask(mask, b, h, w)
        cfg = self.model.config
        verifiable = opt.verify and automatic and not check and cfg.expert_scope == "network" and e > HEAVY
        verify = cfg.verify_light_mask if verifiable and cfg.verify_light_mask > 0 else 0.0
        verify_heavy = bool(verifiable and cfg.verify_heavy_routing)
        return _Batch(rgb, alpha, c, h, w, routing, ranking, pattern, source, mask, check, verify, verify_heavy)

    def _guide_mask(self, mask, b, h, w) -> torch.Tensor:
        """A given rain mask [B,1,H,W] or [B,H,W] -> [B,1,H',W'] 0..1 at the padded image size."""
        mask = torch.as_tensor(mask).float()
        mask = mask[:, None] if mask.dim() == 3 else mask
        if mask.shape[0] == 1 and b > 1:
            mask = mask.expand(b, -1, -1, -1)
        if mask.shape[0] != b:
            raise ValueError(f"mask batch {mask.shape[0]} does not match image batch {b}")
        if mask.shape[-2:] != (h, w):
            mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
        return _pad_to(mask.clamp(0, 1), self.multiple)

    def _restore_batch(self, batch: _Batch, opt: DerainOptions, progress, preview):
        """Each image: the expert check (when on) picks its expert, then every flip of it is restored tile by
        tile and the flips are averaged. -> (images, masks), one [1,C,H,W] each per image."""
        h, w, b = batch.h, batch.w, batch.rgb.shape[0]
        tile = self.auto_tile(opt.tile, h, w)
        flips = ENSEMBLE_FLIPS if opt.self_ensemble else ((),)
        n_tiles = count_tiles(h, w, tile, opt.overlap, self.multiple)
        cands = check_candidates(batch.routing, batch.ranking) if batch.check else None
        if cands is not None:
            # a checked image: two restorations and two residual-mask runs, then the other flips
            total = n_tiles * sum(len(flips) + 3 * (len(cs) - 1) for cs in cands)
        else:
            total = n_tiles * b * len(flips)
        steps = _Steps(total, progress)

        def restore_flip(inp, r, dims):
            """One restoration of ``inp`` flipped over ``dims``, tile by tile -> (image, mask) unflipped."""
            fn = lambda t: self._restore(t[:, :3], r, t[:, 3:] if t.shape[1] > 3 else None, opt.passes)  # noqa: E731
            # flip the unpadded image so that padding stays at the bottom/right
            src = inp if not dims else _pad_to(inp[..., :h, :w].flip(dims), self.multiple)
            look = _preview_of(preview, h, w, lambda o, covered, s: torch.where(
                covered, o, src[:, :3, ::s, ::s].to(o)), dims)
            oi, mi_ = run_tiled(fn, src, tile, opt.overlap, self.multiple, (3, 1), steps.step, look)
            steps.advance(n_tiles)
            return oi[..., :h, :w].clamp(0, 1).cpu().flip(dims), mi_[..., :h, :w].cpu().flip(dims)

        def residual_rain(img):
            v = float(self.residual_rain(img, tile, opt.overlap, steps.step))
            steps.advance(n_tiles)
            return v

        def mixed(i, light, heavy, wh):
            """Image i restored as (1 - wh) x ``light`` + wh x ``heavy`` (each its unflipped (image, mask)): its
            routing row says so, and where the two networks share it (0 < wh < 1) both restore its other flips too
            (counted here). -> (wh where shared, else None; {(): its unflipped result})"""
            routing[i] = (1 - wh) * self._one_expert(LIGHT)[0] + wh * self._one_expert(HEAVY)[0]
            both = 0 < wh < 1
            if both:  # count the runs of the network that would not otherwise restore the other flips
                steps.total += n_tiles * (len(flips) - 1)
            return (wh if both else None), {(): light if wh == 0 else heavy if wh == 1 else _mix(light, heavy, wh)}

        outs, masks = [], []
        routing = batch.routing = batch.routing.clone()
        batch.light_mask = torch.full((b,), float("nan"))
        batch.heavy_mask = torch.full((b,), float("nan"))
        for i in range(b):
            xi = batch.rgb[i:i + 1]
            mi = batch.mask[i:i + 1] if batch.mask is not None else None
            inp = xi if mi is None else torch.cat([xi, mi.to(xi)], 1)
            done = {}  # flips already restored (by the check), reused below
            shared = None  # the heavy network's share of a handover both networks restore, when 0 < share < 1
            partner = None  # ... and the network that shares it with the light network
            net = self._handover_route() if opt.expert == HANDOVER else None  # what takes the whole image, when not routing
            if cands is not None:  # one expert per image: the first candidate, or the runner-up the check keeps
                chosen, done = self._check_expert(inp, cands[i], opt.check_ratio, restore_flip, residual_rain)
                routing[i] = self._one_expert(chosen)[0]
            elif batch.verify and bool((routing[i] == self._one_expert(LIGHT)[0]).all()):
                first = restore_flip(inp, self._one_expert(LIGHT).to(self.device), ())
                lm, ramp = float(first[1].mean()), self.model.config.verify_light_ramp
                batch.light_mask[i] = lm
                if lm < max(batch.verify, ramp):  # too little of the rain the light network knows
                    steps.total += n_tiles  # the light network's restoration was one run more
                    lo, hi = self.model.config.verify_heavy_mask
                    share = light_handover_share(lm, batch.verify, ramp)
                    if hi > 0 or share < 1:  # the handover confirmed by the heavy network's own mask, or ramped
                        heavy = restore_flip(inp, self._handover_route(), ())
                        hm = float(heavy[1].mean())
                        if hi > 0:
                            batch.heavy_mask[i] = hm
                        wh = (handover_weight(hm, lo, hi) if hi > 0 else 1.0) * share
                        shared, done = mixed(i, first, heavy, wh)
                        partner = self._handover_route()
                        net = self._handover_route() if wh == 1 else None
                    else:
                        routing[i] = self._one_expert(HEAVY)[0]
                        net = self._handover_route()
                else:
                    done = {(): first}
            elif batch.verify_heavy and bool((routing[i] == self._one_expert(HEAVY)[0]).all()):
                heavy_net = self._one_expert(HEAVY).to(self.device)
                heavy = restore_flip(inp, heavy_net, ())
                hm = float(heavy[1].mean())
                batch.heavy_mask[i] = hm
                wh = handover_weight(hm, *self.model.config.verify_heavy_mask)
                if wh < 1:  # too little of the rain the heavy network knows: the light network restores it too
                    steps.total += n_tiles  # the light network's restoration is one run more
                    light = restore_flip(inp, self._one_expert(LIGHT).to(self.device), ())
                    shared, done = mixed(i, light, heavy, wh)
                    partner = heavy_net
                else:
                    done = {(): heavy}
            # the routing row of a handover says "heavy streaks"; the network that restores it may be the handover one
            r = routing[i:i + 1].to(self.device) if net is None else net
            o = m = 0
            for dims in flips:  # flip(()) is the identity
                if shared is not None and dims not in done:
                    # a shared handover: each network restores the flip, their outputs weighted as for the
                    # unflipped image (a mixed routing would mix inside each pass)
                    done[dims] = _mix(restore_flip(inp, self._one_expert(LIGHT).to(self.device), dims),
                                      restore_flip(inp, partner, dims), shared)
                oi, mi_ = done.get(dims) or restore_flip(inp, r, dims)
                o = o + oi / len(flips)
                m = m + mi_ / len(flips)
            outs.append(o)
            masks.append(m)
        return outs, masks

    def _one_expert(self, e: int) -> torch.Tensor:
        return route(torch.zeros(1, self.model.config.num_experts), override=e)

    def _handover_route(self):
        """What restores the light verification's handovers: the handover network (``HANDOVER``) where the model has
        one, else the heavy-streaks network (its one-hot routing on the device)."""
        if self.model.config.handover_network:
            return HANDOVER
        return self._one_expert(HEAVY).to(self.device)

    def _check_expert(self, inp, cands: list[int], ratio: float, restore_flip, residual_rain):
        """The expert check of one image: restore it with each candidate and keep the one
        :func:`check_choice` picks by the rain left. -> (expert, {(): its unflipped restoration} or {})."""
        if len(cands) == 1:
            return cands[0], {}
        restored, residual = {}, []
        for e in cands:
            restored[e] = restore_flip(inp, self._one_expert(e).to(self.device), ())
            residual.append(residual_rain(restored[e][0]))
        chosen = cands[check_choice(residual, ratio)]
        return chosen, {(): restored[chosen]}

    def residual_rain(self, img, tile=None, overlap=DEFAULT_OVERLAP, progress=None) -> torch.Tensor:
        """Mean of the model's own rain mask over a restored image [1,3,h,w] (0..1): the rain it still sees
        (what the expert check compares)."""
        return self.estimate_mask(img, tile, overlap, progress).mean()

    def _restore(self, t, r, m, passes=None):
        t = t.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        img, mlog, _ = self.model.restore(t, r, None if m is None else m.to(self.device), passes)  # r: or HANDOVER
        return img.float(), torch.sigmoid(mlog.float())


def load_derainer(checkpoint=None, clip=None, clip_arch=None, device="auto", dtype="auto"):
    """Checkpoint (default: the shipped model) + optional CLIP perceiver -> (Derainer, checkpoint path)."""
    from pathlib import Path

    from . import default_model_path
    from .checkpoint import load_model
    ck = Path(checkpoint) if checkpoint else default_model_path()
    perceiver = None
    if clip:
        from .perceiver import load_clip
        perceiver = load_clip(clip, arch=clip_arch)
    d = Derainer(load_model(ck), perceiver, device=device, dtype=dtype)
    if perceiver is not None:
        perceiver.to(d.device)
    return d, ck
