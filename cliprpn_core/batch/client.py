"""The ComfyUI client of `cliprpn batch`: HTTP on ``requests`` (one Session, i.e. one connection
pool, per server) and the progress stream on ``websocket-client`` (the library ComfyUI's own
websocket API example uses). No protocol code of our own: this module maps ComfyUI's endpoints
(/prompt, /upload/image, /history, /view, /object_info, /queue, /interrupt, /system_stats, /ws) and
the libraries' exceptions onto the batch's error kinds, and reads /history records.

Error kinds: a connection that fails (refused, reset, timed out) is ``ServerUnreachable``; an HTTP
error status or an answer that is not what the endpoint returns (an HTML page, junk with status
200) is a ``BatchError``, retryable for 5xx, 400 and junk."""
from __future__ import annotations

import json
import urllib.parse

import requests
import websocket  # websocket-client

from .errors import BatchError, ServerUnreachable


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


# ---------------------------------------------------------------------------------------------
# websocket: the executing / progress / execution_* stream of one client id
class WebSocketClosed(ConnectionError):
    pass


class WebSocket:
    """One websocket-client connection with the interface the batch needs: ``recv(timeout)`` ->
    (1 text | 2 binary, payload bytes); pings are answered by the library, fragments joined;
    ``TimeoutError`` (= socket.timeout) when nothing arrives in time (a partly received frame is
    kept for the next call), ``WebSocketClosed`` when the server closes or drops the connection,
    ``ConnectionError`` when the upgrade is refused."""

    def __init__(self, url: str, timeout: float = 10.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("ws", "wss"):
            raise ValueError(f"not a websocket URL: {url}")
        try:
            self.ws = websocket.create_connection(url, timeout=timeout, enable_multithread=False)
        except websocket.WebSocketBadStatusException as e:
            raise ConnectionError(f"websocket upgrade refused: HTTP {e.status_code}") from e
        except websocket.WebSocketTimeoutException as e:
            raise ConnectionError(f"websocket handshake timed out ({e})") from e
        except websocket.WebSocketConnectionClosedException as e:
            raise WebSocketClosed(f"connection closed during the websocket handshake ({e})") from e
        except websocket.WebSocketException as e:
            raise ConnectionError(f"websocket handshake failed: {type(e).__name__}: {e}") from e

    def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        self.ws.settimeout(timeout)
        try:
            while True:
                op, payload = self.ws.recv_data()
                if op == websocket.ABNF.OPCODE_CLOSE:
                    raise WebSocketClosed("websocket closed by the server")
                if op in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    return op, payload if isinstance(payload, bytes) else bytes(payload)
        except websocket.WebSocketTimeoutException as e:
            raise TimeoutError(str(e)) from e  # = socket.timeout
        except websocket.WebSocketConnectionClosedException as e:
            raise WebSocketClosed(f"websocket closed by the server ({e})") from e
        except websocket.WebSocketException as e:  # protocol errors: treat the stream as lost
            raise WebSocketClosed(f"websocket error: {type(e).__name__}: {e}") from e

    def close(self):
        try:
            self.ws.close(timeout=0)  # sends the close frame, does not wait for the answer
        except (OSError, websocket.WebSocketException):
            pass


# ---------------------------------------------------------------------------------------------
# HTTP
class ComfyClient:
    """One ComfyUI server over HTTP. ``pool``: connections kept to it (one per concurrent caller)."""

    def __init__(self, url: str, timeout: float = 30.0, pool: int = 10):
        self.url = normalize_url(url)
        self.timeout = timeout
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(1, pool))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def request(self, path, payload=None, data=None, headers=None, timeout=None, method=None, params=None,
                files=None):
        """-> decoded JSON (or raw bytes). HTTP errors raise BatchError with the server's message;
        a JSON-looking body that does not parse is a (retryable) BatchError too."""
        method = method or ("POST" if payload is not None or data is not None or files is not None else "GET")
        try:
            r = self.session.request(method, self.url + path, json=payload, data=data, files=files, params=params,
                                     headers=headers, timeout=timeout or self.timeout)
            body = r.content
        except requests.RequestException as e:
            raise ServerUnreachable(f"{self.url}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise BatchError(f"{self.url}{path.split('?')[0]}: HTTP {r.status_code}: "
                             f"{short_error(body.decode(errors='replace'))}",
                             retryable=r.status_code >= 500 or r.status_code == 400)
        if body[:1] in (b"{", b"["):
            try:
                return json.loads(body)
            except ValueError as e:
                raise BatchError(f"{self.url}{path.split('?')[0]}: answer is not valid JSON ({e})") from e
        return body

    def ping(self, timeout=3.0) -> bool:
        try:
            self.request("/system_stats", timeout=timeout)
            return True
        except (ServerUnreachable, BatchError):
            return False

    def queue(self) -> tuple[list, list]:
        q = self.request("/queue", timeout=5)
        if not isinstance(q, dict):
            raise BatchError(f"{self.url}/queue: unexpected answer {str(q)[:200]}")
        return q.get("queue_running", []), q.get("queue_pending", [])

    def depth(self) -> int:
        running, pending = self.queue()
        return len(running) + len(pending)

    def has_node(self, class_type: str) -> bool:
        """Whether the server has a node class (GET /object_info/<class>)."""
        info = self.request(f"/object_info/{class_type}", timeout=10)
        return isinstance(info, dict) and class_type in info

    def upload(self, data: bytes, name: str, subfolder: str = "") -> str:
        fields = {"overwrite": "true", "type": "input", **({"subfolder": subfolder} if subfolder else {})}
        r = self.request("/upload/image", data=fields, files={"image": (name, data, "application/octet-stream")})
        if not isinstance(r, dict) or "name" not in r:
            raise BatchError(f"{self.url}/upload/image: unexpected answer {str(r)[:200]}")
        return f"{r['subfolder']}/{r['name']}" if r.get("subfolder") else r["name"]

    def submit(self, prompt: dict, client_id: str) -> str:
        try:
            r = self.request("/prompt", {"prompt": prompt, "client_id": client_id})
        except BatchError as e:
            raise BatchError(f"workflow rejected: {e}", retryable=e.retryable) from e
        if not isinstance(r, dict):
            raise BatchError(f"{self.url}/prompt: unexpected answer {str(r)[:200]}")
        if r.get("node_errors"):
            raise BatchError(f"workflow rejected: {short_error(json.dumps(r['node_errors']))}")
        if "prompt_id" not in r:
            raise BatchError(f"{self.url}/prompt: answer without a prompt_id {str(r)[:200]}")
        return r["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        h = self.request(f"/history/{prompt_id}")
        return h.get(prompt_id) if isinstance(h, dict) else None

    def view(self, image: dict) -> bytes:
        params = {k: image.get(k, "") for k in ("filename", "subfolder", "type")}
        data = self.request("/view", params=params, timeout=max(self.timeout, 60))
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

    def open_ws(self, client_id: str, timeout: float = 10.0) -> WebSocket:
        return WebSocket(self.ws_url(client_id), timeout=timeout)


def short_error(text: str, n: int = 400) -> str:
    """A server's error answer in one line: ComfyUI's JSON error (+ node errors) or the text itself."""
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


# ---------------------------------------------------------------------------------------------
# /history records
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
                f"{e.get('exception_type', '')}: {short_error(e.get('exception_message', ''))}")
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
