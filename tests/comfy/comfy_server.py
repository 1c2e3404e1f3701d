"""A real ComfyUI server for integration tests (started from COMFYUI_DIR, loopback only, random
free port, bounded waits, killed at the end) and a tiny local HTTP server standing in for the
Hugging Face hub. Standard library only."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

START_TIMEOUT = 120
RUN_TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeHub:
    """Serves ``files[path]`` bytes for any ``/<repo>/resolve/<rev>/<filename>`` the way the hub
    does (HEAD metadata + GET body), so hf_hub_download works against HF_ENDPOINT=self.url."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _find(self):
                hub.requests.append(f"{self.command} {self.path}")
                path = urllib.parse.urlparse(self.path).path
                for name, data in hub.files.items():
                    if path.endswith("/" + name) and "/resolve/" in path:
                        return data
                return None

            def _head(self, data):
                self.send_response(200)
                etag = hashlib.sha256(data).hexdigest()
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()

            def do_HEAD(self):  # noqa: N802
                data = self._find()
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                self._head(data)

            def do_GET(self):  # noqa: N802
                data = self._find()
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self._head(data)
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class ComfyServer:
    def __init__(self, comfy_dir: Path, pack_dir: Path, work: Path):
        self.comfy_dir, self.pack_dir, self.work = Path(comfy_dir), Path(pack_dir), Path(work)
        self.base = self.work / "base"
        self.models = self.base / "models"
        self.proc = None
        self.port = None
        self.hub = FakeHub()
        self.log_path = self.work / "server.log"
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ------------------------------------------------------------------------
    def start(self):
        for d in ("custom_nodes", "input", "output", "temp", "user", "models/clip_rpn", "models/checkpoints",
                  "models/upscale_models"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        packs = self.work / "packs"
        packs.mkdir(exist_ok=True)
        link = packs / "ComfyUI-CLIP-RPN"
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        cfg = self.work / "extra_model_paths.yaml"
        cfg.write_text(f"cliprpn_tests:\n  custom_nodes: {packs}\n")
        self.hub.start()
        self.port = free_port()
        env = dict(os.environ, HF_ENDPOINT=self.hub.url, HF_HOME=str(self.work / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_XET="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
        env.pop("HF_HUB_OFFLINE", None)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--extra-model-paths-config", str(cfg), "--database-url", "sqlite:///:memory:", "--enable-assets"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < START_TIMEOUT:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {START_TIMEOUT}s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(15)
        if getattr(self, "_log", None):
            self._log.close()
        try:
            self.hub.stop()
        except Exception:
            pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP -------------------------------------------------------------------------------
    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path, payload=None, timeout=30):
        """-> (status, json body); HTTP errors are returned, not raised."""
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def object_info(self):
        return self.get("/object_info", timeout=60)

    def upload_image(self, png_bytes: bytes, name: str) -> str:
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for field, value in (("overwrite", "true"), ("type", "input")):
            body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\n{value}\r\n".encode())
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                   f"Content-Type: image/png\r\n\r\n".encode())
        body.write(png_bytes)
        body.write(f"\r\n--{boundary}--\r\n".encode())
        req = urllib.request.Request(self.url + "/upload/image", data=body.getvalue(),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["name"]

    def queue(self, prompt: dict):
        """POST /prompt -> (status, body)."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout=RUN_TIMEOUT) -> dict:
        """Poll /history until the prompt finished (success, error or interrupt)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            if not self.alive():
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st.get("completed") or st.get("status_str") in ("error", "success"):
                    return h[prompt_id]
                if any(m[0] in ("execution_interrupted", "execution_error") for m in st.get("messages", [])):
                    return h[prompt_id]
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, prompt: dict, timeout=RUN_TIMEOUT) -> dict:
        status, body = self.queue(prompt)
        assert status == 200, f"prompt rejected ({status}): {json.dumps(body, indent=1)[:3000]}"
        return self.wait(body["prompt_id"], timeout)

    def open_ws(self):
        """A websocket on /ws for this client id (progress events), or None when no client is at hand."""
        try:
            from cliprpn_core.batch import WebSocket
        except ImportError:
            return None
        return WebSocket(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=10)

    @staticmethod
    def events(ws, stop, timeout=RUN_TIMEOUT):
        """Yield JSON events from ``ws`` until ``stop(event)`` is true (that event included)."""
        import socket as _socket
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                op, payload = ws.recv(timeout=max(0.1, timeout - (time.time() - t0)))
            except _socket.timeout:
                break
            if op != 1:
                continue  # binary previews
            ev = json.loads(payload)
            yield ev
            if stop(ev):
                return
        raise TimeoutError("websocket: expected event did not arrive")

    def running(self) -> bool:
        q = self.get("/queue")
        return bool(q.get("queue_running"))

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{q}")


def status_str(hist: dict) -> str:
    return hist.get("status", {}).get("status_str", "")


def messages(hist: dict) -> dict:
    return {m[0]: m[1] for m in hist.get("status", {}).get("messages", [])}
