"""Inputs, outputs and resume records shared by `cliprpn derain` and `cliprpn batch`.

- :func:`collect_inputs`: folders (non-recursive), globs, list files and single files, each with the
  reason it cannot be used (reported per image, never raised);
- :func:`plan_outputs`: every output path of a run decided before any work: collisions between two
  outputs and outputs that would replace an input are refused (:class:`PlanError`), naming the files;
- :func:`check_output_dir`: the output folder exists or can be made, is a folder and is writable;
- :class:`ResumeLog`: an append-only record of finished images, so a rerun skips outputs that are
  complete and unchanged (same input file, same settings, output untouched) and redoes the rest;
- :func:`clean_partials` removes the temp files a hard kill (SIGKILL, power loss) leaves behind.

Standard library + Pillow only.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .imageio import IMAGE_EXTS

LIST_EXTS = {".txt", ".lst", ".list"}


class PlanError(ValueError):
    """The run is refused before any work (an argument problem: the command line must change)."""


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def collect_inputs(specs) -> list[tuple[Path, str]]:
    """Folders (non-recursive, image extensions), globs, list files (one path a line, relative to
    the list, '#' comments) and single files -> [(path, problem)] in order, duplicates dropped.
    ``problem`` is '' or why the entry cannot be used (reported per image, never raised)."""
    out, seen = [], set()

    def add(p: Path, problem=""):
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append((p, problem))

    for spec in [specs] if isinstance(specs, (str, Path)) else specs:
        p = Path(spec)
        if p.is_dir():
            try:
                found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS and q.is_file())
            except OSError as e:
                add(p, f"folder {p} cannot be listed ({e.strerror or e})")
                continue
            if not found:
                add(p, f"folder {p} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            for q in found:
                add(q)
        elif p.is_file() and p.suffix.lower() in LIST_EXTS:
            try:
                lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError as e:
                add(p, f"list file {p} cannot be read ({e})")
                continue
            for line in lines:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                q = Path(line).expanduser()
                q = q if q.is_absolute() else p.parent / q
                add(q, "" if q.is_file() else f"{q} (listed in {p.name}) "
                    + ("is not a file" if q.exists() else "does not exist"))
        elif p.is_file():
            add(p)
        elif _has_glob(str(spec)):
            found = sorted(Path(q) for q in glob.glob(str(spec), recursive=True) if Path(q).is_file())
            if not found:
                add(p, f"pattern {spec} matches no files")
            for q in found:
                add(q)
        else:
            add(p, f"input {p} does not exist")
    return out


def _same(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.abspath(os.path.realpath(a))) == os.path.normcase(os.path.abspath(os.path.realpath(b)))


def _inside(child: Path, parent: Path) -> bool:
    c, p = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return c == p or p in c.parents


def check_output_dir(out: Path, flag: str = "-o") -> None:
    """The output folder exists (or is created), is a folder and is writable; PlanError otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PlanError(f"{flag} {out} is a file, not a folder; give a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlanError(f"cannot create the output folder {out} ({e.strerror or e}); choose a folder you can write to") from e
    try:  # os.access is not enough (read-only mounts, ACLs): try it
        fd, tmp = tempfile.mkstemp(prefix=".cliprpn-write-test.", suffix=".part", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise PlanError(f"the output folder {out} is not writable ({e.strerror or e}); choose a folder you can write to") from e


def plan_outputs(specs, inputs: list[Path], outputs: list[list[Path]], out_dir: Path, in_place: bool = False,
                 extra: dict | None = None) -> None:
    """Refuse (PlanError, before any work) a run in which

    - two outputs share a path (``a.jpg`` and ``a.png`` -> ``a.png``; ``x.png``'s mask and ``x_mask.png``);
    - an output (or an ``extra`` file such as the report) would replace an input file;
    - the output folder is, or is inside, an input folder,

    unless ``in_place``: then an output may replace its *own* input (and the output folder may be an
    input folder), never another input or another output. ``outputs[i]`` are the paths written for
    ``inputs[i]`` (image, mask, ...); ``extra`` maps a label (e.g. '--report') to another file written."""
    owner: dict[str, str] = {}
    clashes = []
    for src, dsts in zip(inputs, outputs):
        for d in dsts:
            key = os.path.normcase(os.path.abspath(d))
            if key in owner:
                clashes.append(f"{d.name} (from {owner[key]} and {src})")
            else:
                owner[key] = str(src)
    for label, path in (extra or {}).items():
        key = os.path.normcase(os.path.abspath(path))
        if key in owner:
            clashes.append(f"{Path(path).name} ({label} and the output of {owner[key]})")
        else:
            owner[key] = label
    if clashes:
        raise PlanError("two outputs of this run would have the same name, one overwriting the other: "
                        + "; ".join(clashes[:5]) + (f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else "")
                        + ". Rename one of each pair, derain them into different folders, or use --keep-ext "
                          "(outputs named NAME.EXT.png)")
    check_in_place(specs, inputs, outputs, out_dir, in_place, extra)


def check_in_place(specs, inputs: list[Path], outputs: list[list[Path]], out_dir: Path, in_place: bool = False,
                   extra: dict | None = None) -> None:
    """The part of :func:`plan_outputs` that protects the inputs (PlanError)."""
    if not in_place:
        for spec in [specs] if isinstance(specs, (str, Path)) else specs:
            p = Path(spec)
            if p.is_dir() and _inside(out_dir, p):
                raise PlanError(f"the output folder {out_dir} is {'the input folder' if _same(out_dir, p) else 'inside the input folder'} "
                                f"{p}; outputs would mix with (or replace) the originals. Choose another -o, "
                                "or pass --in-place to write there on purpose")
    by_input = {os.path.normcase(os.path.abspath(os.path.realpath(s))): s for s in inputs}
    for src, dsts in zip(inputs, outputs):
        for d in dsts:
            hit = by_input.get(os.path.normcase(os.path.abspath(os.path.realpath(d))))
            if hit is None:
                continue
            if in_place and _same(hit, src) and d == dsts[0]:
                continue  # --in-place: the derained image replaces its own original
            raise PlanError(f"the output {d} would overwrite the input {hit}"
                            + ("" if in_place else "; choose another -o (or --in-place to replace originals on purpose)"))
    for label, path in (extra or {}).items():
        hit = by_input.get(os.path.normcase(os.path.abspath(os.path.realpath(path))))
        if hit is not None:
            raise PlanError(f"{label} {path} would overwrite the input {hit}; choose another path")


def output_complete(path: Path) -> bool:
    """The file exists, is not empty and decodes its whole structure."""
    from PIL import Image
    try:
        if Path(path).stat().st_size == 0:
            return False
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def clean_partials(out_dir: Path) -> int:
    """Remove temp files an earlier hard kill left (atomic_write_bytes names them .NAME.*.part)."""
    n = 0
    for p in Path(out_dir).glob(".*.part"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def _stat(p: Path) -> list[int] | None:
    try:
        s = os.stat(p)
    except OSError:
        return None
    return [s.st_size, s.st_mtime_ns]


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResumeLog:
    """Append-only JSON-lines record of the images a run finished, in the output folder.

    A record holds the input's size and mtime, the settings' key and each output's size and mtime;
    :meth:`done` is true only when all of them still match and every output decodes, so a rerun
    skips exactly the outputs that are complete and unchanged. A line cut short by a hard kill is
    ignored (that image is redone)."""

    NAME = ".cliprpn-derain.jsonl"

    def __init__(self, out_dir: Path, settings: dict):
        self.path = Path(out_dir) / self.NAME
        self.key = settings_key(settings)
        self.records: dict[str, dict] = {}
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                rec = json.loads(line)
                self.records[rec["outputs"][0]] = rec
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        self.written = {}  # output path -> (its input, its recorded stat)
        for rec in self.records.values():
            for o, st in zip(rec.get("outputs", []), rec.get("output_stats", [])):
                self.written[o] = (rec.get("input"), st)

    def output_of_another_input(self, path: Path) -> bool:
        """True when ``path`` is an untouched output this tool wrote for some other input (with
        --in-place, a folder holds its own outputs: they are not new inputs)."""
        hit = self.written.get(self._name(path))
        return hit is not None and hit[0] != self._name(path) and hit[1] == _stat(path)

    @staticmethod
    def _name(p: Path) -> str:
        return os.path.abspath(p)

    def done(self, src: Path, dsts: list[Path]) -> bool:
        rec = self.records.get(self._name(dsts[0]))
        if rec is None or rec.get("settings") != self.key or rec.get("input") != self._name(src):
            return False
        if rec.get("outputs") != [self._name(d) for d in dsts]:
            return False
        # --in-place: the input file is now the output itself
        want_input = rec.get("output_stats", [None])[0] if _same(src, dsts[0]) else rec.get("input_stat")
        if want_input != _stat(src):
            return False
        if rec.get("output_stats") != [_stat(d) for d in dsts]:
            return False
        return all(output_complete(d) for d in dsts)

    def record(self, src: Path, dsts: list[Path]) -> None:
        rec = {"input": self._name(src), "input_stat": _stat(src), "settings": self.key,
               "outputs": [self._name(d) for d in dsts], "output_stats": [_stat(d) for d in dsts]}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
