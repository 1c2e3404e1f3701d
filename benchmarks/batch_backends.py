"""Throughput of `cliprpn batch`'s backends on the same images, one table: in-process, Ray with 1 and 2
workers (a Ray instance started on this machine for each run) and, with --comfy-url, running ComfyUI servers.

  python -m benchmarks.batch_backends [--limit 20] [--threads 1] [--comfy-url http://127.0.0.1:8188 ...]

Every backend derains the same files (Rain100L's rain/ by default) into a fresh folder, with the shipped model on
the CPU; each in-process model and each Ray worker gets ``--threads`` CPU threads (ComfyUI servers have the
threads they were started with). Columns:

- ``total s``: the run as a user sees it, from the call to the last output written: the model load in-process;
  Ray's start, the workers' start and their model loads with Ray; nothing for servers, which are already running
  and get one warm-up image first (ComfyUI loads the model on its first prompt);
- ``img/s``: images / total s;
- ``steady img/s``: from the first finished image to the last ((images - 1) / seconds), i.e. without the start;
- ``start s``: call -> first finished image.

The machine's load average is printed beside: these are wall-clock figures, shared with whatever else runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from cliprpn_core import batch as B
from cliprpn_core.batch.ray_backend import RayRunner, WorkerSettings

from .common import DATA as SHARED_DATA

DATA = SHARED_DATA / "rain100l" / "rain"


def measure(label: str, files: list[Path], out: Path, make_runner) -> dict:
    """Run ``make_runner(jobs, on_done)`` over ``files`` into ``out``; its figures (label, counts, timings)."""
    jobs = B.make_jobs(files, out)
    finished: list[float] = []
    t0 = time.perf_counter()
    runner = make_runner(jobs, lambda job, r: finished.append(time.perf_counter()))
    s = runner.run()
    total = time.perf_counter() - t0
    done = sum(j.status == "done" for j in jobs)
    if done != len(jobs):
        print(f"  [{label}] WARNING: {s['counts']}")
    finished.sort()
    steady = (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 and finished[-1] > finished[0] \
        else None
    return {"backend": label, "images": done, "total_s": round(total, 2), "images_per_s": round(done / total, 3),
            "steady_images_per_s": None if steady is None else round(steady, 3),
            "start_s": round(finished[0] - t0, 2) if finished else None,
            "per_worker": {k: v["done"] for k, v in s.get("servers", {}).items()}}


def in_process(files, out, threads):
    def make(jobs, on_done):
        lb = B.LocalBackend(device="cpu", dtype="fp32", threads=threads)
        return B.BatchRunner(jobs, [lb], retries=1, progress=False, log=print, on_done=on_done)
    return measure("in-process", files, out, make)


def ray(files, out, threads, workers):
    def make(jobs, on_done):
        settings = WorkerSettings(device="cpu", dtype="fp32", threads=threads, retries=1)
        return RayRunner(jobs, settings, workers=workers, progress=False, log=print, on_done=on_done)
    return measure(f"ray, {workers} worker{'s' if workers > 1 else ''}", files, out, make)


def comfy(files, out, urls, depth, warm):
    wf, _ = B.load_workflow(None)
    img, outn = B.find_image_node(wf), B.find_output_node(wf)
    backends = [B.ComfyBackend(u, wf, img, outn, slots=depth, timeout=600) for u in urls]
    for i, b in enumerate(backends):  # the server loads the model on its first prompt: not timed
        if not b.ping():
            raise SystemExit(f"ComfyUI server {b.name} does not answer; start it or drop --comfy-url {b.name}")
        B.BatchRunner(B.make_jobs([warm], out.parent / f"warm{i}"), [b], progress=False, log=print).run()

    def make(jobs, on_done):
        return B.BatchRunner(jobs, backends, retries=1, progress=False, log=print, on_done=on_done)
    n = len(urls)
    return measure(f"ComfyUI, {n} server{'s' if n > 1 else ''} (depth {depth})", files, out, make)


def table(rows: list[dict]) -> str:
    head = f"{'backend':<28} {'images':>6} {'total s':>8} {'img/s':>7} {'steady img/s':>13} {'start s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        steady = "-" if r["steady_images_per_s"] is None else f"{r['steady_images_per_s']:.3f}"
        start = "-" if r["start_s"] is None else f"{r['start_s']:.2f}"
        lines.append(f"{r['backend']:<28} {r['images']:>6} {r['total_s']:>8.2f} {r['images_per_s']:>7.3f} "
                     f"{steady:>13} {start:>8}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help="folder of images (default: Rain100L rain/)")
    ap.add_argument("--limit", type=int, default=100, help="first N images (default 100)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per in-process model / Ray worker")
    ap.add_argument("--modes", default="inprocess,ray1,ray2,comfy", help="any of inprocess, ray1, ray2, comfy")
    ap.add_argument("--comfy-url", action="append", default=[], metavar="URL",
                    help="a running ComfyUI server with this pack (repeat for several: a row for the first alone, "
                         "then one for all); the comfy rows need one")
    ap.add_argument("--depth", type=int, default=2, help="our prompts in flight per ComfyUI server")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args(argv)
    modes = set(a.modes.split(","))
    files = sorted(p for p in Path(a.data).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[: a.limit]
    if not files:
        raise SystemExit(f"no images in {a.data}")
    work = Path(tempfile.mkdtemp(prefix="cliprpn_backends_"))
    load0 = os.getloadavg()
    rows = []
    try:
        if "inprocess" in modes:
            rows.append(in_process(files, work / "inprocess", a.threads))
        for n in (1, 2):
            if f"ray{n}" in modes:
                rows.append(ray(files, work / f"ray{n}", a.threads, n))
        if "comfy" in modes and a.comfy_url:  # the first server alone, then all of them
            for n in sorted({1, len(a.comfy_url)}):
                rows.append(comfy(files, work / f"comfy{n}", a.comfy_url[:n], a.depth, files[0]))
        elif "comfy" in modes:
            print("(no --comfy-url: the ComfyUI row is left out)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"\n{len(files)} images from {a.data}, {a.threads} thread(s) per worker, shipped model on the CPU, "
          f"{os.cpu_count()} CPUs, load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"images": len(files), "threads_per_worker": a.threads,
                                            "cpu_count": os.cpu_count(), "loadavg": [load0, load1], "rows": rows},
                                           indent=2))


if __name__ == "__main__":
    main()
