"""Jobs of `cliprpn batch`: one per input image, its output name, cheap input checks and the atomic
writing of results (temp file + os.replace, ordinary permissions)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..imageio import IMAGE_EXTS, atomic_write_bytes
from ..runfiles import collect_inputs
from .errors import BadInput


@dataclass
class Job:
    index: int
    src: Path
    dst: Path | None
    status: str = "pending"  # pending|running|done|skipped|failed|error|interrupted|not-run
    server: str = ""
    seconds: float | None = None
    exec_seconds: float | None = None
    attempts: int = 0  # failed attempts (retries used)
    requeued: int = 0  # times moved off a server that went away
    token: int = 0  # dispatch generation; results of older generations are stale
    failed_on: set = field(default_factory=set)
    error: str = ""
    pattern: str | None = None
    routing: dict | None = None
    perceived_by: str | None = None

    def row(self) -> dict:
        return {"input": str(self.src), "output": str(self.dst) if self.dst else "", "status": self.status,
                "server": self.server, "seconds": None if self.seconds is None else round(self.seconds, 4),
                "exec_seconds": None if self.exec_seconds is None else round(self.exec_seconds, 4),
                "attempts": self.attempts, "requeued": self.requeued, "pattern": self.pattern,
                "routing": self.routing, "perceived_by": self.perceived_by, "error": self.error}


@dataclass
class Output:
    """What a backend hands back for one image: encoded bytes (+ their format) or an HWC uint8 array."""
    data: bytes | None = None
    fmt: str = "PNG"
    array: object = None
    seconds: float = 0.0
    exec_seconds: float | None = None
    pattern: str | None = None
    routing: dict | None = None
    perceived_by: str | None = None


def output_name(src: Path, fmt: str = "same") -> str:
    return src.name if fmt == "same" else src.stem + "." + fmt


def make_jobs(specs, out_dir, fmt="same") -> list[Job]:
    jobs, names = [], {}
    for i, (src, problem) in enumerate(collect_inputs(specs)):
        dst = Path(out_dir) / output_name(src, fmt)
        j = Job(i, src, None if problem else dst)
        if problem:
            j.status, j.error = "error", problem
        elif dst.name in names:
            j.status, j.dst = "error", None
            j.error = f"output name {dst.name} already taken by {names[dst.name]}; rename one of them"
        elif dst.suffix.lower() not in IMAGE_EXTS:
            j.status, j.dst, j.error = "error", None, f"{src.name}: not an image file extension"
        else:
            names[dst.name] = src
        jobs.append(j)
    return jobs


def check_image_file(path: Path) -> None:
    """Cheap local validation so a broken file is reported as bad input, never sent anywhere."""
    from PIL import Image
    try:
        if path.stat().st_size == 0:
            raise BadInput(f"{path}: file is empty (0 bytes)")
        with Image.open(path) as im:
            im.verify()
    except BadInput:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise BadInput(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def image_bytes_problem(data: bytes) -> str | None:
    """Why ``data`` is not a decodable image (None when it is one)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken data
        return f"{len(data)} bytes: {type(e).__name__}"
    return None


_PIL_FMT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
            ".webp": "WEBP"}


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


_UMASK = _umask()


def atomic_write(dst: Path, write_fn) -> None:
    """atomic_write_bytes with ordinary permissions (mkstemp makes the temp file 0600)."""
    def w(tmp):
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
    atomic_write_bytes(dst, w)


def write_output(out: Output, dst: Path) -> None:
    """Atomically write the result under ``dst`` in the format its suffix names."""
    from PIL import Image
    want = _PIL_FMT.get(dst.suffix.lower(), "PNG")
    if out.data is not None and out.fmt == want:
        data = out.data
        atomic_write(dst, lambda tmp: Path(tmp).write_bytes(data))
        return
    if out.data is not None:
        with Image.open(io.BytesIO(out.data)) as im:
            im.load()
            img = im.copy()
    else:
        img = Image.fromarray(out.array)
    if want == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    kw = {"quality": 95} if want in ("JPEG", "WEBP") else {}
    atomic_write(dst, lambda tmp: img.save(tmp, format=want, **kw))
