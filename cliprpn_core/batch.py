"""`cliprpn batch`: derain whole shoots / video frames, in-process or through ComfyUI servers.

INPUT is a folder, a glob or a list file (one path a line). With ``--server URL`` (repeatable)
every image is uploaded to a running ComfyUI, an API-format workflow (ours or the user's, its image
input found and replaced) is queued, progress is followed over the websocket (``/history`` polling
when no websocket), and the result is downloaded and written under the image's own name.
Without ``--server`` the core model runs in this process.

- servers share the work by queue depth (ours in flight + other clients' prompts);
- a server that goes away has its in-flight images re-queued on the others (not counted as retries);
- a failed image is retried (preferably elsewhere), then reported as failed;
- outputs are written atomically (temp file + os.replace); a rerun skips complete outputs
  (``--overwrite`` redoes them); Ctrl-C deletes/interrupts our prompts, writes the report, exits 130;
- bad input (missing, empty, unreadable file; a workflow without an image input) is reported per
  image and does not stop the rest.

Standard library + numpy/pillow/tqdm (torch only for in-process mode). Never imports ComfyUI.
"""
from __future__ import annotations

import argparse
import base64
import copy
import csv
import hashlib
import http.client
import io
import json
import os
import queue
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .imageio import IMAGE_EXTS, atomic_write_bytes
from .runfiles import LIST_EXTS, clean_partials, collect_inputs, output_complete  # noqa: F401 (re-exported)

API_WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows" / "api"
DEFAULT_WORKFLOW = "clip_rpn_basic_derain"
UPLOAD_SUBFOLDER = "cliprpn_batch"
IMAGE_LOADERS = ("LoadImage", "LoadImageMask", "LoadImageOutput")
SAVERS = ("SaveImage",)
PREVIEWERS = ("PreviewImage",)
# workflows/api/clip_rpn_basic_derain.json, for installs that carry only the cliprpn_core package
BUILTIN_BASIC = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "rainy.png"}},
    "2": {"class_type": "CLIPRPNLoader", "inputs": {"checkpoint": "clip_rpn_default.safetensors",
                                                    "clip": "none (built-in pattern head)", "device": "auto",
                                                    "dtype": "auto"}},
    "3": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["2", 0], "image": ["1", 0], "expert_check": False}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "clip_rpn/derained"}},
}


# ---------------------------------------------------------------------------------------------
# errors
class BatchError(Exception):
    """A job failed; ``retryable`` says whether another attempt may help."""

    def __init__(self, msg, retryable=True):
        super().__init__(msg)
        self.retryable = retryable


class BadInput(BatchError):
    def __init__(self, msg):
        super().__init__(msg, retryable=False)


class WorkflowError(ValueError):
    pass


class ServerUnreachable(ConnectionError):
    pass


# ---------------------------------------------------------------------------------------------
# inputs, jobs, outputs
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


_PIL_FMT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
            ".webp": "WEBP"}


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


_UMASK = _umask()


def _atomic(dst: Path, write_fn) -> None:
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
        _atomic(dst, lambda tmp: Path(tmp).write_bytes(data))
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
    _atomic(dst, lambda tmp: img.save(tmp, format=want, **kw))


# ---------------------------------------------------------------------------------------------
# workflows
def load_workflow(spec: str | None) -> tuple[dict, str]:
    """A name of one of ours (``clip_rpn_basic_derain``, ``basic_derain``) or a path -> (API prompt, origin)."""
    spec = spec or DEFAULT_WORKFLOW
    p = Path(spec)
    if not p.is_file():
        stem = p.name[:-5] if p.name.endswith(".json") else p.name
        for cand in (API_WORKFLOWS / f"{stem}.json", API_WORKFLOWS / f"clip_rpn_{stem}.json"):
            if cand.is_file():
                p = cand
                break
        else:
            if stem in (DEFAULT_WORKFLOW, "basic_derain") and not API_WORKFLOWS.is_dir():
                return copy.deepcopy(BUILTIN_BASIC), f"built-in {DEFAULT_WORKFLOW}"
            ours = ", ".join(sorted(q.stem for q in API_WORKFLOWS.glob("*.json"))) or "not installed here"
            raise WorkflowError(f"workflow {spec!r} is neither a file nor one of ours ({ours})")
    try:
        wf = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkflowError(f"workflow {p} is not readable JSON ({e})") from e
    return check_workflow(wf, str(p)), str(p)


