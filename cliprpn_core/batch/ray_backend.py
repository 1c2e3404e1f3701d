"""`cliprpn batch --backend ray`: the same jobs, resume and report on a Ray cluster (Ray Data).

The driver plans exactly as the other backends (make_jobs, the same collision / in-place checks, then
``plan_pending``), and hands Ray Data a dataset of the pending jobs' *paths*, never their pixels: every node must
see the inputs and the output folder at the same absolute paths (one machine, or a filesystem every node mounts
alike, such as NFS). ``map_batches`` runs :class:`DerainActor` on a fixed pool of actors; each loads the model
once (a ``LocalBackend``: the in-process code path, so an output is the same bytes as in-process) and writes its
outputs itself, atomically (temp file + rename). Each image comes back as a status row; the driver streams them
(progress bar, the report rewritten as they arrive) and keeps one terminal row per job, so a task that Ray runs
again (an actor lost with its node) rewrites the same file and is still reported once.

Ray is optional (``pip install clip-rpn[ray]``): nothing here imports it until a Ray run starts.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from ..runfiles import clean_partials, output_complete
from .errors import BadInput, BatchError
from .inputs import Job, write_output
from .scheduler import plan_pending, summarize

RAY_MISSING = "Ray is not installed: pip install clip-rpn[ray]"
TERMINAL = ("done", "failed", "error")
ROW_FIELDS = ("index", "status", "error", "seconds", "exec_seconds", "attempts", "pattern", "routing",
              "perceived_by", "worker")
CONTROL_PREFIX = ".cliprpn-ray-"
STOP_WAIT_MAX = 120.0  # seconds Ctrl-C waits at most for the images being derained
MAX_ROWS_PER_BLOCK = 32  # a block is the unit Ray hands an actor: small enough for progress and balance


class RayUnavailable(RuntimeError):
    """Ray cannot be used for this run (not installed, no cluster at the address, no resources): a usage error."""


def import_ray():
    """``ray`` with Ray Data, or RayUnavailable saying how to install it."""
    try:
        import ray
        import ray.data  # ray without the [data] extra has no working ray.data
    except ImportError as e:
        raise RayUnavailable(RAY_MISSING) from e
    return ray


@dataclass(frozen=True)
class WorkerSettings:
    """What every actor needs to load and run the model (LocalBackend's arguments) and where it may write."""
    checkpoint: str | None = None
    clip: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 1
    tile: int = 0
    check: bool = False
    verify: bool = True
    retries: int = 2
    out_dirs: tuple = ()
    control: str = ""  # path prefix of this run's control files: PREFIX.run and PREFIX.stop (from the driver),
    # PREFIX.busy-NODE-PID (actors)


# -- the worker side --------------------------------------------------------------------------------------
def status_row(index, status: str, error: str = "", worker: str = "") -> dict:
    """A status row (ROW_FIELDS) with nothing measured yet."""
    return {"index": int(index), "status": status, "error": error, "seconds": math.nan, "exec_seconds": math.nan,
            "attempts": 0, "pattern": "", "routing": "", "perceived_by": "", "worker": worker}


def run_one(backend, index: int, src: str, dst: str, retries: int = 2, worker: str = "") -> dict:
    """Derain one image with ``backend`` (a LocalBackend) and write it atomically; its status row. The image's
    own problems never raise: bad input -> ``error``, other failures retried ``retries`` times -> ``failed``."""
    job = Job(int(index), Path(src), Path(dst))
    row = status_row(index, "failed", worker=worker)
    while True:
        try:
            out = backend.process(job)
        except BadInput as e:
            row.update(status="error", error=str(e))
            return row
        except Exception as e:  # noqa: BLE001 - reported per image, the batch goes on
            row["attempts"] += 1
            row["error"] = str(e) if isinstance(e, BatchError) else f"{type(e).__name__}: {e}"
            if getattr(e, "retryable", True) and row["attempts"] <= retries:
                continue
            return row
        try:
            write_output(out, job.dst)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"cannot write {job.dst}: {e}"
            return row
        row.update(status="done", error="", seconds=out.seconds, exec_seconds=_nan(out.exec_seconds),
                   pattern=out.pattern or "", routing=json.dumps(out.routing) if out.routing else "",
                   perceived_by=out.perceived_by or "")
        return row


def _nan(v):
    return math.nan if v is None else float(v)


class DerainActor:
    """One Ray actor: loads the model once, then derains the rows Ray hands it (one image per call) and answers
    a status row for each. Refuses to start on a node that does not see the output folder (no shared filesystem)."""

    def __init__(self, settings: WorkerSettings):
        import ray

        from .backends import LocalBackend
        node = ray.get_runtime_context().get_node_id()
        for d in settings.out_dirs:
            if not os.path.isdir(d):
                raise RuntimeError(f"the output folder {d} is not visible on Ray node {node[:8]}: --backend ray needs "
                                   "the inputs and -o on a filesystem every node mounts at the same path")
        self.settings = settings
        self.backend = LocalBackend(settings.checkpoint, settings.device, settings.dtype, settings.threads,
                                    settings.tile, settings.clip, check=settings.check,
                                    verify=settings.verify)
        self.worker = f"ray:{node[:8]}/{os.getpid()}"
        c = settings.control
        self.run, self.stop = c + ".run", c + ".stop"
        self.busy = f"{c}.busy-{node[:8]}-{os.getpid()}" if c else ""

    def __call__(self, batch: dict) -> dict:
        rows = []
        for index, src, dst in zip(batch["index"], batch["src"], batch["dst"]):
            rows.append(self._one(index, str(src), str(dst)))
        return {k: [r[k] for r in rows] for k in ROW_FIELDS}

    def _one(self, index, src: str, dst: str) -> dict:
        """Marked busy *before* looking at the driver's flags, so a driver that raised the stop flag and then saw
        no busy marker knows no image is being written (Ctrl-C then leaves no temp file behind). An image starts only
        while the run flag is there: an actor that outlives its driver (Ray ends it a little later) starts nothing
        once the driver has cleaned up."""
        if not self.busy:
            return run_one(self.backend, index, src, dst, self.settings.retries, self.worker)
        Path(self.busy).touch()
        try:
            if os.path.exists(self.stop) or not os.path.exists(self.run):
                return status_row(index, "interrupted", "stopped before it started", self.worker)
            return run_one(self.backend, index, src, dst, self.settings.retries, self.worker)
        finally:
            Path(self.busy).unlink(missing_ok=True)


# -- the driver side ---------------------------------------------------------------------------------------
class RowCollector:
    """Applies status rows to their jobs, each job once: a later copy of a finished job's row (a task Ray ran
    again) is counted in ``duplicates`` and dropped, except that ``done`` replaces an earlier failure (the file
    is there then, and the report must say so)."""

    def __init__(self, jobs: list[Job]):
        self.by_index = {j.index: j for j in jobs}
        self.duplicates = 0
        self.per_worker: Counter = Counter()

    def take(self, row: dict) -> tuple[Job | None, bool]:
        """(the job the row finished or None, whether the job is newly finished)."""
        job = self.by_index.get(int(row["index"]))
        status = str(row["status"])
        if job is None or status not in TERMINAL:
            return None, False
        if job.status == "done" or (job.status in TERMINAL and status != "done"):
            self.duplicates += 1
            return None, False
        new = job.status not in TERMINAL
        if not new:
            self.duplicates += 1
        job.status, job.error, job.server = status, str(row["error"] or ""), str(row["worker"] or "")
        job.attempts = int(row["attempts"])
        job.seconds, job.exec_seconds = _num(row["seconds"]), _num(row["exec_seconds"])
        job.pattern, job.perceived_by = row["pattern"] or None, row["perceived_by"] or None
        job.routing = json.loads(row["routing"]) if row["routing"] else None
        self.per_worker[job.server] += status == "done"
        return job, new


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def reconcile_stopped(jobs: list[Job], since_ns: int) -> int:
    """After a stop: a job without a row whose output is complete and was written by this run (mtime after
    ``since_ns``) is ``done``: an actor finished it as the run stopped. How many were."""
    n = 0
    for j in jobs:
        if j.status in ("running", "pending", "interrupted") and j.dst is not None and j.dst.exists():
            try:
                fresh = j.dst.stat().st_mtime_ns >= since_ns
            except OSError:
                continue
            if fresh and output_complete(j.dst):
                j.status, j.error, j.server = "done", "", j.server or "ray"
                n += 1
    return n


def block_layout(pending: int, workers: int) -> tuple[int, int]:
    """(rows per block, blocks). A block's rows come back together when its task ends, so blocks are small: at
    least 16 per worker and at most MAX_ROWS_PER_BLOCK rows (progress moves, the last blocks leave no worker idle
    for long, and a million images are ~31k tasks, not a million)."""
    rows = max(1, min(MAX_ROWS_PER_BLOCK, pending // max(1, workers * 16)))
    return rows, math.ceil(pending / rows)


class RayRunner:
    """Runs the pending jobs on Ray (see the module): connect (or start Ray here), plan, stream the status rows,
    stop cleanly. Same interface as BatchRunner for ``cmd_batch``: ``run() -> summary``, ``interrupted``."""

    def __init__(self, jobs: list[Job], settings: WorkerSettings, address: str | None = None, workers: int = 0,
                 overwrite: bool = False, progress: bool = True, log=None, on_update=None,
                 update_interval: float = 5.0, on_done=None):
        self.jobs, self.settings, self.address, self.want_workers = jobs, settings, address, workers
        self.overwrite, self.show_progress = overwrite, progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.on_update = on_update  # called with the runner as rows arrive (the report), time-throttled
        self.update_interval = update_interval
        self.on_done = on_done  # called with (job, runner) as each job finishes, as BatchRunner's
        self.collector = RowCollector(jobs)
        self.interrupted = False
        self.wall = 0.0
        self.workers = 0
        self.meta: dict = {}
        self.bar = None
        self.bad = 0
        self._last_update = -math.inf  # the first row writes the report
        self._update_cost = 0.0

    def run(self) -> dict:
        t0, since = time.monotonic(), time.time_ns()
        pending = plan_pending(self.jobs, self.overwrite, self.log)
        try:
            if pending:
                self._run_on_ray(pending, since)
        finally:
            self.wall = time.monotonic() - t0
        return self.summary()

    def summary(self) -> dict:
        s = summarize(self.jobs, self.wall, self.interrupted,
                      {w: {"done": n, "alive": True} for w, n in sorted(self.collector.per_worker.items()) if w})
        if self.collector.duplicates:
            s["duplicate_rows_dropped"] = self.collector.duplicates
        return s

    # -- connecting -----------------------------------------------------------------------------------
    def _connect(self, ray) -> bool:
        """Join the cluster at --ray-address, or start Ray on this machine; True when started here. ray.init
        installs its own SIGTERM handler: the caller's (Ctrl-C-like stop) is put back."""
        if ray.is_initialized():
            return False
        import logging
        term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        kw = {"logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if self.address:
                ray.init(address=self.address, **kw)
            else:  # "local": a new instance even when RAY_ADDRESS or a `ray start` cluster is about
                ray.init(address="local", include_dashboard=False, **kw)
        except Exception as e:  # ray raises ConnectionError, ValueError, RuntimeError, ...
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise RayUnavailable(f"cannot connect to {where} ({_first_line(e)}); check --ray-address "
                                 "(auto, host:port or ray://host:10001)") from e
        finally:
            if term is not None:
                signal.signal(signal.SIGTERM, term)
        return not self.address

    def _resources(self, ray, pending: int) -> tuple[WorkerSettings, int, dict]:
        """Settings with the device decided, the number of workers and each worker's Ray resources."""
        res = ray.cluster_resources()
        s = self.settings
        if s.device == "auto":
            s = replace(s, device="cuda" if res.get("GPU", 0) >= 1 else "cpu")
        if s.device == "cuda":
            have, need = int(res.get("GPU", 0)), {"num_cpus": 1, "num_gpus": 1}
            if not have:
                raise RayUnavailable("--device cuda: the Ray cluster has no GPU; use --device cpu or auto")
        else:
            have, need = int(res.get("CPU", 0) // s.threads), {"num_cpus": s.threads}
            if not have:
                raise RayUnavailable(f"the Ray cluster has {res.get('CPU', 0):g} CPUs, fewer than --threads "
                                     f"{s.threads} for one worker; lower --threads")
        n = min(self.want_workers or have, pending)  # an idle actor only costs a model load
        if n > have:
            self.log(f"warning: --ray-workers {n} needs more than the cluster has now (room for {have}); "
                     "the extra workers wait for resources")
        return s, n, need

    # -- running --------------------------------------------------------------------------------------
    def _run_on_ray(self, pending: list[Job], since: int) -> None:
        ray = import_ray()
        started, control = False, None
        try:
            started = self._connect(ray)
            settings, self.workers, need = self._resources(ray, len(pending))
            # the Ctrl-C handshake with the actors, through the filesystem they share with us (see _stop)
            control = clean_control_files(pending[0].dst.parent) / f"{CONTROL_PREFIX}{uuid.uuid4().hex[:12]}"
            settings = replace(settings, control=str(control.absolute()),
                               out_dirs=tuple(sorted({str(j.dst.parent.absolute()) for j in pending})))
            Path(str(control) + ".run").touch()
            self.meta = {"ray_address": self.address or "local", "ray_workers": self.workers,
                         "device": settings.device, "threads_per_worker": settings.threads}
            ds = self._dataset(ray, pending, settings, need)
            self._stream(ds, pending)
        except KeyboardInterrupt:
            self._stop(ray, started, control, since)
            started = False
        except RayUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - a worker that cannot start, a lost cluster: the rest is not run
            why = _first_line(e)
            self.log(f"error: the Ray run stopped: {why}")
            for j in pending:
                if j.status not in TERMINAL:
                    j.status, j.error = "not-run", f"Ray run stopped: {why}"
        finally:
            if self.bar is not None:
                self.bar.close()
            if started:
                ray.shutdown()
            if control is not None:
                # actors start no image from now on; one that outlived a stop finishes the image it writes first
                Path(str(control) + ".run").unlink(missing_ok=True)
                wait_not_busy(control, timeout=10.0)
                clean_control_files(control.parent)
            for d in {j.dst.parent for j in pending}:  # a worker killed mid-write (then retried) left its temp file
                clean_partials(d)

    def _dataset(self, ray, pending: list[Job], settings: WorkerSettings, need: dict):
        import logging
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours is the batch's own bar
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its failures reach us as exceptions: one line each
        items = [{"index": j.index, "src": str(j.src.absolute()), "dst": str(j.dst.absolute())} for j in pending]
        _, blocks = block_layout(len(items), self.workers)
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        return ds.map_batches(DerainActor, fn_constructor_kwargs={"settings": settings}, batch_size=1,
                              batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=self.workers), **need)

    def _stream(self, ds, pending: list[Job]) -> None:
        for j in pending:
            j.status = "running"
        if self.show_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=len(self.jobs), initial=len(self.jobs) - len(pending), desc="batch", unit="img",
                            dynamic_ncols=True)
        for row in ds.iter_rows():
            job, new = self.collector.take(row)
            if job is not None and new:
                self._finished(job)
            self._maybe_update()
        for j in pending:  # every row came back: anything without one was lost
            if j.status not in TERMINAL:
                j.status, j.error = "failed", "no status came back from the Ray workers"

    def _finished(self, job: Job) -> None:
        if self.on_done:
            self.on_done(job, self)
        if self.bar is None:
            return
        if job.status != "done":
            self.bad += 1  # counted, not summed over the jobs: a run may have millions
            self.bar.write(f"{'bad input' if job.status == 'error' else 'failed'}: {job.error}", file=sys.stderr)
        self.bar.update(1)
        self.bar.set_postfix_str(f"workers:{len(self.collector.per_worker)}"
                                 + (f" failed/bad:{self.bad}" if self.bad else ""), refresh=False)

    def _maybe_update(self) -> None:
        """Call on_update (the report) at most every ``update_interval`` s and never more than ~5% of the time."""
        now = time.monotonic()
        if self.on_update is None or now - self._last_update < max(self.update_interval, 20 * self._update_cost):
            return
        self.on_update(self)
        self._last_update = time.monotonic()
        self._update_cost = self._last_update - now

    def _stop(self, ray, started: bool, control: Path | None, since: int) -> None:
        """Ctrl-C: raise the stop flag (actors skip what they have not started), wait for the images being derained
        to be written, stop Ray (a cluster we joined ends our actors when this driver leaves), remove temp files
        and mark what finished."""
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a second Ctrl-C must not skip this
        try:
            self.interrupted = True
            if control is not None:
                Path(str(control) + ".stop").touch()
                slowest = max((j.seconds or 0.0 for j in self.jobs if j.status == "done"), default=0.0)
                if not wait_not_busy(control, timeout=min(STOP_WAIT_MAX, 10.0 + 3 * slowest)):
                    self.log("warning: a Ray worker did not finish its image in time; stopping it anyway")
            if started:
                ray.shutdown()
            for d in {j.dst.parent for j in self.jobs if j.dst is not None}:
                clean_partials(d)
            late = reconcile_stopped(self.jobs, since)
            for j in self.jobs:
                if j.status in ("pending", "running"):
                    j.status, j.error = "interrupted", "stopped before it finished"
            if late:
                self.log(f"{late} image(s) finished as the run stopped")
        finally:
            if main:
                signal.signal(signal.SIGINT, old)


def clean_control_files(folder: Path) -> Path:
    """Remove the control files of runs that ended (a killed driver leaves them); ``folder``."""
    for p in Path(folder).glob(CONTROL_PREFIX + "*"):
        p.unlink(missing_ok=True)
    return Path(folder)


def wait_not_busy(control: Path, timeout: float) -> bool:
    """Wait until no actor of the run marks itself busy (writing an image); False on timeout. A marker whose
    process is gone from this machine (an actor killed mid-image) does not count."""
    deadline = time.monotonic() + timeout
    while [p for p in control.parent.glob(control.name + ".busy-*") if _may_be_alive(p)]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _may_be_alive(marker: Path) -> bool:
    """False when the busy marker's process (its name ends in -PID) no longer exists on this machine; True when it
    does or cannot be told (another node's process: the same number may be alive here)."""
    try:
        pid = int(marker.name.rsplit("-", 1)[1])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, IndexError, OSError):  # not a PID, or a process we may not signal: count it as alive
        return True
    return True


def _first_line(e: BaseException) -> str:
    """A one-line reason from Ray's exceptions (which carry whole remote tracebacks)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception")) and ":" in ln]
    text = errs[-1] if errs else (lines[0] if lines else type(e).__name__)
    return text[:300]
