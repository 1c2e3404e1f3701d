"""Throughput of `cliprpn batch`: images per minute in-process, through one ComfyUI server and
through two servers on this machine, and the API overhead per image.

  COMFYUI_DIR=/path/to/ComfyUI python -m benchmarks.batch_throughput [--limit 100] [--threads 1]

Every worker (the in-process model, each server) gets ``--threads`` CPU threads (torch threads /
OMP_NUM_THREADS), so one vs. two servers shows how the work scales over cores. The model is loaded
and one warm-up image run before timing in every mode (ComfyUI loads the model on the first
prompt). Servers are real ComfyUI processes (CPU, loopback, random ports) started with the helper
in tests/comfy/comfy_server.py and killed at the end. API overhead per image = client-side seconds
(upload .. download) minus the server's own execution time, measured at depth 1 (nothing queued).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cliprpn_core import batch as B

from .common import DATA as SHARED_DATA
from .common import ROOT

DATA = SHARED_DATA / "rain100l" / "rain"


def comfy_server_module():
    spec = importlib.util.spec_from_file_location("cliprpn_bench_comfy_server", ROOT / "tests" / "comfy" / "comfy_server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_batch(files, out, backends, label):
    jobs = B.make_jobs(files, out)
    r = B.BatchRunner(jobs, backends, retries=1, progress=False, log=lambda m: print(f"  [{label}] {m}"))
    s = r.run()
    done = [j for j in jobs if j.status == "done"]
    if len(done) != len(jobs):
        print(f"  [{label}] WARNING: {s['counts']}")
    ipm = 60.0 * len(done) / s["wall_seconds"]
    res = {"images": len(done), "wall_seconds": round(s["wall_seconds"], 2), "images_per_minute": round(ipm, 1),
           "per_server": {b.name: sum(j.server == b.name for j in done) for b in backends}}
    secs = [j.seconds for j in done if j.seconds is not None]
    ex = [j.seconds - j.exec_seconds for j in done if j.seconds is not None and j.exec_seconds is not None]
    if secs:
        res["client_seconds_mean"] = round(statistics.mean(secs), 3)
    if ex:
        res["overhead_seconds_mean"] = round(statistics.mean(ex), 3)
        res["overhead_seconds_median"] = round(statistics.median(ex), 3)
        res["exec_seconds_mean"] = round(statistics.mean(j.exec_seconds for j in done if j.exec_seconds is not None), 3)
    print(f"  [{label}] {len(done)} images in {s['wall_seconds']:.1f}s = {ipm:.1f} images/min {res['per_server']}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    ap.add_argument("--depth", type=int, default=2, help="our prompts in flight per server")
    ap.add_argument("--overhead-images", type=int, default=20)
    ap.add_argument("--modes", default="inprocess,one,two,overhead,pattern")
    ap.add_argument("--comfy-dir", default=os.environ.get("COMFYUI_DIR"))
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    modes = set(a.modes.split(","))
    files = sorted(p for p in Path(a.data).iterdir() if p.suffix.lower() == ".png")[: a.limit]
    work = Path(tempfile.mkdtemp(prefix="cliprpn_bench_"))
    warm = work / "warm"
    warm.mkdir()
    shutil.copy(files[0], warm / "warmup.png")
    results = {"images": len(files), "threads_per_worker": a.threads, "depth": a.depth,
               "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    servers = []
    try:
        if "inprocess" in modes:
            t0 = time.perf_counter()
            lb = B.LocalBackend(device="cpu", dtype="fp32", threads=a.threads)
            load = time.perf_counter() - t0
            run_batch([warm / "warmup.png"], work / "warm_out_local", [lb], "warm-up")
            results["inprocess"] = run_batch(files, work / "out_local", [lb], "in-process")
            results["inprocess"]["model_load_seconds"] = round(load, 2)
        if modes & {"one", "two", "overhead", "pattern"}:
            if not a.comfy_dir:
                sys.exit("set COMFYUI_DIR (or --comfy-dir) for the server modes")
            cs = comfy_server_module()
            os.environ["OMP_NUM_THREADS"] = str(a.threads)
            n = 2 if "two" in modes else 1
            wf, _ = B.load_workflow(None)
            img, outn = B.find_image_node(wf), B.find_output_node(wf)
            t0 = time.perf_counter()
            for i in range(n):
                srv = cs.ComfyServer(Path(a.comfy_dir), ROOT, work / f"comfy{i}")
                servers.append(srv)
                srv.start()
            results["server_start_seconds"] = round((time.perf_counter() - t0) / n, 1)

            def backends(k, depth, pattern=None):
                return [B.ComfyBackend(s.url, wf, img, outn, slots=depth, timeout=300, pattern=pattern)
                        for s in servers[:k]]
            for i, s in enumerate(servers):
                t0 = time.perf_counter()
                run_batch([warm / "warmup.png"], work / f"warm_out{i}", backends(i + 1, 1)[i:], "warm-up")
                results.setdefault("server_first_image_seconds", []).append(round(time.perf_counter() - t0, 2))
            if "overhead" in modes:
                results["overhead_depth1"] = run_batch(files[: a.overhead_images], work / "out_overhead",
                                                       backends(1, 1), "one server, depth 1")
            if "one" in modes:
                results["one_server"] = run_batch(files, work / "out_one", backends(1, a.depth), "one server")
            if "pattern" in modes:  # --pattern: perceiver + router + PreviewAny taps added to the workflow
                results["one_server_pattern"] = run_batch(files[: a.overhead_images], work / "out_pattern",
                                                          backends(1, a.depth, True), "one server, --pattern")
            if "two" in modes:
                results["two_servers"] = run_batch(files, work / "out_two", backends(2, a.depth), "two servers")
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    ip = results.get("inprocess", {}).get("images_per_minute")
    one = results.get("one_server", {}).get("images_per_minute")
    two = results.get("two_servers", {}).get("images_per_minute")
    oh = results.get("overhead_depth1", {})
    print(f"\n{len(files)} Rain100L images, {a.threads} thread(s) per worker, depth {a.depth}:")
    for k, v in (("in-process", ip), ("one ComfyUI server", one), ("two ComfyUI servers", two)):
        if v:
            print(f"  {k:<22} {v:7.1f} images/min  ({60.0 / v:.3f} s/image)")
    if oh.get("overhead_seconds_mean") is not None:
        print(f"  API overhead per image (depth 1, client minus server execution): mean {oh['overhead_seconds_mean']:.3f}s,"
              f" median {oh['overhead_seconds_median']:.3f}s (server execution {oh['exec_seconds_mean']:.3f}s)")
    pat = results.get("one_server_pattern", {}).get("images_per_minute")
    if pat:
        print(f"  one server with --pattern  {pat:7.1f} images/min  ({60.0 / pat:.3f} s/image, {a.overhead_images} images)")
    if ip and one:
        print(f"  throughput cost of going through one server: {60.0 / one - 60.0 / ip:+.3f} s/image vs in-process")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
