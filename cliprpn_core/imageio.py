"""Image files <-> tensors. 8-bit PNG out, as the evaluation protocol requires."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class ImageReadError(ValueError):
    pass


def images_under(folder) -> list[Path]:
    """Sorted image files in a folder and all its sub-folders (empty list if there are none)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def list_images(inputs) -> list[Path]:
    """Files and folders (non-recursive) -> sorted image paths. Raises for an input that does not
    exist or a folder without images."""
    out = []
    for inp in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        p = Path(inp)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS and q.is_file())
            if not found:
                raise FileNotFoundError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return out


def read_image(path) -> torch.Tensor:
    """File -> float tensor [C,H,W] in 0..1 (C = 1, 3 or 4 as stored; palette/16-bit converted),
    turned upright by its EXIF orientation."""
    return read_image_info(path)[0]


def read_image_info(path) -> tuple[torch.Tensor, dict]:
    """:func:`read_image` plus what the output should carry over: ``{"icc_profile": bytes | None}``.

    - EXIF orientation is applied (a phone photo comes out the way it is shown), and not carried over;
    - an embedded ICC colour profile is returned unchanged: the pixel values are restored in the
      photo's own colour space and the output is tagged with the same profile (no conversion);
    - 16-bit grayscale keeps its precision on read (outputs are 8-bit PNG, as the protocol
      requires); 16-bit RGB files are read at 8 bits per channel (what Pillow decodes)."""
    from PIL import ImageOps
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: file is empty (0 bytes)")
        with Image.open(path) as im:
            im.load()
            icc = im.info.get("icc_profile") or None
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float32) / (65535.0 if im.mode != "I" else max(1.0, float(np.asarray(im).max())))
                return torch.from_numpy(a)[None].clamp(0, 1), {"icc_profile": icc}
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            a = np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"{path}: not a readable image ({e})") from e
    t = torch.from_numpy(a).float().div_(255)
    return (t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()), {"icc_profile": icc}


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[C,H,W] 0..1 -> HWC (or HW) uint8, rounded as the protocol expects."""
    a = img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    a = a.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def _read_umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write_bytes(path, write_fn):
    """Write through a temporary file in the same folder, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would have
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(img: torch.Tensor, path, fmt: str | None = None, icc_profile: bytes | None = None):
    """Save [C,H,W] 0..1 as 8-bit image (PNG unless the suffix says otherwise), atomically; tagged
    with ``icc_profile`` when given (the input's colour profile)."""
    a = to_uint8(img)
    im = Image.fromarray(a)
    fmt = fmt or (Path(path).suffix.lstrip(".").upper() or "PNG")
    fmt = {"JPG": "JPEG", "TIF": "TIFF"}.get(fmt, fmt)
    kw = {"icc_profile": icc_profile} if icc_profile else {}
    atomic_write_bytes(path, lambda tmp: im.save(tmp, format=fmt, **kw))


def load_rgb_uint8(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)
