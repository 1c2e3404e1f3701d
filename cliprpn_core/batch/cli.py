"""The `cliprpn batch` command line: its argument parser (registered by ``cliprpn_core.cli``),
``cmd_batch`` and ``main`` (``python -m cliprpn_core.batch``)."""
from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

from .. import default_model_path
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
    set_verify_light,
)


def add_batch_parser(subparsers):
    from ..cli import EXIT_CODES, MAX_TILE, MIN_TILE, int_in
    b = subparsers.add_parser(
        "batch", help="derain many images in-process, through ComfyUI servers or on a Ray cluster (resumable)",
        description="Derain a folder, glob or list file of images. With --server the images go through running "
                    "ComfyUI servers (upload, queue an API workflow, download); with --backend ray they run on a "
                    "Ray cluster (one model per worker; every node must see the inputs and -o at the same paths); "
                    "otherwise the model runs here. Finished outputs are skipped on a rerun; Ctrl-C stops cleanly.",
        epilog=EXIT_CODES)
    b.add_argument("inputs", nargs="+", help="folders, globs ('shots/*.jpg') and/or list files (.txt/.lst, one path a line)")
    b.add_argument("-o", "--output", required=True, help="output folder (results keep the input file names)")
    b.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="where the model runs: in-process (here), servers (the --server ComfyUIs) or ray (a Ray "
                        "cluster; pip install clip-rpn[ray]). Default auto: servers when --server is given")
    b.add_argument("--server", action="append", default=[], metavar="URL",
                   help="ComfyUI server (http://host:port); repeat to share the work between servers")
    b.add_argument("--ray-address", metavar="ADDR",
                   help="ray: a running cluster (auto, host:port or ray://host:10001); default: start Ray here")
    b.add_argument("--ray-workers", type=int_in(1, 100000, zero_ok=True), default=0, metavar="N",
                   help="ray: model workers (Ray actors, one model each); 0: one per GPU with --device cuda, "
                        "else one per --threads CPUs of the cluster (default)")
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
    b.add_argument("--no-verify", action="store_true",
                   help="turn the light routing's verification off in every CLIP-RPN derain node (or in-process): "
                        "the light-streaks network keeps every image routed to it, as with `cliprpn derain "
                        "--no-verify` (for photos with little or no rain)")
    b.add_argument("--format", default="same", choices=["same", "png", "jpg", "webp", "tif"],
                   help="output format: 'same' keeps each input's name and format (default)")
    b.add_argument("--report", help="report file, .json or .csv (default OUTPUT/batch_report.json)")
    b.add_argument("--checkpoint", help="in-process / ray: CLIP-RPN .safetensors (default: the shipped model)")
    b.add_argument("--clip", help="in-process / ray: CLIP weights for perception")
    b.add_argument("--device", default="auto",
                   help="in-process: auto, cpu, cuda, mps; ray: auto, cpu or cuda (a whole GPU per worker)")
    b.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    b.add_argument("--tile", type=int_in(MIN_TILE, MAX_TILE, zero_ok=True), default=0,
                   help=f"in-process / ray: tile size, 0 or {MIN_TILE}..{MAX_TILE} (0: automatic)")
    b.add_argument("--threads", type=int_in(1, 1024, zero_ok=True), default=0,
                   help="in-process: CPU threads (0: torch default); ray: per worker (0: 1)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=cmd_batch)
    return b


BACKENDS = ["auto", "in-process", "servers", "ray"]


def backend_of(args) -> str:
    """--backend with auto decided: servers when --server is given, else in-process."""
    if args.backend != "auto":
        return args.backend
    return "servers" if args.server else "in-process"


def backend_problem(args, mode: str) -> str | None:
    """Why these options cannot run on ``mode`` (a usage error, nothing done), or None."""
    if mode == "servers" and not args.server:
        return "--backend servers needs at least one --server URL"
    if mode != "servers" and args.server:
        return f"--server is for the servers backend, not --backend {mode}; drop one of them"
    if mode != "ray" and (args.ray_address or args.ray_workers):
        return "--ray-address and --ray-workers are for --backend ray"
    if mode == "ray":
        if args.device not in ("auto", "cpu", "cuda"):
            return f"--backend ray runs on --device auto, cpu or cuda (each worker gets a whole GPU), not {args.device}"
        from .ray_backend import RayUnavailable, import_ray
        try:
            import_ray()
        except RayUnavailable as e:
            return str(e)
    elif mode == "in-process":
        from ..inference import DeviceError, resolve_device
        try:
            resolve_device(args.device)
        except DeviceError as e:
            return str(e)
    return None


def _ray_runner(args, jobs, log):
    """A RayRunner for the ray backend; paths are made absolute here (workers do not share our cwd)."""
    from .ray_backend import RayRunner, WorkerSettings

    def absolute(p):
        return str(Path(p).absolute()) if p else None
    settings = WorkerSettings(checkpoint=absolute(args.checkpoint), clip=absolute(args.clip), device=args.device,
                              dtype=args.dtype, threads=args.threads or 1, tile=args.tile, check=args.check,
                              verify=not args.no_verify, retries=args.retries)
    return RayRunner(jobs, settings, address=args.ray_address, workers=args.ray_workers, overwrite=args.overwrite,
                     progress=not args.quiet, log=log)


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
    mode = backend_of(args)
    problem = backend_problem(args, mode)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
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
    meta = {"mode": mode, "expert_check": bool(args.check), "verify_light": not args.no_verify}
    backends: list[Backend] = []
    if mode == "ray":
        runner = _ray_runner(args, jobs, log)
        meta.update(checkpoint=runner.settings.checkpoint or str(default_model_path()))
        from ..checkpoint import read_config
        try:  # its header, here: a bad file is one clear line, not a Ray traceback from every worker
            read_config(meta["checkpoint"])
        except (OSError, ValueError) as e:
            log(f"error: cannot load the model: {e}")
            return 1
        runner.on_update = lambda r: write_report(report, jobs, r.summary(), {**meta, **r.meta})  # hard-kill safe
        return _finish(runner, jobs, report, meta, log)
    if not any(j.status == "pending" for j in jobs):
        pass
    elif mode == "servers":
        try:
            wf, origin = load_workflow(args.workflow)
            if args.check:
                wf = set_expert_check(wf)
            if args.no_verify:
                wf = set_verify_light(wf, False)
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
                              check=args.check, verify=not args.no_verify)
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
    return _finish(runner, jobs, report, meta, log)


def _finish(runner, jobs, report, meta, log) -> int:
    """Run ``runner`` (BatchRunner or RayRunner; SIGTERM stops it like Ctrl-C), write the report, say what
    happened and return the exit code."""
    import signal

    from .ray_backend import RayUnavailable

    def _term(*_):
        raise KeyboardInterrupt  # `kill PID` stops as cleanly as Ctrl-C
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _term) if main else None
    try:
        summary = runner.run()
    except RayUnavailable as e:
        log(f"error: {e}")
        for j in jobs:
            if j.status in ("pending", "running"):
                j.status, j.error = "not-run", str(e)
        write_report(report, jobs, runner.summary(), meta)
        return 2
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
    write_report(report, jobs, summary, {**meta, **getattr(runner, "meta", {})})
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
