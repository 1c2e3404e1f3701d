"""Deraining metrics exactly as the protocol (../shared/docs/method.md): Y channel of MATLAB's
rgb2ycbcr on uint8 RGB, rounded; PSNR with peak 255; Wang et al. SSIM (11x11 Gaussian window,
sigma 1.5, K = (0.01, 0.03), L = 255, 'valid' filtering); no border crop; averaged per image."""
from __future__ import annotations

import numpy as np


def rgb_to_y(rgb_uint8: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr Y of a uint8 HxWx3 array, rounded to integers (as float64)."""
    a = np.asarray(rgb_uint8)
    if a.dtype != np.uint8:
        raise ValueError(f"rgb_to_y expects uint8 RGB, got {a.dtype}: save the image as 8-bit first")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects HxWx3, got shape {a.shape}")
    a = a.astype(np.float64)
    y = 16.0 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0
    return np.round(y)


def psnr_y(pred: np.ndarray, gt: np.ndarray) -> float:
    _same_shape(pred, gt)
    mse = np.mean((rgb_to_y(pred) - rgb_to_y(gt)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def rain_left(pred: np.ndarray, rain: np.ndarray, gt: np.ndarray, threshold: float = 5.0) -> float:
    """Diagnostic, not a protocol metric: the share of the rain that an output still carries, on the Y
    channel of 8-bit images. Over the pixels where the rainy input differs from the ground truth by more
    than `threshold` grey levels, the least-squares slope of (pred - gt) on (rain - gt): 0 when the rain
    is removed exactly, 1 when the output is the input, and between them when streaks are only dimmed."""
    _same_shape(pred, gt)
    _same_shape(rain, gt)
    yg = rgb_to_y(gt)
    r, p = rgb_to_y(rain) - yg, rgb_to_y(pred) - yg
    m = np.abs(r) > threshold
    den = float((r[m] ** 2).sum())
    return float("nan") if den == 0 else float((r[m] * p[m]).sum() / den)


def _mean_finite(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def _gauss_window(size=11, sigma=1.5):
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return g


def _filter_valid(img, g):
    """Separable 'valid' correlation with a symmetric 1-D kernel."""
    k = len(g)
    h, w = img.shape
    tmp = sum(g[i] * img[i:h - k + 1 + i, :] for i in range(k))
    return sum(g[j] * tmp[:, j:w - k + 1 + j] for j in range(k))


def ssim_y(pred: np.ndarray, gt: np.ndarray) -> float:
    _same_shape(pred, gt)
    x, y = rgb_to_y(pred), rgb_to_y(gt)
    if min(x.shape) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11, got {x.shape}")
    g = _gauss_window()
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(y * y, g) - my * my
    sxy = _filter_valid(x * y, g) - mx * my
    m = ((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx * mx + my * my + C1) * (sxx + syy + C2))
    return float(m.mean())


def _same_shape(a, b):
    if np.shape(a) != np.shape(b):
        raise ValueError(f"prediction {np.shape(a)} and ground truth {np.shape(b)} differ in size: "
                         "outputs must be saved at exactly the input size")


def _read(path, what):
    """8-bit RGB of an image file, or ValueError naming the file when it cannot be decoded."""
    from .imageio import load_rgb_uint8
    try:
        return load_rgb_uint8(path)
    except Exception as e:  # PIL raises many types for a broken file
        raise ValueError(f"{what} {path} is not a readable image ({type(e).__name__}: {e}); "
                         "replace it (e.g. derain that image again) and rerun") from e


def evaluate_folders(pred_dir, gt_dir, progress=True, rain_dir=None):
    """Per-image and mean Y-PSNR/SSIM over files with the same names in two folders; with the rainy
    inputs' folder also the `rain_left` diagnostic (share of the rain the outputs still carry)."""
    from pathlib import Path

    from .imageio import IMAGE_EXTS

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gts = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not gts:
        raise FileNotFoundError(f"no ground-truth images in {gt_dir}")
    rows, missing = [], []
    it = gts
    if progress:
        from tqdm import tqdm
        it = tqdm(gts, desc="eval", unit="img")
    for g in it:
        p = pred_dir / g.name
        if not p.exists():
            cands = [q for q in pred_dir.glob(g.stem + ".*")]
            if not cands:
                missing.append(g.name)
                continue
            p = cands[0]
        a, b = _read(p, "prediction"), _read(g, "ground truth")
        if a.shape != b.shape:
            raise ValueError(f"prediction {p} is {a.shape[1]}x{a.shape[0]} but its ground truth {g} is "
                             f"{b.shape[1]}x{b.shape[0]}; predictions must keep the ground truth's size")
        row = {"name": g.name, "psnr": psnr_y(a, b), "ssim": ssim_y(a, b)}
        if rain_dir is not None:
            r = Path(rain_dir) / g.name
            if not r.exists():
                raise FileNotFoundError(f"no rainy input {r} for ground truth {g.name}: the rain folder must use "
                                        "the ground truth's file names")
            row["rain_left"] = rain_left(a, _read(r, "rainy input"), b)
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no predictions in {pred_dir} match the names in {gt_dir}")
    # rain_left is NaN on an image with no rain to measure (a rain-free pair); its mean is over the others, NaN
    # (without NumPy's empty-slice warning) when there are none
    mean = {k: _mean_finite([r[k] for r in rows]) for k in rows[0] if k != "name"}
    return {"mean": mean, "images": rows, "missing": missing}