def check_workflow(wf, origin="workflow") -> dict:
    if isinstance(wf, dict) and "prompt" in wf and isinstance(wf["prompt"], dict) and "nodes" not in wf:
        wf = wf["prompt"]  # a saved POST /prompt body
    if isinstance(wf, dict) and "nodes" in wf and "links" in wf:
        raise WorkflowError(f"{origin} is a UI (saved) workflow; export it in API format "
                            "(ComfyUI menu: Workflow > Export (API)) and pass that file")
    if not isinstance(wf, dict) or not wf or not all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        raise WorkflowError(f"{origin} is not an API-format workflow "
                            "({\"<id>\": {\"class_type\": ..., \"inputs\": {...}}})")
    return wf


def _node_order(k):
    return (0, int(k)) if str(k).isdigit() else (1, str(k))


def find_image_node(wf: dict, node_id: str | None = None) -> str:
    """The node whose ``image`` input takes the uploaded file name."""
    if node_id is not None:
        node_id = str(node_id)
        n = wf.get(node_id)
        if n is None:
            raise WorkflowError(f"--image-node {node_id}: no such node (nodes: {', '.join(sorted(wf, key=_node_order))})")
        if not isinstance(n.get("inputs", {}).get("image"), str):
            raise WorkflowError(f"--image-node {node_id} ({n['class_type']}) has no file-name 'image' input")
        return node_id
    cands = [k for k, n in wf.items() if n["class_type"] in IMAGE_LOADERS]
    if not cands:
        cands = [k for k, n in wf.items() if isinstance(n.get("inputs", {}).get("image"), str)]
    if not cands:
        raise WorkflowError("workflow has no image input: add a LoadImage node (its 'image' input receives "
                            "each uploaded file) or name the node with --image-node")
    if len(cands) > 1:
        desc = ", ".join(f"{k} ({wf[k]['class_type']}: {wf[k]['inputs'].get('image')!r})" for k in sorted(cands, key=_node_order))
        raise WorkflowError(f"workflow has several image inputs ({desc}); choose one with --image-node")
    return cands[0]


def find_output_node(wf: dict, node_id: str | None = None) -> str:
    """The node whose saved images are downloaded: SaveImage, else PreviewImage."""
    if node_id is not None:
        node_id = str(node_id)
        if node_id not in wf:
            raise WorkflowError(f"--output-node {node_id}: no such node")
        return node_id
    for kinds in (SAVERS, PREVIEWERS):
        cands = [k for k, n in wf.items() if n["class_type"] in kinds]
        if len(cands) == 1:
            return cands[0]
        if len(cands) > 1:
            raise WorkflowError(f"workflow has several {kinds[0]} nodes ({', '.join(sorted(cands, key=_node_order))}); "
                                "choose the one to download with --output-node")
    raise WorkflowError("workflow saves no image: add a SaveImage node (or name the output node with --output-node)")


def rewrite_workflow(wf: dict, image_node: str, image_name: str, output_node: str | None = None,
                     prefix: str | None = None) -> dict:
    """A copy with the image input set to ``image_name`` and the output node's filename_prefix set."""
    out = copy.deepcopy(wf)
    out[image_node].setdefault("inputs", {})["image"] = image_name
    if output_node is not None and prefix is not None and "filename_prefix" in out[output_node].get("inputs", {}):
        out[output_node]["inputs"]["filename_prefix"] = prefix
    return out


