"""The scheduler of `cliprpn batch` (``BatchRunner``: dispatch, retries, server loss, resume, stop)
and its report (``write_report``: JSON or CSV)."""
from __future__ import annotations

import csv
import json
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path

from ..runfiles import clean_partials, output_complete
from .backends import Backend, pick_backend
from .errors import BadInput, BatchError, ServerUnreachable
from .inputs import Job, atomic_write, write_output


class BatchRunner:
    """Dispatches jobs to backends from one thread; workers run ``backend.process`` in daemon
    threads and post results back. Only this thread writes outputs and changes job state, and the
    first successful result for a job wins, so every image is written exactly once."""

    def __init__(self, jobs: list[Job], backends: list[Backend], retries: int = 2, overwrite: bool = False,
                 server_wait: float = 60.0, depth_interval: float = 0.5, probe_interval: float = 2.0,
                 progress: bool = True, log=None, stop: threading.Event | None = None, on_done=None):
        self.jobs, self.backends = jobs, backends
        self.retries, self.overwrite, self.server_wait = retries, overwrite, server_wait
        self.depth_interval, self.probe_interval = depth_interval, probe_interval
        self.show_progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.stop = stop or threading.Event()
        self.on_done = on_done
        self.results: queue.Queue = queue.Queue()
        self.inflight: dict[int, tuple[Job, Backend, int]] = {}
        self.pending: deque[Job] = deque()
        self.interrupted = False
        self.wall = 0.0
        self.bar = None
        self._live = None  # (image name, value, max) of the latest websocket progress message
        self._shown = None
        for b in backends:
            if getattr(b, "progress", 0) is None:
                b.progress = self._on_progress

    def _on_progress(self, job, value, maximum):
        self._live = (job.src.name, value, maximum)

    # -- bookkeeping ----------------------------------------------------------------------
    def _prepare(self):
        self.pending.extend(plan_pending(self.jobs, self.overwrite, self.log))

    def _finish(self, job: Job):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self._postfix(), refresh=False)
        if self.on_done:
            self.on_done(job, self)

    def _postfix(self):
        parts = [f"{_short_name(b.name)}:{b.done}{'' if b.alive else '(down)'}" for b in self.backends]
        bad = sum(j.status in ("failed", "error") for j in self.jobs)
        live = self._live
        return " ".join(parts) + (f" failed/bad:{bad}" if bad else "") + (
            f" | {live[0]} {live[1]}/{live[2]}" if live else "")

    def _dispatch(self, job: Job, b: Backend):
        job.status, job.server = "running", b.name
        token = job.token
        b.ours += 1
        self.inflight[job.index] = (job, b, token)

        def work():
            try:
                out = b.process(job)
                self.results.put(("ok", job, b, token, out))
            except BadInput as e:
                self.results.put(("bad", job, b, token, e))
            except BatchError as e:
                self.results.put(("error", job, b, token, e))
            except (ServerUnreachable, ConnectionError, TimeoutError) as e:
                self.results.put(("conn", job, b, token, e))
            except OSError as e:  # reading the input file
                self.results.put(("bad" if not job.src.exists() else "error", job, b, token, e))
            except Exception as e:  # noqa: BLE001 - reported per image, the batch goes on
                self.results.put(("error", job, b, token, BatchError(f"{type(e).__name__}: {e}")))

        threading.Thread(target=work, daemon=True, name=f"batch-{job.index}").start()

    def _release(self, job: Job, b: Backend, token: int) -> bool:
        """Drop the in-flight record; True if this result is the current attempt."""
        cur = self.inflight.get(job.index)
        if cur is not None and cur[1] is b and cur[2] == token:
            del self.inflight[job.index]
            b.ours -= 1
            return True
        return False

    def _server_down(self, b: Backend, why: str):
        if not b.alive:
            return
        b.alive, b.dead_since, b.last_probe = False, time.monotonic(), time.monotonic()
        moved = [(j, t) for (j, bb, t) in list(self.inflight.values()) if bb is b]
        for j, t in moved:
            self._release(j, b, t)
            j.token += 1
            j.requeued += 1
            if j.requeued > self.retries + 2:
                j.status, j.error = "failed", f"lost {j.requeued} times with its server ({why})"
                self._finish(j)
            else:
                j.status = "pending"
                self.pending.appendleft(j)
        b.foreign = 0
        self.log(f"server {b.name} is unreachable ({why}); {len(moved)} image(s) re-queued")

    def _refresh(self):
        now = time.monotonic()
        for b in self.backends:
            if b.alive and now - b.last_depth >= self.depth_interval:
                b.last_depth = now
                try:
                    b.refresh_depth()
                except (ServerUnreachable, ConnectionError, OSError) as e:
                    if not b.ping():
                        self._server_down(b, str(e))
                except BatchError:
                    pass
            elif not b.alive and now - b.last_probe >= self.probe_interval:
                b.last_probe = now
                if b.ping():
                    b.alive, b.dead_since, b.last_depth = True, None, 0.0
                    self.log(f"server {b.name} is back")

    def _handle(self, kind, job: Job, b: Backend, token: int, payload):
        current = self._release(job, b, token)
        if job.status in ("done", "failed", "error", "interrupted"):
            return  # somebody else finished it first (or the batch was stopped)
        if kind == "ok":
            if not current and job.status == "pending":
                self.pending.remove(job)  # a stale copy finished first: take it, drop the re-queued one
            elif not current:
                for k, (j, bb, t) in list(self.inflight.items()):
                    if j is job:
                        self._release(j, bb, t)
            try:
                write_output(payload, job.dst)
            except Exception as e:  # noqa: BLE001
                job.status, job.error = "failed", f"cannot write {job.dst}: {e}"
                self._finish(job)
                return
            job.status, job.server, job.error = "done", b.name, ""
            job.seconds, job.exec_seconds = payload.seconds, payload.exec_seconds
            job.pattern, job.routing, job.perceived_by = payload.pattern, payload.routing, payload.perceived_by
            job.token += 1  # any other copy still running is now stale
            b.done += 1
            self._finish(job)
            return
        if not current:
            return  # stale failure of an attempt already re-queued
        if kind == "conn" and not b.ping():
            job.token += 1
            job.status = "pending"
            job.requeued += 1
            self.pending.appendleft(job)
            self._server_down(b, str(payload))
            return
        job.server = b.name
        if kind == "bad":
            job.status, job.error = "error", str(payload)
            if self.bar is not None:
                self.bar.write(f"bad input: {payload}", file=sys.stderr)
            self._finish(job)
            return
        job.attempts += 1
        job.failed_on.add(b.name)
        job.error = str(payload)
        retryable = getattr(payload, "retryable", True)
        if retryable and job.attempts <= self.retries:
            job.token += 1
            job.status = "pending"
            self.pending.append(job)
        else:
            job.status = "failed"
            if self.bar is not None:
                self.bar.write(f"failed: {job.src} ({job.error})", file=sys.stderr)
            self._finish(job)

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.monotonic()
        self._prepare()
        todo = len(self.pending)
        if self.show_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=len(self.jobs), initial=len(self.jobs) - todo, desc="batch", unit="img",
                            dynamic_ncols=True)
        try:
            while (self.pending or self.inflight) and not self.stop.is_set():
                self._refresh()
                while self.pending:
                    b = pick_backend(self.pending[0], self.backends)
                    if b is None:
                        break
                    self._dispatch(self.pending.popleft(), b)
                if self.pending and not self.inflight and not any(b.alive for b in self.backends):
                    since = min(b.dead_since or time.monotonic() for b in self.backends)
                    if time.monotonic() - since > self.server_wait:
                        for j in self.pending:
                            j.status, j.error = "not-run", f"no server reachable for {self.server_wait:.0f}s"
                        self.pending.clear()
                        break
                if self.bar is not None and self._live != self._shown:
                    self._shown = self._live
                    self.bar.set_postfix_str(self._postfix())
                try:
                    item = self.results.get(timeout=0.1)
                except queue.Empty:
                    continue
                self._handle(*item)
                while True:  # drain what else arrived
                    try:
                        self._handle(*self.results.get_nowait())
                    except queue.Empty:
                        break
        except KeyboardInterrupt:
            self.stop.set()
        finally:
            if self.stop.is_set() and (self.pending or self.inflight):
                self.interrupted = True
                self._stop_all()
            if self.bar is not None:
                self.bar.close()
            self.wall = time.monotonic() - t0
        return self.summary()

    def _stop_all(self):
        import signal
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a second Ctrl-C must not skip the report
        try:
            self._cancel_all()
        finally:
            if main:
                signal.signal(signal.SIGINT, old)

    def _cancel_all(self):
        for b in self.backends:
            if b.alive and b.ours:
                try:
                    b.cancel()
                except Exception:  # noqa: BLE001, S110 - best effort on the way out
                    pass
        for j, b, t in list(self.inflight.values()):
            self._release(j, b, t)
            j.status, j.error = "interrupted", "stopped before it finished"
        self.pending.clear()
        for j in self.jobs:  # incl. one whose result was being written when the signal came
            if j.status in ("pending", "running"):
                j.status, j.error = "interrupted", "stopped before it finished" if j.server else "stopped before it started"

    def summary(self) -> dict:
        return summarize(self.jobs, self.wall, self.interrupted,
                         {b.name: {"done": b.done, "alive": b.alive} for b in self.backends})


