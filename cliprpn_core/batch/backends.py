"""Where `cliprpn batch` runs an image: ``LocalBackend`` (the core model in this process) or
``ComfyBackend`` (one ComfyUI server: upload, queue the workflow, follow it, download), and
``pick_backend``, the rule that chooses between them for the next job."""
from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

from .client import (
    ComfyClient,
    WebSocket,
    history_error,
    history_exec_seconds,
    history_state,
)
from .errors import BadInput, BatchError, ServerUnreachable
from .inputs import Job, Output, check_image_file, image_bytes_problem
from .workflow import (
    TEXT_TAP,
    add_pattern_taps,
    outputs_pattern,
    parse_pattern_text,
    parse_routing_text,
    rewrite_workflow,
)

UPLOAD_SUBFOLDER = "cliprpn_batch"


class Backend:
    """Runs one job at a time per slot. Subclasses: LocalBackend, ComfyBackend."""
    name = "backend"
    slots = 1

    def __init__(self):
        self.alive = True
        self.ours = 0  # our jobs in flight here
        self.foreign = 0  # other clients' prompts in its queue (remote only)
        self.done = 0
        self.dead_since = None
        self.last_probe = 0.0
        self.last_depth = 0.0

    def process(self, job: Job) -> Output:
        raise NotImplementedError

    def ping(self) -> bool:
        return True

    def refresh_depth(self) -> None:
        """Update ``foreign`` (queue entries that are not ours). Raises ServerUnreachable."""

    def cancel(self) -> None:
        """Stop our in-flight work (Ctrl-C)."""


class LocalBackend(Backend):
    """The core model in this process."""

    def __init__(self, checkpoint=None, device="auto", dtype="auto", threads=0, tile=0, clip=None, check=False,
                 verify=True):
        super().__init__()
        self.check, self.verify = bool(check), bool(verify)
        import torch

        from ..inference import DerainOptions, load_derainer
        if threads:
            torch.set_num_threads(threads)
        self.derainer, self.ckpt = load_derainer(checkpoint, clip, device=device, dtype=dtype)
        self.tile = tile or None
        self.options = DerainOptions(tile=self.tile, check=self.check, verify=self.verify)
        self.name = f"in-process:{self.derainer.device}"

    def process(self, job: Job) -> Output:
        from ..imageio import ImageReadError, read_image, to_uint8
        from ..patterns import EXPERTS, describe
        t0 = time.perf_counter()
        try:
            img = read_image(job.src)
        except ImageReadError as e:
            raise BadInput(str(e)) from e
        except OSError as e:
            raise BadInput(f"{job.src}: cannot be read ({e})") from e
        try:
            r = self.derainer.derain(img, self.options)
        except ValueError as e:  # check_images: too small, odd channel count, NaN
            raise BadInput(f"{job.src}: {e}") from e
        w = r.routing[0]
        arr = to_uint8(r.images[0])
        return Output(array=arr, seconds=time.perf_counter() - t0, exec_seconds=r.seconds,
                      pattern=describe(r.pattern[0]) if bool(r.pattern[0].isfinite().all()) else None,
                      routing={EXPERTS[i]: round(float(w[i]), 4) for i in range(len(w)) if w[i] > 0},
                      perceived_by=r.perceived_by)