PERCEIVER, ROUTER, LOADER, TEXT_TAP = "CLIPRPNRainPerceiver", "CLIPRPNExpertRouter", "CLIPRPNLoader", "PreviewAny"
EXPERT_AUTO = "auto (router decides)"
DERAIN_NODES = ("CLIPRPNDerain", "CLIPRPNCrossAttentionDerain")


def set_expert_check(wf: dict, on: bool = True) -> dict:
    """A copy of ``wf`` with the expert check switched on (or off) in every CLIP-RPN derain node."""
    out = copy.deepcopy(wf)
    hits = [n for n in out.values() if isinstance(n, dict) and n.get("class_type") in DERAIN_NODES]
    if not hits:
        raise WorkflowError("--check needs a CLIP-RPN Derain or Cross-Attention Derain node in the workflow; "
                            "this one has none")
    for n in hits:
        n.setdefault("inputs", {})["expert_check"] = bool(on)
    return out


def _new_id(wf: dict) -> str:
    return str(max([int(k) for k in wf if str(k).isdigit()] + [0]) + 1)


def add_pattern_taps(wf: dict, image_node: str, add_nodes: bool = False) -> tuple[dict, dict]:
    """A copy of ``wf`` where the summaries of its Rain Perceiver / Expert Router feed PreviewAny
    nodes (their text comes back in /history), and {"pattern"|"routing": tap node id}.
    ``add_nodes`` first adds a perceiver and a router on the image (same defaults as CLIP-RPN
    Derain: top_k 1, auto) when the workflow has a CLIP-RPN Loader but no perceiver/router."""
    out = copy.deepcopy(wf)
    first = (lambda kind: next((k for k in sorted(out, key=_node_order) if out[k]["class_type"] == kind), None))
    perc, rout = first(PERCEIVER), first(ROUTER)
    loader = first(LOADER)
    if add_nodes and perc is None and loader is not None:
        perc = _new_id(out)
        out[perc] = {"class_type": PERCEIVER, "inputs": {"model": [loader, 0], "image": [image_node, 0]}}
    if add_nodes and rout is None and perc is not None:
        rout = _new_id(out)
        out[rout] = {"class_type": ROUTER, "inputs": {"model": out[perc]["inputs"].get("model", [loader, 0]),
                                                      "pattern": [perc, 0], "top_k": 1, "temperature": 1.0,
                                                      "expert_override": EXPERT_AUTO}}
    taps = {}
    for kind, node in (("pattern", perc), ("routing", rout)):
        if node is not None:
            tid = _new_id(out)
            out[tid] = {"class_type": TEXT_TAP, "inputs": {"source": [node, 1]}}
            taps[kind] = tid
    return out, taps


def parse_pattern_text(text: str) -> tuple[str | None, str | None]:
    """Rain Perceiver summary -> (pattern line of the first image, perceived_by)."""
    pattern = by = None
    for line in str(text).splitlines():
        line = line.strip()
        if line.startswith("image ") and ":" in line and pattern is None:
            pattern = line.split(":", 1)[1].strip()
        elif line.startswith("(perceived by") and line.endswith(")"):
            by = line[len("(perceived by"):-1].strip()
    return pattern, by


def parse_routing_text(text: str) -> dict | None:
    """Expert Router summary ('image 1: light_streaks=1.00, veil=0.00') -> {expert: weight}."""
    for line in str(text).splitlines():
        if line.strip().startswith("image ") and ":" in line:
            out = {}
            for part in line.split(":", 1)[1].split(","):
                k, _, v = part.strip().partition("=")
                try:
                    out[k.strip()] = round(float(v), 4)
                except ValueError:
                    continue
            return out or None
    return None


# ---------------------------------------------------------------------------------------------
# a minimal RFC 6455 websocket client (text/binary frames, ping/pong, close; no extensions)
class WebSocketClosed(ConnectionError):
    pass