def plan_pending(jobs: list[Job], overwrite: bool, log) -> list[Job]:
    """The jobs still to run, in order (every backend plans this way, so a rerun resumes the same on each):
    output folders made and rid of the temp files a killed run left; a complete output is ``skipped``
    unless ``overwrite``, an incomplete or unreadable one redone."""
    for d in {j.dst.parent for j in jobs if j.dst is not None}:
        d.mkdir(parents=True, exist_ok=True)
        n = clean_partials(d)
        if n:
            log(f"removed {n} partial file(s) an interrupted run left in {d}")
    pending = []
    for j in jobs:
        if j.status != "pending":
            continue
        if not overwrite and j.dst.exists():
            if output_complete(j.dst):
                j.status, j.error = "skipped", "output exists (use --overwrite to redo)"
                continue
            log(f"{j.dst} is incomplete or unreadable: redoing it")
        pending.append(j)
    return pending


def summarize(jobs: list[Job], wall: float, interrupted: bool, servers: dict) -> dict:
    """The report's summary: counts by status, throughput, and ``servers`` (name -> {done, alive})."""
    counts = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    done = counts.get("done", 0)
    return {"images": len(jobs), "counts": counts, "wall_seconds": round(wall, 3),
            "images_per_minute": round(60.0 * done / wall, 2) if wall > 0 and done else 0.0,
            "interrupted": interrupted, "servers": servers}


def _short_name(name: str) -> str:
    return name.replace("http://", "").replace("https://", "")


# ---------------------------------------------------------------------------------------------
# report
REPORT_FIELDS = ["input", "output", "status", "server", "seconds", "exec_seconds", "attempts", "requeued",
                 "pattern", "routing", "perceived_by", "error"]


def write_report(path: Path, jobs: list[Job], summary: dict, meta: dict | None = None) -> None:
    path = Path(path)
    rows = [j.row() for j in jobs]
    if path.suffix.lower() == ".csv":
        def w(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                cw = csv.DictWriter(f, fieldnames=REPORT_FIELDS)
                cw.writeheader()
                for r in rows:
                    cw.writerow({k: json.dumps(v) if isinstance(v, dict) else ("" if v is None else v)
                                 for k, v in r.items()})
    else:
        doc = {"summary": summary, **(meta or {}), "images": rows}

        def w(tmp):
            Path(tmp).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    atomic_write(path, w)