class ComfyBackend(Backend):
    """One ComfyUI server: upload, queue, follow, download."""

    def __init__(self, url: str, workflow: dict, image_node: str, output_node: str, slots: int = 2,
                 timeout: float = 600.0, use_ws: bool = True, run_tag: str | None = None, progress=None,
                 pattern: bool | None = None):
        super().__init__()
        self.slots, self.timeout, self.use_ws = max(1, slots), timeout, use_ws
        # a pooled connection for each worker thread, plus the scheduler's queue/ping requests
        self.client = ComfyClient(url, pool=self.slots + 4)
        self.name = self.client.url
        self.workflow, self.image_node, self.output_node = workflow, image_node, output_node
        # pattern: None = tap the workflow's own perceiver/router if it has them, True = also add
        # them to workflows without, False = never touch the workflow beyond image and prefix
        self.pattern = pattern
        self._tapped = None  # (workflow, taps) once we know the server has PreviewAny
        self.run_tag = run_tag or uuid.uuid4().hex[:8]
        self.progress = progress
        self._lock = threading.Lock()
        self.prompts: set[str] = set()  # our prompt ids queued or running here

    def ping(self) -> bool:
        return self.client.ping()

    def _template(self):
        """The workflow to send, with pattern/routing taps where the server can run them."""
        with self._lock:
            if self._tapped is None:
                wf, taps = self.workflow, {}
                if self.pattern is not False:
                    cand, t = add_pattern_taps(self.workflow, self.image_node, bool(self.pattern))
                    if t:
                        try:
                            if self.client.has_node(TEXT_TAP):
                                wf, taps = cand, t
                        except BatchError:
                            pass
                self._tapped = (wf, taps)
            return self._tapped

    def refresh_depth(self) -> None:
        running, pending = self.client.queue()
        with self._lock:
            mine = self.prompts
            self.foreign = sum(1 for item in running + pending if not (len(item) > 1 and item[1] in mine))

    def cancel(self) -> None:
        with self._lock:
            ids = set(self.prompts)
        try:
            self.client.cancel(ids)
        except (BatchError, ServerUnreachable):
            pass

    def _open_ws(self, client_id) -> WebSocket | None:
        if not self.use_ws:
            return None
        try:
            return self.client.open_ws(client_id, timeout=10)
        except ServerUnreachable:
            raise
        except (ConnectionError, OSError, ValueError) as e:
            if not self.client.ping():
                raise ServerUnreachable(f"{self.name}: {e}") from e
            self.use_ws = False  # server answers HTTP but not websockets: poll /history from now on
            return None

    def process(self, job: Job) -> Output:
        check_image_file(job.src)
        t0 = time.perf_counter()
        data = job.src.read_bytes()
        uname = f"{self.run_tag}_{job.index:05d}_{job.src.name}"
        name = self.client.upload(data, uname, UPLOAD_SUBFOLDER)
        stem = Path(job.src.name).stem
        template, taps = self._template()
        prompt = rewrite_workflow(template, self.image_node, name, self.output_node,
                                  f"{UPLOAD_SUBFOLDER}/{self.run_tag}_{job.index:05d}_{job.token}_{stem}")
        client_id = uuid.uuid4().hex
        ws = self._open_ws(client_id)
        try:
            pid = self.client.submit(prompt, client_id)
            with self._lock:
                self.prompts.add(pid)
            try:
                hist = self._wait(pid, ws, job)
            finally:
                with self._lock:
                    self.prompts.discard(pid)
        finally:
            if ws is not None:
                ws.close()
        state = history_state(hist)
        if state != "success":
            self.client.forget(pid)
            raise BatchError(history_error(hist))
        outputs = hist.get("outputs") or {}
        images = (outputs.get(self.output_node) or {}).get("images") or []
        if not images:
            self.client.forget(pid)
            raise BatchError(f"node {self.output_node} produced no image (outputs: {sorted(outputs)})")
        png = self.client.view(images[0])
        problem = image_bytes_problem(png)
        if problem:  # a server answering junk with status 200 is a (retryable) failure, never an output file
            raise BatchError(f"{self.name} sent an output that is not an image ({problem})")
        self.client.forget(pid)
        pattern, routing = outputs_pattern({k: v for k, v in outputs.items() if k not in taps.values()})
        by = None

        def text(kind):  # what a tap node showed
            return " ".join(map(str, (outputs.get(taps.get(kind)) or {}).get("text") or []))
        if text("pattern"):
            pattern, by = parse_pattern_text(text("pattern"))
        if text("routing"):
            routing = parse_routing_text(text("routing"))
        fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(
            images[0].get("filename", "").rsplit(".", 1)[-1].lower(), "PNG")
        return Output(data=png, fmt=fmt, seconds=time.perf_counter() - t0,
                      exec_seconds=history_exec_seconds(hist), pattern=pattern, routing=routing, perceived_by=by)

    def _wait(self, pid: str, ws: WebSocket | None, job: Job) -> dict:
        deadline = time.monotonic() + self.timeout
        last_check = time.monotonic()
        while time.monotonic() < deadline:
            if ws is None:
                hist = self.client.history(pid)
                if history_state(hist):
                    return hist
                time.sleep(0.2)
                continue
            try:
                op, payload = ws.recv(timeout=2.0)
            except TimeoutError:
                op, payload = None, None
            except OSError as e:  # the server went away (or closed the socket): let the runner probe it
                raise ServerUnreachable(f"{self.name}: websocket lost ({e})") from e
            if op == 1:
                try:
                    msg = json.loads(payload)
                except ValueError:
                    msg = {}
                d = (msg.get("data") if isinstance(msg, dict) else None) or {}
                if d.get("prompt_id") == pid:
                    t = msg.get("type")
                    if t == "progress" and self.progress:
                        self.progress(job, d.get("value"), d.get("max"))
                    if t in ("execution_success", "execution_error", "execution_interrupted") or (
                            t == "executing" and d.get("node") is None):
                        return self._final_history(pid)
            if time.monotonic() - last_check > 5.0:  # a missed message must not hang the job
                last_check = time.monotonic()
                hist = self.client.history(pid)
                if history_state(hist):
                    return hist
        try:  # don't leave it queued on a server that may wake up later
            self.client.cancel([pid])
        except (BatchError, ServerUnreachable):
            pass
        raise BatchError(f"no result within {self.timeout:.0f}s (prompt {pid})")

    def _final_history(self, pid):
        for _ in range(50):  # history is written right after the final message
            hist = self.client.history(pid)
            if history_state(hist):
                return hist
            time.sleep(0.1)
        raise BatchError(f"prompt {pid} finished but /history has no record of it")


def pick_backend(job: Job, backends: list[Backend]) -> Backend | None:
    """Where ``job`` goes next, or None to wait. A backend takes work while it is alive and our
    in-flight count is below its slots; among those, the shortest queue (ours + other clients')
    wins, servers this job already failed on last; ties go to the one that finished fewest."""
    ok = [b for b in backends if b.alive and b.ours < b.slots and (b.ours + b.foreign < b.slots or b.ours == 0)]
    if not ok:
        return None
    return min(ok, key=lambda b: (b.name in job.failed_on and len(backends) > 1, b.ours + b.foreign, b.ours, b.done))