class WebSocket:
    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = 10.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("ws", "wss"):
            raise ValueError(f"not a websocket URL: {url}")
        port = u.port or (443 if u.scheme == "wss" else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if u.scheme == "wss":
            import ssl
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        self.sock, self.buf = sock, b""
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(4096)
            if not chunk:
                self.close()
                raise WebSocketClosed("connection closed during the websocket handshake")
            self.buf += chunk
            if len(self.buf) > 65536:
                self.close()
                raise ConnectionError("websocket handshake response too long")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        expect = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != expect:
            self.close()
            raise ConnectionError(f"websocket upgrade refused: {lines[0]}")

    def _parse(self):
        b = self.buf
        if len(b) < 2:
            return None
        fin, op, masked, n = b[0] & 0x80, b[0] & 0x0F, b[1] & 0x80, b[1] & 0x7F
        i = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = struct.unpack(">Q", b[2:10])[0], 10
        mask = b""
        if masked:
            if len(b) < i + 4:
                return None
            mask, i = b[i:i + 4], i + 4
        if len(b) < i + n:
            return None
        payload = b[i:i + n]
        if masked:
            payload = bytes(c ^ mask[k % 4] for k, c in enumerate(payload))
        self.buf = b[i + n:]
        return bool(fin), op, payload

    def _frame(self, timeout):
        self.sock.settimeout(timeout)
        while True:
            f = self._parse()
            if f is not None:
                return f
            chunk = self.sock.recv(65536)  # socket.timeout leaves self.buf intact
            if not chunk:
                raise WebSocketClosed("websocket closed by the server")
            self.buf += chunk

    def send(self, payload: bytes | str, op: int | None = None):
        if isinstance(payload, str):
            payload, op = payload.encode(), op or 1
        op = op or 2
        n = len(payload)
        head = bytes([0x80 | op])
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536
                                                   else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(c ^ mask[k % 4] for k, c in enumerate(payload)))

    def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        """-> (opcode 1 text / 2 binary, payload). Answers pings; raises WebSocketClosed on close,
        socket.timeout when nothing arrives within ``timeout``."""
        parts, first_op = [], None
        while True:
            fin, op, payload = self._frame(timeout)
            if op == 9:
                self.send(payload, 10)
                continue
            if op == 10:
                continue
            if op == 8:
                try:
                    self.send(payload[:2], 8)
                except OSError:
                    pass
                raise WebSocketClosed("websocket closed by the server")
            if op != 0:
                first_op, parts = op, []
            parts.append(payload)
            if fin:
                return first_op or 1, b"".join(parts)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# ComfyUI HTTP client
def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


