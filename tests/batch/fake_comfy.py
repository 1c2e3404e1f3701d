"""A tiny stand-in for a ComfyUI server (stdlib http.server in a thread, loopback, random port).

It speaks the parts of the HTTP API batch clients use: POST /upload/image (multipart), POST /prompt
(queued, executed one at a time by a worker thread: the LoadImage's file is inverted and "saved"
under the SaveImage prefix), GET /history[/id], POST /history {delete}, GET /view, GET/POST /queue,
POST /interrupt, GET /system_stats and a websocket at /ws?clientId= that streams executing /
progress / execution_success / execution_error messages. ``kill()`` drops everything at once, the
way a crashed server does."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import queue
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageOps

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(payload: bytes, op: int = 1) -> bytes:
    n = len(payload)
    head = bytes([0x80 | op])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


class FakeComfy:
    def __init__(self, delay: float = 0.02, websocket: bool = True):
        self.delay, self.websocket = delay, websocket
        self.inputs: dict[str, bytes] = {}
        self.outputs: dict[tuple, bytes] = {}
        self.history: dict[str, dict] = {}
        self.pending: list[tuple] = []  # (number, pid, prompt, extra)
        self.running: tuple | None = None
        self.fail: dict[str, int] = {}  # upload-name suffix -> executions that fail before one succeeds
        self.executed: list[str] = []  # image names, one entry per execution
        self.prompts_seen = 0
        self.foreign = 0  # fake prompts of "other users" reported in /queue
        self.freeze = False  # keep prompts queued without executing them
        self.interrupted: list[str] = []
        self.clients: dict[str, queue.Queue] = {}
        self.conns: list[socket.socket] = []
        self.lock = threading.Condition()
        self.dead = False
        self.garbage: dict[str, int] = {}  # path -> how many of its next answers are broken
        self.garbage_kind = "500"  # "500": an HTML error page with status 500; "junk": status 200, not JSON
        self._counter = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as ComfyUI's aiohttp (asyncio transports set it): without it a kept-alive connection
            # waits ~40 ms (Nagle + delayed ACK) for each body written after its headers
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                fake.conns.append(self.connection)

            def _json(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n) if n else b""
                if len(data) < n:  # the client died mid-request (its headers and body come in separate sends):
                    self.close_connection = True  # a real server drops such a request, never runs it as "{}"
                    raise ConnectionError(f"request body cut off after {len(data)} of {n} bytes")
                return data

            def _garbage(self, path):
                with fake.lock:
                    n = fake.garbage.get(path, 0)
                    if n <= 0:
                        return False
                    fake.garbage[path] = n - 1
                body = b"<html><body>Internal Server Error</body></html>" if fake.garbage_kind == "500" else b"\x00\xffnot json{"
                self.send_response(500 if fake.garbage_kind == "500" else 200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return True

            def do_GET(self):  # noqa: N802
                u = urllib.parse.urlparse(self.path)
                if self._garbage(u.path if not u.path.startswith("/history/") else "/history/"):
                    return
                q = dict(urllib.parse.parse_qsl(u.query))
                if u.path == "/ws":
                    if not fake.websocket or self.headers.get("Upgrade", "").lower() != "websocket":
                        return self._json({"error": "no websocket"}, 404)
                    return self._ws(q.get("clientId", ""))
                if u.path == "/system_stats":
                    return self._json({"system": {"comfyui_version": "fake"}, "devices": []})
                if u.path == "/queue":
                    with fake.lock:
                        run = [[0, fake.running[1], {}, {}, []]] if fake.running else []
                        pend = [[n, pid, {}, {}, []] for n, pid, _, _ in fake.pending]
                        pend += [[99, f"foreign-{i}", {}, {}, []] for i in range(fake.foreign)]
                    return self._json({"queue_running": run, "queue_pending": pend})
                if u.path.startswith("/history"):
                    pid = u.path[len("/history/"):]
                    with fake.lock:
                        h = {pid: fake.history[pid]} if pid in fake.history else ({} if pid else dict(fake.history))
                    return self._json(h)
                if u.path == "/view":
                    data = fake.outputs.get((q.get("filename"), q.get("subfolder", ""), q.get("type", "output")))
                    if data is None:
                        return self._json({"error": "not found"}, 404)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self._json({"error": "not found"}, 404)

            def do_POST(self):  # noqa: N802
                u = urllib.parse.urlparse(self.path)
                if self._garbage(u.path):
                    return
                body = self._body()
                if u.path == "/upload/image":
                    return self._upload(body)
                payload = json.loads(body or b"{}")
                if u.path == "/prompt":
                    return self._prompt(payload)
                if u.path == "/history":
                    with fake.lock:
                        for pid in payload.get("delete", []):
                            fake.history.pop(pid, None)
                    return self._json({})
                if u.path == "/queue":
                    with fake.lock:
                        ids = set(payload.get("delete", []))
                        fake.pending = [p for p in fake.pending if p[1] not in ids]
                    return self._json({})
                if u.path == "/interrupt":
                    with fake.lock:
                        pid = payload.get("prompt_id")
                        if fake.running and (pid is None or pid == fake.running[1]):
                            fake.interrupted.append(fake.running[1])
                    return self._json({})
                self._json({"error": "not found"}, 404)

            def _upload(self, body):
                ctype = self.headers.get("Content-Type", "")
                boundary = ctype.split("boundary=", 1)[1].encode()
                fields, filename, data = {}, None, None
                for part in body.split(b"--" + boundary):
                    if b"\r\n\r\n" not in part:
                        continue
                    head, content = part.split(b"\r\n\r\n", 1)
                    content = content[:-2] if content.endswith(b"\r\n") else content
                    head = head.decode(errors="replace")
                    name = head.split('name="', 1)[1].split('"', 1)[0]
                    if 'filename="' in head:
                        filename, data = head.split('filename="', 1)[1].split('"', 1)[0], content
                    else:
                        fields[name] = content.decode()
                sub = fields.get("subfolder", "")
                key = f"{sub}/{filename}" if sub else filename
                fake.inputs[key] = data
                self._json({"name": filename, "subfolder": sub, "type": "input"})

            def _prompt(self, payload):
                prompt, cid = payload.get("prompt", {}), payload.get("client_id", "")
                errors = {}
                for nid, node in prompt.items():
                    if node.get("class_type") == "LoadImage" and node["inputs"].get("image") not in fake.inputs:
                        errors[nid] = {"errors": [{"message": "Invalid image file",
                                                   "details": f"image - Invalid image file: {node['inputs'].get('image')}"}],
                                       "class_type": "LoadImage"}
                if errors:
                    return self._json({"error": {"type": "prompt_outputs_failed_validation",
                                                 "message": "Prompt outputs failed validation", "details": ""},
                                       "node_errors": errors}, 400)
                pid = str(uuid.uuid4())
                with fake.lock:
                    fake._counter += 1
                    fake.prompts_seen += 1
                    fake.pending.append((fake._counter, pid, prompt, {"client_id": cid}))
                    fake.lock.notify_all()
                self._json({"prompt_id": pid, "number": fake._counter, "node_errors": {}})

            def _ws(self, cid):
                key = self.headers.get("Sec-WebSocket-Key", "")
                accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                q = fake.clients.setdefault(cid, queue.Queue())
                self.wfile.write(ws_frame(json.dumps({"type": "status", "data": {"sid": cid}}).encode()))
                self.wfile.write(ws_frame(b"\x00\x00\x00\x01binary-preview", 2))  # clients must skip binary frames
                self.wfile.write(ws_frame(b"hi", 9))  # and answer pings
                self.wfile.flush()
                self.close_connection = True
                while not fake.dead:
                    try:
                        msg = q.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    try:
                        self.wfile.write(ws_frame(json.dumps(msg).encode()))
                        self.wfile.flush()
                    except OSError:
                        return

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # connections dropped by kill() are expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.threads = [threading.Thread(target=self.httpd.serve_forever, daemon=True),
                        threading.Thread(target=self._worker, daemon=True)]

    # -- execution ----------------------------------------------------------------------------
    def _send(self, cid, typ, data):
        if cid in self.clients:
            self.clients[cid].put({"type": typ, "data": data})

    def _worker(self):
        while not self.dead:
            with self.lock:
                while not self.dead and (not self.pending or self.freeze):
                    self.lock.wait(0.05)
                if self.dead:
                    return
                item = self.pending.pop(0)
                self.running = item
            _, pid, prompt, extra = item
            cid = extra["client_id"]
            t0 = int(time.time() * 1000)
            msgs = [["execution_start", {"prompt_id": pid, "timestamp": t0}]]
            self._send(cid, "execution_start", {"prompt_id": pid})
            load = next(n for n in prompt.values() if n["class_type"] == "LoadImage")
            name = load["inputs"]["image"]
            save_id, save = next((k, n) for k, n in prompt.items() if n["class_type"] == "SaveImage")
            self._send(cid, "executing", {"node": save_id, "prompt_id": pid})
            self._send(cid, "progress", {"value": 1, "max": 2, "prompt_id": pid, "node": save_id})
            time.sleep(self.delay)
            if self.dead:
                return
            self.executed.append(name)
            failing = next((k for k, n in self.fail.items() if name.endswith(k) and n > 0), None)
            outputs, ok = {}, True
            if pid in self.interrupted:
                ok = False
                msgs.append(["execution_interrupted", {"prompt_id": pid, "timestamp": int(time.time() * 1000)}])
                self._send(cid, "execution_interrupted", {"prompt_id": pid})
            elif failing:
                self.fail[failing] -= 1
                ok = False
                err = {"prompt_id": pid, "node_id": save_id, "node_type": "CLIPRPNDerain", "exception_type": "RuntimeError",
                       "exception_message": "injected failure", "timestamp": int(time.time() * 1000)}
                msgs.append(["execution_error", err])
                self._send(cid, "execution_error", err)
            else:
                with Image.open(io.BytesIO(self.inputs[name])) as im:
                    out = ImageOps.invert(im.convert("RGB"))
                buf = io.BytesIO()
                out.save(buf, format="PNG")
                prefix = save["inputs"]["filename_prefix"]
                sub, _, base = prefix.rpartition("/")
                fname = f"{base}_00001_.png"
                self.outputs[(fname, sub, "output")] = buf.getvalue()
                outputs = {save_id: {"images": [{"filename": fname, "subfolder": sub, "type": "output"}]}}
                msgs.append(["execution_success", {"prompt_id": pid, "timestamp": int(time.time() * 1000)}])
            with self.lock:
                self.history[pid] = {"prompt": [0, pid, prompt, extra, [save_id]], "outputs": outputs,
                                     "status": {"status_str": "success" if ok else "error", "completed": ok,
                                                "messages": msgs}}
                self.running = None
            if ok:
                self._send(cid, "executed", {"node": save_id, "output": outputs[save_id], "prompt_id": pid})
                self._send(cid, "execution_success", {"prompt_id": pid})
            self._send(cid, "executing", {"node": None, "prompt_id": pid})

    # -- lifecycle --------------------------------------------------------------------------
    def start(self):
        for t in self.threads:
            t.start()
        return self

    def kill(self):
        """Die like a crashed process: stop listening and drop every open connection."""
        if self.dead:
            return
        self.dead = True
        self.httpd.shutdown()
        self.httpd.server_close()
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                c.close()
            except OSError:
                pass
        with self.lock:
            self.lock.notify_all()

    stop = kill
