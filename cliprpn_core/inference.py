"""Inference for any size and batch: channel handling, validation, padding, feathered tiling,
per-image perception and routing, fp32/fp16/bf16. Used by the CLI, the nodes and batch jobs."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .arch import CLIPRPN, pattern_probs, route
from .config import check_passes
from .patterns import EXPERTS, PATTERN_DIM

MIN_SIDE = 8
AUTO_TILE_PIXELS = 2_000_000  # larger images are tiled automatically
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64

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
# layers over clean photos, synthetic rain): `python benchmarks/routing_check.py` (models/MODEL_CARD.md).
CHECK_RATIO = 0.4
CHECK_EXPERTS = (EXPERTS.index("light_streaks"), EXPERTS.index("heavy_streaks"))


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


class Derainer:
    """Model + optional CLIP perceiver on a device/dtype. Thread-compatible, stateless per call."""

    def __init__(self, model: CLIPRPN, perceiver=None, device="cpu", dtype: str | torch.dtype = "fp32"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_dtype(dtype, self.device) if isinstance(dtype, str) else dtype
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype).to(memory_format=torch.channels_last)
        self.perceiver = perceiver
        self.multiple = model.config.pad_multiple

    # -- perception and routing -----------------------------------------------------------
    @torch.inference_mode()
    def perceive(self, images: torch.Tensor):
        """-> (probs [B,PATTERN_DIM] on CPU, source). CLIP drives perception when loaded."""
        rgb = split_channels(check_images(images))[0]
        if self.perceiver is not None:
            return self.perceiver.probs(rgb).float().cpu(), f"clip:{self.perceiver.name}"
        logits = self.model.perceive(rgb.to(self.device, self.dtype))
        return pattern_probs(logits).cpu(), "pattern-head"

    @torch.inference_mode()
    def route(self, probs, top_k=1, temperature=1.0, override=None):
        return self.model.router(probs.to(self.device), top_k, temperature, override).cpu()

    # -- masks and restoration --------------------------------------------------------------
    def _prep(self, images):
        x = check_images(images)
        rgb, alpha, c = split_channels(x)
        h, w = rgb.shape[-2:]
        return _pad_to(rgb, self.multiple), alpha, c, h, w

    def _auto_tile(self, tile, h, w):
        if tile is None and h * w > AUTO_TILE_PIXELS:
            return DEFAULT_TILE
        return tile or None

    @torch.inference_mode()
    def estimate_mask(self, images, tile=None, overlap=DEFAULT_OVERLAP, progress=None, preview=None):
        """Rain masks [B,1,H,W] (0..1). ``preview``: called after each tile with ``image(max_side=None)``,
        which returns the image's mask so far [1,1,h',w'] on the CPU (0 where not yet estimated), its
        longer side at most ``max_side``; nothing is computed unless it is called."""
        rgb, _, _, h, w = self._prep(images)
        tile = self._auto_tile(tile, h, w)
        out = []
        for i in range(rgb.shape[0]):  # one image at a time bounds memory on large batches
            fn = lambda t: (torch.sigmoid(self.model.estimate_mask(  # noqa: E731
                t.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)).float()),)
            (m,) = run_tiled(fn, rgb[i:i + 1], tile, overlap, self.multiple, (1,), progress,
                             _preview_of(preview, h, w, lambda o, covered, s: o * covered))
            out.append(m[..., :h, :w].cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def derain(self, images, routing=None, pattern=None, mask=None, top_k=1, temperature=1.0,
               override=None, tile=None, overlap=DEFAULT_OVERLAP, progress=None, self_ensemble=False,
               passes=None, check=False, check_ratio=CHECK_RATIO, ranking=None, preview=None) -> DerainResult:
        """Restore a batch. ``routing`` [B,E] or ``pattern`` [B,PATTERN_DIM] may come from
        outside (nodes); otherwise each image is perceived and routed on its own. ``mask``
        [B,1,H,W] or [B,H,W] (0..1) replaces the estimated mask in the cross-attention.
        ``self_ensemble``: average the restorations of the image and its horizontal, vertical and
        double flips (4 runs; flips keep streaks streak-like, 90° turns would not). ``passes``:
        restoration passes (default: the model's ``config.passes``; each pass restores the previous
        output with the same routing; the mask is the first pass's).

        ``check`` (expert check): each image is restored by its two best-ranked experts and keeps the
        runner-up only when the model's own mask estimator finds less than ``check_ratio`` times the rain
        in its output that it finds in the first one's (see :func:`check_choice`); the image goes through
        one expert (top-1), about three times the work of a plain run. Only the streak experts are compared
        (CHECK_EXPERTS: an image whose two best are not both streak experts is not checked). The ranking is
        ``ranking`` [B,E] (router logits, e.g. from an Expert Router node), else the nonzero weights of a
        given ``routing``, else the router's logits on the perceived pattern. A manual ``override`` is never
        checked.

        ``preview``: called after each restored tile with ``image(max_side=None)``, which returns the image
        being restored as it stands [1,3,h',w'] on the CPU (restored tiles blended in, the input elsewhere),
        its longer side at most ``max_side``; nothing is computed unless it is called. The expert check's
        residual-rain runs are not previewed."""
        t0 = time.perf_counter()
        if passes is not None:
            passes = check_passes(passes)  # before any work is done
        rgb, alpha, c, h, w = self._prep(images)
        b = rgb.shape[0]
        source = "given"
        if check and not 0 < check_ratio:
            raise ValueError(f"check_ratio must be > 0, got {check_ratio}")
        if override is not None:  # a manual expert choice wins over any routing (and is not checked)
            routing = route(torch.zeros(b, self.model.config.num_experts), override=override)
            check = False
        elif routing is None:
            if pattern is None:
                pattern, source = self.perceive(rgb[..., :h, :w])
            if check and ranking is None:  # the check needs the router's logits: route from them
                ranking = self.model.router.logits(pattern.to(self.device)).float().cpu()
                routing = route(ranking, top_k, temperature)
            else:
                routing = self.route(pattern, top_k, temperature)
        routing = torch.as_tensor(routing, dtype=torch.float32)
        if routing.shape != (b, self.model.config.num_experts):
            if routing.shape[0] == 1 and routing.shape[1] == self.model.config.num_experts:
                routing = routing.expand(b, -1)
            else:
                raise ValueError(f"routing has shape {tuple(routing.shape)}, expected ({b}, {self.model.config.num_experts})"
                                 " (one row per image)")
        if ranking is not None:
            ranking = torch.as_tensor(ranking, dtype=torch.float32)
            if ranking.dim() == 2 and ranking.shape[0] == 1 and b > 1:
                ranking = ranking.expand(b, -1)  # one row for the whole batch, as routing
        if pattern is None:
            pattern = torch.full((b, PATTERN_DIM), float("nan"))  # not perceived
        if mask is not None:
            mask = torch.as_tensor(mask).float()
            mask = mask[:, None] if mask.dim() == 3 else mask
            if mask.shape[0] == 1 and b > 1:
                mask = mask.expand(b, -1, -1, -1)
            if mask.shape[0] != b:
                raise ValueError(f"mask batch {mask.shape[0]} does not match image batch {b}")
            if mask.shape[-2:] != (h, w):
                mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
            mask = _pad_to(mask.clamp(0, 1), self.multiple)
        tile = self._auto_tile(tile, h, w)
        flips = ENSEMBLE_FLIPS if self_ensemble else ((),)
        n_tiles = count_tiles(h, w, tile, overlap, self.multiple)
        if check:
            cands = check_candidates(routing, ranking)
            # a checked image: two restorations and two residual-mask runs, then the other flips
            total = n_tiles * sum(len(flips) + 3 * (len(cs) - 1) for cs in cands)
        else:
            total = n_tiles * b * len(flips)
        done = [0]

        def step(i, n):
            if progress:
                progress(done[0] + i, total)

        def restore_flip(inp, r, dims):
            fn = lambda t: self._restore(t[:, :3], r, t[:, 3:] if t.shape[1] > 3 else None, passes)  # noqa: E731
            # flip the unpadded image so that padding stays at the bottom/right
            src = inp if not dims else _pad_to(inp[..., :h, :w].flip(dims), self.multiple)
            look = _preview_of(preview, h, w, lambda o, covered, s: torch.where(
                covered, o, src[:, :3, ::s, ::s].to(o)), dims)
            oi, mi_ = run_tiled(fn, src, tile, overlap, self.multiple, (3, 1), step, look)
            done[0] += n_tiles
            return oi[..., :h, :w].clamp(0, 1).cpu().flip(dims), mi_[..., :h, :w].cpu().flip(dims)

        def residual_rain(img):
            v = float(self._residual_rain(img, tile, overlap, step))
            done[0] += n_tiles
            return v

        outs, masks = [], []
        routing = routing.clone()
        for i in range(b):
            xi = rgb[i:i + 1]
            mi = mask[i:i + 1] if mask is not None else None
            inp = xi if mi is None else torch.cat([xi, mi.to(xi)], 1)
            first = {}  # identity-flip restoration of a checked candidate, reused below
            if check:  # one expert per image: the first candidate, or the runner-up the check keeps
                chosen = cands[i][0]
                if len(cands[i]) > 1:
                    residual = []
                    for e in cands[i]:
                        one = route(torch.zeros(1, routing.shape[1]), override=e).to(self.device)
                        first[e] = restore_flip(inp, one, ())
                        residual.append(residual_rain(first[e][0]))
                    chosen = cands[i][check_choice(residual, check_ratio)]
                    first = {(): first[chosen]}
                routing[i] = route(torch.zeros(1, routing.shape[1]), override=chosen)[0]
            r = routing[i:i + 1].to(self.device)
            o = m = 0
            for dims in flips:  # flip(()) is the identity
                oi, mi_ = first.get(dims) or restore_flip(inp, r, dims)
                o = o + oi / len(flips)
                m = m + mi_ / len(flips)
            outs.append(o)
            masks.append(m)
        out = merge_channels(torch.cat(outs), alpha, c)
        return DerainResult(out, torch.cat(masks), pattern, routing, source, time.perf_counter() - t0)

    def _residual_rain(self, img, tile, overlap, progress=None) -> torch.Tensor:
        """Mean of the model's own rain mask over a restored image [1,3,h,w] (0..1): the rain it still sees."""
        return self.estimate_mask(img, tile, overlap, progress).mean()

    def _restore(self, t, r, m, passes=None):
        t = t.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        img, mlog, _ = self.model.restore(t, r, None if m is None else m.to(self.device), passes)
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