class ComfyClient:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = normalize_url(url)
        self.timeout = timeout

    def _open(self, req, timeout=None):
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError:
            raise
        except urllib.error.URLError as e:
            raise ServerUnreachable(f"{self.url}: {e.reason}") from e
        except (ConnectionError, socket.timeout, TimeoutError, OSError) as e:
            raise ServerUnreachable(f"{self.url}: {type(e).__name__}: {e}") from e

    def request(self, path, payload=None, data=None, headers=None, timeout=None, method=None):
        """-> decoded JSON (or raw bytes). HTTP errors raise BatchError with the server's message."""
        if payload is not None:
            data = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with self._open(req, timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read().decode(errors="replace")
            except OSError:
                detail = ""
            raise BatchError(f"{self.url}{path.split('?')[0]}: HTTP {e.code}: {_short_error(detail)}",
                             retryable=e.code >= 500 or e.code == 400) from e
        except (ConnectionError, socket.timeout, TimeoutError, OSError, http.client.HTTPException) as e:
            if isinstance(e, ServerUnreachable):
                raise
            raise ServerUnreachable(f"{self.url}: {type(e).__name__}: {e}") from e
        if body[:1] in (b"{", b"["):
            return json.loads(body)
        return body

    def ping(self, timeout=3.0) -> bool:
        try:
            self.request("/system_stats", timeout=timeout)
            return True
        except (ServerUnreachable, BatchError):
            return False

    def queue(self) -> tuple[list, list]:
        q = self.request("/queue", timeout=5)
        return q.get("queue_running", []), q.get("queue_pending", [])

    def depth(self) -> int:
        running, pending = self.queue()
        return len(running) + len(pending)

    def upload(self, data: bytes, name: str, subfolder: str = "") -> str:
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        fields = [("overwrite", "true"), ("type", "input")] + ([("subfolder", subfolder)] if subfolder else [])
        for k, v in fields:
            body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode())
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(data)
        body.write(f"\r\n--{boundary}--\r\n".encode())
        r = self.request("/upload/image", data=body.getvalue(),
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if not isinstance(r, dict) or "name" not in r:
            raise BatchError(f"{self.url}/upload/image: unexpected answer {str(r)[:200]}")
        return f"{r['subfolder']}/{r['name']}" if r.get("subfolder") else r["name"]

    def submit(self, prompt: dict, client_id: str) -> str:
        try:
            r = self.request("/prompt", {"prompt": prompt, "client_id": client_id})
        except BatchError as e:
            raise BatchError(f"workflow rejected: {e}", retryable=e.retryable) from e
        if r.get("node_errors"):
            raise BatchError(f"workflow rejected: {_short_error(json.dumps(r['node_errors']))}")
        return r["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        h = self.request(f"/history/{prompt_id}")
        return h.get(prompt_id) if isinstance(h, dict) else None

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        data = self.request(f"/view?{q}", timeout=max(self.timeout, 60))
        if isinstance(data, (dict, list)):
            raise BatchError(f"{self.url}/view returned JSON instead of an image")
        return data

    def forget(self, prompt_id: str):
        try:
            self.request("/history", {"delete": [prompt_id]}, timeout=5)
        except (BatchError, ServerUnreachable):
            pass

    def cancel(self, prompt_ids) -> None:
        """Delete our pending prompts and interrupt ours that are running (nothing else)."""
        ids = set(prompt_ids)
        if not ids:
            return
        running, pending = self.queue()
        mine_pending = [item[1] for item in pending if len(item) > 1 and item[1] in ids]
        if mine_pending:
            self.request("/queue", {"delete": mine_pending}, timeout=5)
        for item in running:
            if len(item) > 1 and item[1] in ids:
                self.request("/interrupt", {"prompt_id": item[1]}, timeout=5)

    def ws_url(self, client_id: str) -> str:
        u = urllib.parse.urlsplit(self.url)
        scheme = "wss" if u.scheme == "https" else "ws"
        return urllib.parse.urlunsplit((scheme, u.netloc, u.path.rstrip("/") + "/ws", f"clientId={client_id}", ""))


def _short_error(text: str, n: int = 400) -> str:
    try:
        j = json.loads(text)
        if isinstance(j, dict) and "error" in j:
            e = j["error"]
            msg = e.get("message", "") + (f" ({e.get('details')})" if isinstance(e, dict) and e.get("details") else "") \
                if isinstance(e, dict) else str(e)
            ne = j.get("node_errors")
            if ne:
                msg += "; " + "; ".join(
                    f"node {k} {v.get('class_type', '')}: " + ", ".join(x.get("details") or x.get("message", "")
                                                                      for x in v.get("errors", []))
                    for k, v in ne.items())
            text = msg
    except (ValueError, AttributeError, TypeError):
        pass
    text = " ".join(str(text).split())
    return text[:n] + ("..." if len(text) > n else "")


def _messages(hist: dict) -> dict:
    return {m[0]: m[1] for m in hist.get("status", {}).get("messages", []) if isinstance(m, list) and len(m) == 2}


def history_state(hist: dict | None) -> str | None:
    """'success', 'error', 'interrupted' or None (not finished yet)."""
    if not hist:
        return None
    st = hist.get("status") or {}
    msgs = _messages(hist)
    if "execution_error" in msgs or st.get("status_str") == "error":
        return "error"
    if "execution_interrupted" in msgs:
        return "interrupted"
    if st.get("completed") or st.get("status_str") == "success" or "execution_success" in msgs:
        return "success"
    return None


def history_error(hist: dict) -> str:
    m = _messages(hist)
    e = m.get("execution_error")
    if e:
        return (f"{e.get('node_type', '?')} (node {e.get('node_id', '?')}): "
                f"{e.get('exception_type', '')}: {_short_error(e.get('exception_message', ''))}")
    if "execution_interrupted" in m:
        return "interrupted on the server"
    return "execution failed on the server"


def history_exec_seconds(hist: dict) -> float | None:
    m = _messages(hist)
    try:
        end = m.get("execution_success") or m.get("execution_error") or m.get("execution_interrupted")
        return (end["timestamp"] - m["execution_start"]["timestamp"]) / 1000.0
    except (KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# backends
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

    def __init__(self, checkpoint=None, device="auto", dtype="auto", threads=0, tile=0, clip=None, check=False):
        super().__init__()
        self.check = bool(check)
        import torch

        from .inference import load_derainer
        if threads:
            torch.set_num_threads(threads)
        self.derainer, self.ckpt = load_derainer(checkpoint, clip, device=device, dtype=dtype)
        self.tile = tile or None
        self.name = f"in-process:{self.derainer.device}"

    def process(self, job: Job) -> Output:
        from .imageio import ImageReadError, read_image, to_uint8
        from .patterns import EXPERTS, describe
        t0 = time.perf_counter()
        try:
            img = read_image(job.src)
        except ImageReadError as e:
            raise BadInput(str(e)) from e
        except OSError as e:
            raise BadInput(f"{job.src}: cannot be read ({e})") from e
        try:
            r = self.derainer.derain(img, tile=self.tile, check=self.check)
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
        self.client = ComfyClient(url)
        self.name = self.client.url
        self.workflow, self.image_node, self.output_node = workflow, image_node, output_node
        # pattern: None = tap the workflow's own perceiver/router if it has them, True = also add
        # them to workflows without, False = never touch the workflow beyond image and prefix
        self.pattern = pattern
        self._tapped = None  # (workflow, taps) once we know the server has PreviewAny
        self.slots, self.timeout, self.use_ws = max(1, slots), timeout, use_ws
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
                            info = self.client.request(f"/object_info/{TEXT_TAP}", timeout=10)
                            if isinstance(info, dict) and TEXT_TAP in info:
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

    def _open_ws(self, client_id):
        if not self.use_ws:
            return None
        try:
            return WebSocket(self.client.ws_url(client_id), timeout=10)
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
        node_out = (hist.get("outputs") or {}).get(self.output_node) or {}
        images = node_out.get("images") or []
        if not images:
            self.client.forget(pid)
            raise BatchError(f"node {self.output_node} produced no image (outputs: {sorted(hist.get('outputs', {}))})")
        png = self.client.view(images[0])
        _check_downloaded_image(png, self.name)
        self.client.forget(pid)
        outputs = hist.get("outputs") or {}
        pattern, routing = _extras({k: v for k, v in outputs.items() if k not in taps.values()})
        by = None
        text = lambda kind: " ".join(map(str, (outputs.get(taps.get(kind)) or {}).get("text") or []))  # noqa: E731
        if text("pattern"):
            pattern, by = parse_pattern_text(text("pattern"))
        if text("routing"):
            routing = parse_routing_text(text("routing"))
        fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(
            images[0].get("filename", "").rsplit(".", 1)[-1].lower(), "PNG")
        return Output(data=png, fmt=fmt, seconds=time.perf_counter() - t0,
                      exec_seconds=history_exec_seconds(hist), pattern=pattern, routing=routing, perceived_by=by)

    def _wait(self, pid: str, ws, job: Job) -> dict:
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
            except socket.timeout:
                op, payload = None, None
            except OSError as e:  # the server went away (or closed the socket): let the runner probe it
                raise ServerUnreachable(f"{self.name}: websocket lost ({e})") from e
            if op == 1:
                try:
                    msg = json.loads(payload)
                except ValueError:
                    msg = {}
                d = msg.get("data") or {}
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


def _check_downloaded_image(data: bytes, server: str) -> None:
    """A result is written only when it decodes as an image: a server answering garbage with status 200 is a
    (retryable) failure, never an output file."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for broken data
        raise BatchError(f"{server} sent an output that is not an image ({len(data)} bytes: {type(e).__name__})") from e


def _extras(outputs: dict):
    """Rain pattern / routing from any UI output that carries them (text or dedicated keys)."""
    pattern = routing = None
    for node in outputs.values():
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("pattern"), list) and node["pattern"]:
            pattern = str(node["pattern"][0])
        if isinstance(node.get("routing"), list) and node["routing"]:
            routing = node["routing"][0]
        for t in node.get("text", []) if isinstance(node.get("text"), list) else []:
            if isinstance(t, str) and "density:" in t and pattern is None:
                pattern = t
            elif isinstance(t, str) and t.startswith(("routing", "experts")) and routing is None:
                routing = t
    return pattern, routing


# ---------------------------------------------------------------------------------------------
# scheduling
def pick_backend(job: Job, backends: list[Backend]) -> Backend | None:
    """Where ``job`` goes next, or None to wait. A backend takes work while it is alive and our
    in-flight count is below its slots; among those, the shortest queue (ours + other clients')
    wins, servers this job already failed on last; ties go to the one that finished fewest."""
    ok = [b for b in backends if b.alive and b.ours < b.slots and (b.ours + b.foreign < b.slots or b.ours == 0)]
    if not ok:
        return None
    return min(ok, key=lambda b: (b.name in job.failed_on and len(backends) > 1, b.ours + b.foreign, b.ours, b.done))


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
        dirs = {j.dst.parent for j in self.jobs if j.dst is not None}
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            n = clean_partials(d)
            if n:
                self.log(f"removed {n} partial file(s) an interrupted run left in {d}")
        for j in self.jobs:
            if j.status != "pending":
                continue
            if not self.overwrite and j.dst.exists():
                if output_complete(j.dst):
                    j.status, j.error = "skipped", "output exists (use --overwrite to redo)"
                    continue
                self.log(f"{j.dst} is incomplete or unreadable: redoing it")
            self.pending.append(j)

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
            except (ServerUnreachable, ConnectionError, socket.timeout, TimeoutError) as e:
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
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
        for j, b, t in list(self.inflight.values()):
            self._release(j, b, t)
            j.status, j.error = "interrupted", "stopped before it finished"
        self.pending.clear()
        for j in self.jobs:  # incl. one whose result was being written when the signal came
            if j.status in ("pending", "running"):
                j.status, j.error = "interrupted", "stopped before it finished" if j.server else "stopped before it started"

    def summary(self) -> dict:
        counts = {}
        for j in self.jobs:
            counts[j.status] = counts.get(j.status, 0) + 1
        done = counts.get("done", 0)
        return {"images": len(self.jobs), "counts": counts, "wall_seconds": round(self.wall, 3),
                "images_per_minute": round(60.0 * done / self.wall, 2) if self.wall > 0 and done else 0.0,
                "interrupted": self.interrupted,
                "servers": {b.name: {"done": b.done, "alive": b.alive} for b in self.backends}}


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
    _atomic(path, w)


# ---------------------------------------------------------------------------------------------
# command line
def add_batch_parser(subparsers):
    from .cli import EXIT_CODES, MAX_TILE, MIN_TILE, int_in
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
    if not v > 0 or v != v:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return v


def cmd_batch(args) -> int:
    """Exit codes (as every cliprpn command): 0 all images done or skipped, 1 nothing succeeded, 2 bad command
    line or workflow (nothing sent), 3 some images failed/bad, 130 Ctrl-C."""
    out = Path(args.output)
    report = Path(args.report) if args.report else out / "batch_report.json"
    if not args.server:
        from .inference import DeviceError, resolve_device
        try:
            resolve_device(args.device)
        except DeviceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    jobs = make_jobs(args.inputs, out, args.format)
    from .runfiles import PlanError, check_in_place, check_output_dir
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


if __name__ == "__main__":
    sys.exit(main())
