"""The `cliprpn batch` command line: its argument parser (registered by ``cliprpn_core.cli``),
``cmd_batch`` and ``main`` (``python -m cliprpn_core.batch``)."""
from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

from .backends import Backend, ComfyBackend, LocalBackend
from .client import normalize_url
from .errors import WorkflowError
from .inputs import make_jobs
from .scheduler import BatchRunner, write_report
from .workflow import (
    DEFAULT_WORKFLOW,
    find_image_node,
    find_output_node,
    load_workflow,
    set_expert_check,
)


def add_batch_parser(subparsers):
    from ..cli import EXIT_CODES, MAX_TILE, MIN_TILE, int_in
    b = subparsers.add_parser(
        "batch", help="derain many images in-process or through ComfyUI servers (resumable)",
        description="Derain a folder, glob or list file of images. With --server the images go through running "
                    "ComfyUI servers (upload, queue an API workflow, download); without, the model runs here. "
                    "Finished outputs are skipped on a rerun; Ctrl-C stops cleanly.", epilog=EXIT_CODES)
    b.add_argument("inputs", nargs="+", help="folders, globs ('shots/*.jpg') and/or list files (.txt/.lst, one path a line)")
    b.add_argument("-o", "--output", required=True, help="output folder (results keep the input file names)")
    b.add_argument("--server", action="append", default=[], metavar="URL",
                   help="ComfyUI server (http://host:port); repeat to share the work between servers")
    b.add_argument("--workflow", default=None,
                   help=f"API-format workflow: a file, or one of ours by name (default {DEFAULT_WORKFLOW})")
    b.add_argument("--image-node", help="id of the node whose 'image' input gets each file (default: the LoadImage)")
    b.add_argument("--output-node", help="id of the node whose images are downloaded (default: the SaveImage)")
    b.add_argument("--depth", type=int_in(1, 64), default=2, help="our prompts in flight per server (default 2)")
    b.add_argument("--retries", type=int_in(0, 100), default=2, help="extra attempts for a failed image (default 2)")
    b.add_argument("--timeout", type=_positive_seconds, default=600, help="seconds one image may take on a server")
    b.add_argument("--server-wait", type=_positive_seconds, default=60,
                   help="seconds to wait for a server to come back when none is reachable")
    b.add_argument("--no-websocket", action="store_true", help="follow prompts by polling /history")
    b.add_argument("--pattern", action=argparse.BooleanOptionalAction, default=None,
                   help="servers: report rain pattern and routing. Default: when the workflow has a Rain Perceiver "
                        "/ Expert Router; --pattern also adds them to workflows without (one extra perception "
                        "pass); --no-pattern sends the workflow untouched")
    b.add_argument("--overwrite", action="store_true", help="redo images whose output already exists")
    b.add_argument("--in-place", action="store_true",
                   help="allow -o to be an input folder (with --format same, results replace their originals)")
    b.add_argument("--check", action="store_true",
                   help="expert check in every CLIP-RPN derain node (or in-process): two streak experts per image, "
                        "the one that leaves clearly less rain kept (about 3x slower)")
    b.add_argument("--format", default="same", choices=["same", "png", "jpg", "webp", "tif"],
                   help="output format: 'same' keeps each input's name and format (default)")
    b.add_argument("--report", help="report file, .json or .csv (default OUTPUT/batch_report.json)")
    b.add_argument("--checkpoint", help="in-process: CLIP-RPN .safetensors (default: the shipped model)")
    b.add_argument("--clip", help="in-process: CLIP weights for perception")
    b.add_argument("--device", default="auto", help="in-process: auto, cpu, cuda, mps")
    b.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    b.add_argument("--tile", type=int_in(MIN_TILE, MAX_TILE, zero_ok=True), default=0,
                   help=f"in-process: tile size, 0 or {MIN_TILE}..{MAX_TILE} (0: automatic)")
    b.add_argument("--threads", type=int_in(1, 1024, zero_ok=True), default=0,
                   help="in-process: CPU threads (0: torch default)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=cmd_batch)
    return b


def _positive_seconds(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return v


def cmd_batch(args) -> int:
    """Exit codes (as every cliprpn command): 0 all images done or skipped, 1 nothing succeeded, 2 bad command
    line or workflow (nothing sent), 3 some images failed/bad, 130 Ctrl-C."""
    out = Path(args.output)
    report = Path(args.report) if args.report else out / "batch_report.json"
    if not args.server:
        from ..inference import DeviceError, resolve_device
        try:
            resolve_device(args.device)
        except DeviceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    jobs = make_jobs(args.inputs, out, args.format)
    from ..runfiles import PlanError, check_in_place, check_output_dir
    try:
        mine = [j for j in jobs if j.dst is not None]
        check_in_place(args.inputs, [j.src for j in mine], [[j.dst] for j in mine], out, in_place=args.in_place,
                       extra={"--report": report})
        if mine:
            check_output_dir(out)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = (lambda m: print(m, file=sys.stderr))
    meta = {"mode": "servers" if args.server else "in-process", "expert_check": bool(args.check)}
    backends: list[Backend] = []
    if not any(j.status == "pending" for j in jobs):
        pass
    elif args.server:
        try:
            wf, origin = load_workflow(args.workflow)
            if args.check:
                wf = set_expert_check(wf)
            image_node = find_image_node(wf, args.image_node)
            output_node = find_output_node(wf, args.output_node)
        except WorkflowError as e:
            log(f"error: workflow: {e}")
            for j in jobs:
                if j.status == "pending":
                    j.status, j.error = "error", f"workflow: {e}"
            write_report(report, jobs, {"images": len(jobs), "counts": {"error": len(jobs)}}, meta)
            log(f"nothing sent; report: {report}")
            return 2
        meta.update(workflow=origin, image_node=image_node, output_node=output_node)
        tag = uuid.uuid4().hex[:8]
        for url in dict.fromkeys(normalize_url(u) for u in args.server):
            backends.append(ComfyBackend(url, wf, image_node, output_node, slots=args.depth, timeout=args.timeout,
                                         use_ws=not args.no_websocket, run_tag=tag, pattern=args.pattern))
        for b in backends:
            if not b.ping():
                b.alive, b.dead_since = False, time.monotonic()
                log(f"warning: {b.name} does not answer (will retry it while the batch runs)")
    else:
        try:
            lb = LocalBackend(args.checkpoint, args.device, args.dtype, args.threads, args.tile, args.clip,
                              check=args.check)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except (OSError, ValueError, RuntimeError) as e:
            log(f"error: cannot load the model: {e}")
            return 1
        backends.append(lb)
        meta.update(checkpoint=str(lb.ckpt))
    runner = BatchRunner(jobs, backends, retries=args.retries, overwrite=args.overwrite, server_wait=args.server_wait,
                         progress=not args.quiet, log=log)
    import signal

    def _term(*_):
        raise KeyboardInterrupt  # `kill PID` stops as cleanly as Ctrl-C
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _term) if main else None
    try:
        summary = runner.run()
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
    write_report(report, jobs, summary, meta)
    c = summary["counts"]
    ok = c.get("done", 0) + c.get("skipped", 0)
    bad = c.get("failed", 0) + c.get("error", 0) + c.get("not-run", 0)
    log(f"{c.get('done', 0)} derained, {c.get('skipped', 0)} skipped (already done), {c.get('failed', 0)} failed, "
        f"{c.get('error', 0)} bad input" + (f", {c.get('not-run', 0)} not run" if c.get("not-run") else "")
        + (f", {c.get('interrupted', 0)} left for a rerun" if runner.interrupted else "")
        + f" in {summary['wall_seconds']:.1f}s; report: {report}")
    for j in jobs:
        if j.status in ("failed", "error", "not-run"):
            log(f"  {j.status}: {j.error if str(j.src) in j.error else f'{j.src}: {j.error}'}")
    if runner.interrupted:
        return 130
    return 0 if not bad else (1 if not ok else 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cliprpn")
    add_batch_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(["batch", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
