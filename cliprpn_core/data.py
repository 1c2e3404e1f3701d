"""Training data: paired folders (rain/ + gt/ with name mapping), synthetic rain over folders
of clean photos, and mixtures. Images are decoded once and kept in memory as uint8; batches of
random crops and flips are cut on the training device, so the GPU never waits on a loader.
Nothing is read from the internet."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .imageio import IMAGE_EXTS, images_under, list_images, load_rgb_uint8
from .patterns import ATTRIBUTE_NAMES
from .synthesis import STYLES, RainSample, synthesize

HEAVY_HINTS = ("heavy", "rain200h", "raintrainh", "h_", "rain1400", "rain13k")


def pair_files(root, rain_dir="rain", gt_dir="gt") -> list[tuple[Path, Path]]:
    """(rainy, clean) pairs under root/rain and root/gt. Names map exactly, or by stem, or by
    the common 'rain-123.png' / 'norain-123.png' and 'x_rain.png' / 'x.png' conventions."""
    root = Path(root)
    rd, gd = root / rain_dir, root / gt_dir
    if not rd.is_dir() or not gd.is_dir():
        raise FileNotFoundError(f"paired folder {root} needs '{rain_dir}/' and '{gt_dir}/' sub-folders")
    gts = {p.name: p for p in gd.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    by_stem = {p.stem: p for p in gts.values()}
    pairs = []
    for r in sorted(p for p in rd.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        cands = [r.name, r.stem, r.stem.replace("rain-", "norain-"), r.stem.replace("_rain", ""),
                 r.stem.replace("rain", "norain", 1)]
        g = next((gts.get(c) or by_stem.get(c) for c in cands if (gts.get(c) or by_stem.get(c))), None)
        if g is not None:
            pairs.append((r, g))
    if not pairs:
        raise FileNotFoundError(f"no rain/gt pairs with matching names under {root}")
    return pairs


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)  # uint8 [3,H,W]


def random_crops(images, n, size, gen, device, scale_range=(1.0, 1.0), partners=None, indices=None):
    """n crops of size x size (random rescale, flips) from a list of uint8 [3,H,W] tensors."""
    out, out_p = [], []
    for j in range(n):
        i = indices[j] if indices is not None else int(torch.randint(len(images), (1,), generator=gen))
        img = images[i]
        s = scale_range[0] + (scale_range[1] - scale_range[0]) * float(torch.rand((), generator=gen))
        h, w = img.shape[-2:]
        cs = min(int(round(size / s)), h, w)
        y = int(torch.randint(h - cs + 1, (1,), generator=gen))
        x = int(torch.randint(w - cs + 1, (1,), generator=gen))
        flip = bool(torch.rand((), generator=gen) < 0.5)
        pieces = [img] + ([partners[i]] if partners is not None else [])
        crops = []
        for p in pieces:
            c = p[:, y:y + cs, x:x + cs].to(device, non_blocking=True).float().div_(255)[None]
            if cs != size:
                c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            if flip:
                c = c.flip(-1)
            crops.append(c)
        out.append(crops[0])
        if partners is not None:
            out_p.append(crops[1])
    x = torch.cat(out)
    return (x, torch.cat(out_p)) if partners is not None else x


class SyntheticSource:
    """Synthetic labelled rain over clean photos (folders searched recursively)."""

    def __init__(self, folders, min_side=96, regime_probs=(0.5, 0.25, 0.1, 0.15), style="classic"):
        if style not in STYLES:  # before the photos are decoded
            raise ValueError(f"unknown synthesis style {style!r}; choose one of {', '.join(STYLES)}")
        files = []
        for f in [folders] if isinstance(folders, (str, Path)) else folders:
            f = Path(f)
            files += images_under(f) if f.is_dir() else list_images(f)
        self.images, self.unreadable = [], []
        for p in files:
            try:
                a = load_rgb_uint8(p)
            except Exception as e:  # PIL raises many types for a broken file: skip it, say so
                self.unreadable.append(f"{p} ({type(e).__name__}: {e})")
                continue
            if min(a.shape[:2]) >= min_side:
                self.images.append(_to_tensor(a))
        if self.unreadable:
            import warnings
            warnings.warn(f"skipped {len(self.unreadable)} unreadable image(s): " + "; ".join(self.unreadable[:3]),
                          stacklevel=2)
        if not self.images:
            raise FileNotFoundError(f"no clean images of at least {min_side}px in {folders}")
        self.regime_probs = regime_probs
        self.style = style

    def batch(self, n, size, gen, device) -> RainSample:
        clean = random_crops(self.images, n, size, gen, device, scale_range=(0.5, 1.0))
        return synthesize(clean, gen, probs=self.regime_probs, style=self.style)


def write_labelled_set(clean_dirs, out, count: int, size: int = 256, seed: int = 0, style: str = "classic",
                       progress: bool = True) -> dict:
    """Write ``count`` labelled synthetic pairs over the photos in ``clean_dirs`` to ``out`` (rain/, gt/, mask/
    as 8-bit PNG, labels.json with each image's pattern labels and its expert); the same seed gives the
    same set. labels.json is written last, so a set without it is incomplete. Returns the labels."""
    import json

    from .imageio import atomic_write_bytes, save_image
    from .patterns import ATTRIBUTES, EXPERTS
    src = SyntheticSource(clean_dirs, style=style)
    out = Path(out)
    for sub in ("rain", "gt", "mask"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "labels.json").unlink(missing_ok=True)  # an older set's labels must not outlive an interrupted rewrite
    gen = torch.Generator().manual_seed(seed)
    labels = {}
    names = list(ATTRIBUTES)
    it = range(count)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="synth", unit="img")
    for i in it:
        s = src.batch(1, size, gen, "cpu")
        name = f"{i:05d}.png"
        save_image(s.rainy[0], out / "rain" / name)
        save_image(s.clean[0], out / "gt" / name)
        save_image(s.mask[0], out / "mask" / name)
        labels[name] = {**{n: ATTRIBUTES[n][int(s.labels[0, j])] for j, n in enumerate(names)},
                        "expert": EXPERTS[int(s.expert[0])]}
    text = json.dumps(labels, indent=1)
    atomic_write_bytes(out / "labels.json", lambda tmp: Path(tmp).write_text(text))
    return labels


class NoRainSource:
    """Rain-free crops of the clean photos, target = input: teaches the restorer to leave bright
    thin textures (grass, scales, wires) alone. Routed and labelled like sparse light rain, which
    is where the pattern head sends a rain-free photo."""

    def __init__(self, clean: SyntheticSource):
        self.clean = clean

    def batch(self, n, size, gen, device) -> RainSample:
        x = random_crops(self.clean.images, n, size, gen, device, scale_range=(0.5, 1.0))
        labels = torch.zeros(n, len(ATTRIBUTE_NAMES), dtype=torch.long, device=device)
        return RainSample(x, x.clone(), torch.zeros_like(x[:, :1]), labels,
                          torch.zeros(n, dtype=torch.long, device=device))


def check_light_share(light_share: float, what: str):
    if not 0.0 <= float(light_share) <= 1.0:
        raise ValueError(f"light_share must be in [0, 1] (the share of {what} draws that are light rain), "
                         f"got {light_share}")


def kind_draw_weights(heavy: list, light_share: float, what: str) -> torch.Tensor:
    """Draw weights over items flagged ``heavy`` (list of bool) so that light items make up ``light_share`` of the
    draws and heavy ones the rest, however many of each there are; with only one kind present, that kind is drawn."""
    check_light_share(light_share, what)
    mask = torch.tensor(heavy, dtype=torch.bool)
    n_heavy = float(mask.sum())
    n_light = len(heavy) - n_heavy
    share = float(light_share) if n_heavy and n_light else (1.0 if n_light else 0.0)
    return torch.where(mask, (1 - share) / max(1.0, n_heavy), share / max(1.0, n_light))


class PairedSource:
    """Real rain/gt pairs. Labels: expert and form from the folder/name hints (heavy vs light),
    orientation from the rain layer's structure tensor; a mask from the rain layer. A folder with
    ``layer/`` instead of ``rain/`` (the compact pack of scripts/pack_gpu_data.py) gives rainy = clean + layer.
    ``light_share`` (None: every pair equally likely) makes light pairs that share of the draws, heavy the rest,
    however many of each there are (with only one kind present, that kind is drawn). ``vflip``: half of the crops
    are also flipped upside down (drawn after the crops, so the crops are those of ``vflip=False``)."""

    def __init__(self, roots, min_side=96, light_share=None, vflip=False):
        self.vflip = bool(vflip)
        pairs = []
        for r in [roots] if isinstance(roots, (str, Path)) else roots:
            packed = (Path(r) / "layer").is_dir() and not (Path(r) / "rain").is_dir()
            pairs += [(rp, gp, packed) for rp, gp in pair_files(r, rain_dir="layer" if packed else "rain")]
        self.rain, self.gt, self.heavy = [], [], []
        for rp, gp, packed in pairs:
            a, b = load_rgb_uint8(rp), load_rgb_uint8(gp)
            if a.shape != b.shape:
                raise ValueError(f"pair {rp.name}: rainy {a.shape} and clean {b.shape} differ in size")
            if packed:  # a packed pair (scripts/pack_gpu_data.py): rainy = clean + its rain layer
                a = np.clip(b.astype(np.int16) + a, 0, 255).astype(np.uint8)
            if min(a.shape[:2]) < min_side:
                continue
            self.rain.append(_to_tensor(a))
            self.gt.append(_to_tensor(b))
            name = str(rp).lower()
            self.heavy.append(any(h in name for h in HEAVY_HINTS) and "rain200l" not in name)
        if not self.rain:
            raise FileNotFoundError(f"no pairs of at least {min_side}px under {roots}")
        self.draw_weights = None if light_share is None else kind_draw_weights(self.heavy, light_share, "pair")

    def batch(self, n, size, gen, device) -> RainSample:
        if self.draw_weights is None:  # (uniform over pairs: older configs keep their exact data stream)
            picks = torch.randint(len(self.rain), (n,), generator=gen).tolist()
        else:
            picks = torch.multinomial(self.draw_weights, n, replacement=True, generator=gen).tolist()
        rainy, clean = random_crops(self.rain, n, size, gen, device, partners=self.gt, indices=picks)
        if self.vflip:
            up = (torch.rand(n, generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
            rainy, clean = torch.where(up, rainy.flip(-2), rainy), torch.where(up, clean.flip(-2), clean)
        heavy = torch.tensor([self.heavy[i] for i in picks])
        layer = (rainy - clean).mean(1, keepdim=True)
        mask = (layer > 0.03).float() * 0.5 + 0.5 * layer.clamp(0, 1)
        ori = orientation_class(layer)
        dens = torch.where(heavy, 2, 0)
        labels = torch.stack([dens, ori.cpu(), torch.where(heavy, 2, 0), torch.where(heavy, 1, 0)], 1).long()
        expert = torch.where(heavy, 1, 0).long()
        return RainSample(rainy, clean, mask, labels.to(device), expert.to(device))


def orientation_class(layer: torch.Tensor, deg: float = 7.0) -> torch.Tensor:
    """Dominant streak direction of a rain layer [B,1,H,W] from its structure tensor:
    0 vertical, 1 slanted left (falling to the left), 2 slanted right."""
    gx = layer[..., 1:-1, 2:] - layer[..., 1:-1, :-2]  # central differences: same sample points
    gy = layer[..., 2:, 1:-1] - layer[..., :-2, 1:-1]
    jxx, jyy, jxy = (gx * gx).mean((1, 2, 3)), (gy * gy).mean((1, 2, 3)), (gx * gy).mean((1, 2, 3))
    # gradient orientation is perpendicular to the streaks
    phi = 0.5 * torch.atan2(2 * jxy, jxx - jyy)  # angle of dominant gradient from the x axis
    ang = torch.rad2deg(phi)  # streak angle from vertical: + when falling to the right (y down)
    ang = -ang
    return torch.where(ang > deg, 2, torch.where(ang < -deg, 1, 0))


def rotation_crop_size(size: int) -> int:
    """Side of the crop that ``rotate_center`` turns by any angle and still cuts size x size from
    without empty corners (size * sqrt(2), with a margin)."""
    return int(math.ceil(size * 1.42)) + 1


def rotate_center(x: torch.Tensor, degrees: torch.Tensor, size: int) -> torch.Tensor:
    """Rotate each image of x [B,C,S,S] about its centre by degrees[b] and cut the central size x size
    (S >= size * sqrt(2) leaves no empty corners)."""
    b, _, s, _ = x.shape
    th = degrees.to(x.device, torch.float32) * math.pi / 180
    cos, sin = torch.cos(th), torch.sin(th)
    k = size / s  # sample only the central window
    mat = torch.stack([torch.stack([cos * k, -sin * k, torch.zeros_like(th)], 1),
                       torch.stack([sin * k, cos * k, torch.zeros_like(th)], 1)], 1)
    grid = F.affine_grid(mat, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class MixtureSource:
    """Draw each batch from one of several sources with given probabilities."""

    def __init__(self, sources, weights):
        if len(sources) != len(weights) or not sources:
            raise ValueError("MixtureSource needs one weight per source")
        self.sources = sources
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def batch(self, n, size, gen, device) -> RainSample:
        counts = torch.bincount(torch.multinomial(self.weights, n, replacement=True, generator=gen),
                                minlength=len(self.sources)).tolist()
        parts = [s.batch(c, size, gen, device) for s, c in zip(self.sources, counts) if c > 0]
        return RainSample(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("rainy", "clean", "mask", "labels", "expert")))


class RainLayerSource:
    """Real rain layers (rainy - clean of real pairs) composited over clean photos: real streak
    statistics on many backgrounds. Light vs heavy from the folder/name hints, as PairedSource."""

    def __init__(self, pair_roots, clean_folders, min_side=96, only: str | None = None, max_rotation=15.0,
                 gain=(0.7, 1.3), light_share=0.5, scale=(0.8, 1.2), mix=0.0, mix_gain=(0.4, 1.0)):
        check_light_share(light_share, "layer")  # before any file is read
        if not 0.0 <= float(mix) <= 1.0:
            raise ValueError(f"mix must be in [0, 1] (the share of layer draws that get a second layer added), got {mix}")
        self.scale = tuple(float(v) for v in scale)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high (the layers' zoom range), got {scale}")
        self.max_rotation = float(max_rotation)
        self.gain = tuple(float(g) for g in gain)
        self.mix = float(mix)
        self.mix_gain = tuple(float(g) for g in mix_gain)
        self.pairs = PairedSource(pair_roots, min_side=min_side)
        keep = [i for i, h in enumerate(self.pairs.heavy) if only is None or (only == "heavy") == h]
        if not keep:
            raise FileNotFoundError(f"no {only} rain pairs under {pair_roots}")
        self.layers = [(self.pairs.rain[i].short() - self.pairs.gt[i].short()).clamp(0, 255).to(torch.uint8) for i in keep]
        self.heavy = [self.pairs.heavy[i] for i in keep]
        self.clean = SyntheticSource(clean_folders, min_side=min_side)
        self.heavy_mask = torch.tensor(self.heavy, dtype=torch.bool)
        self.draw_weights = kind_draw_weights(self.heavy, light_share, "layer")

    def _add_second_layers(self, layer, picks, crop, gen, device):
        """With probability ``mix`` per sample, add a second crop of a layer of the same kind (light or heavy),
        scaled by a factor in ``mix_gain``: streak fields the few real layers don't have (denser, crossing
        streaks of two lengths), from real streaks without resampling them."""
        n = len(picks)
        on = (torch.rand(n, generator=gen) < self.mix).tolist()
        g = self.mix_gain[0] + (self.mix_gain[1] - self.mix_gain[0]) * torch.rand(n, generator=gen)
        for j in [j for j in range(n) if on[j]]:
            same_kind = self.heavy_mask == self.heavy_mask[picks[j]]
            w = torch.where(same_kind, self.draw_weights, torch.zeros_like(self.draw_weights))
            k = int(torch.multinomial(w, 1, generator=gen))
            second = random_crops(self.layers, 1, crop, gen, device, scale_range=self.scale, indices=[k])
            layer[j:j + 1] = layer[j:j + 1] + float(g[j]) * second
        return layer

    def batch(self, n, size, gen, device) -> RainSample:
        picks = torch.multinomial(self.draw_weights, n, replacement=True, generator=gen).tolist()
        # crop wider, turn by a small random angle and cut the centre: streak directions the few real
        # layers don't have (horizontal flips in random_crops mirror them as well)
        crop = rotation_crop_size(size) if self.max_rotation > 0 else size
        layer = random_crops(self.layers, n, crop, gen, device, scale_range=self.scale, indices=picks)
        if self.mix > 0:  # (draws nothing more when off: older configs keep their exact data stream)
            layer = self._add_second_layers(layer, picks, crop, gen, device)
        if self.max_rotation > 0:
            layer = rotate_center(layer, (torch.rand(n, generator=gen) * 2 - 1) * self.max_rotation, size)
        clean = random_crops(self.clean.images, n, size, gen, device, scale_range=(0.5, 1.0))
        lo, hi = self.gain
        gain = (lo + (hi - lo) * torch.rand(n, generator=gen)).to(device).view(-1, 1, 1, 1)
        rainy = (clean + layer * gain).clamp(0, 1)
        heavy = torch.tensor([self.heavy[i] for i in picks])
        lay = (rainy - clean).mean(1, keepdim=True)
        mask = (lay > 0.03).float() * 0.5 + 0.5 * lay.clamp(0, 1)
        dens = torch.where(heavy, 2, torch.where((lay > 0.05).float().mean((1, 2, 3)).cpu() > 0.12, 1, 0))
        labels = torch.stack([dens, orientation_class(lay).cpu(), torch.where(heavy, 2, 0), torch.where(heavy, 1, 0)], 1)
        return RainSample(rainy, clean, mask, labels.long().to(device), torch.where(heavy, 1, 0).long().to(device))
