"""Drive ComfyUI's own frontend in headless Chromium, as a user would: open the page, load a workflow
file through the UI's file input (the path the Load menu and drag-and-drop take), click Run, wait
for the output images on the canvas, take screenshots.

Playwright drives the system's Chromium (Debian's ``chromium``; ``CLIPRPN_CHROMIUM`` names another
binary); no browser is downloaded. ``find_chromium`` and ``playwright_missing`` let the tests skip
where either is absent."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

READY_TIMEOUT_MS = 120_000
RUN_TIMEOUT_MS = 300_000
VIEW_W, VIEW_H = 1320, 880
# the canvas without the side bar (left) and the tab bar (top): a 3:2 picture
CANVAS_CLIP = {"x": 60, "y": 40, "width": VIEW_W - 60, "height": VIEW_H - 40}
OUTPUT_TYPES = ("SaveImage", "PreviewImage")

# One JavaScript snapshot of what the user sees: every node's type and box (title bar included), the
# types the frontend has no definition for, and the text of every open dialog and toast.
_STATE_JS = """() => ({
  nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type, title: n.title,
                                    box: Array.from(n.getBounding()), images: (n.imgs || []).length})),
  missing: app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
  dialogs: [...document.querySelectorAll('.p-dialog, [role=dialog], [role=alertdialog]')]
             .map(d => d.innerText.trim()).filter(Boolean),
  toasts: [...document.querySelectorAll('.p-toast-message')].map(d => d.innerText.trim()).filter(Boolean),
})"""


def find_chromium() -> str | None:
    exe = os.environ.get("CLIPRPN_CHROMIUM")
    if exe:
        return exe if os.access(exe, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def playwright_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e \".[browser]\"; it drives the system Chromium)"
    return None


@dataclass
class Console:
    """Console errors and uncaught exceptions seen by the page. A failed load of a resource on
    another host is kept apart: test machines have no internet, and the frontend asks the Registry
    and the model hosts named in a workflow for metadata."""
    host: str
    errors: list = field(default_factory=list)
    offline: list = field(default_factory=list)

    def on_console(self, msg):
        if msg.type != "error":
            return
        url = (msg.location or {}).get("url", "")
        if msg.text.startswith("Failed to load resource: net::") and urlparse(url).netloc not in ("", self.host):
            self.offline.append(url)
        else:
            self.errors.append(f"{msg.text} ({url})" if url else msg.text)

    def on_page_error(self, exc):
        self.errors.append(f"uncaught: {exc}")

    def clear(self):
        self.errors.clear()
        self.offline.clear()


class ComfyPage:
    """One browser page on one ComfyUI server."""

    def __init__(self, url: str, chromium: str, playwright):
        """``playwright``: a started ``sync_playwright()`` (one per thread: its sync API cannot be started twice)."""
        self.url = url
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        self.browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=args)
        self.page = self.browser.new_page(viewport={"width": VIEW_W, "height": VIEW_H})
        self.console = Console(urlparse(url).netloc)
        self.page.on("console", self.console.on_console)
        self.page.on("pageerror", self.console.on_page_error)

    def close(self):
        self.browser.close()

    def open(self):
        """Load the frontend and wait until the app and its canvas are up. The minimap is hidden so
        screenshots show the graph; the console is cleared of what the empty start page logged."""
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=READY_TIMEOUT_MS)
        self.page.wait_for_function("() => window.app && window.app.canvas && window.LiteGraph && "
                                    "window.app.extensionManager && window.app.extensionManager.setting",
                                    timeout=READY_TIMEOUT_MS)
        # no minimap over the graph; nodes drawn in full at the small zooms a whole-graph view needs
        self.page.evaluate("async () => { const s = app.extensionManager.setting;"
                           " await s.set('Comfy.Minimap.Visible', false);"
                           " await s.set('LiteGraph.Canvas.MinFontSizeForLOD', 1); }")
        self.page.wait_for_timeout(1500)
        self.close_dialogs()  # a first visit opens the template browser
        self.console.clear()

    def close_dialogs(self):
        """Close open dialogs as a user would (Escape), until none is left."""
        for _ in range(5):
            if not self.state()["dialogs"]:
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(500)
        raise AssertionError(f"dialogs do not close: {self.state()['dialogs']}")

    def load_workflow(self, path: Path) -> dict:
        """Open a workflow file through the UI's file input; -> the UI state once its nodes are on
        the canvas."""
        n = len(json.loads(Path(path).read_text())["nodes"])
        self.page.set_input_files("#comfy-file-input", str(path))
        self.page.wait_for_function(f"() => app.graph.nodes.length === {n}", timeout=READY_TIMEOUT_MS)
        self.page.wait_for_timeout(1500)  # dialogs and toasts the load raises
        return self.state()

    def state(self) -> dict:
        return self.page.evaluate(_STATE_JS)

    def run(self) -> float:
        """Fit the graph in view (the canvas draws, and so loads the images of, visible nodes only),
        click Run and wait until the app holds every output node's result and every image output
        node shows its images. -> seconds from the click."""
        self.fit_view()
        t0 = time.time()
        self.page.get_by_role("button", name="Run").first.click()
        types = json.dumps(list(OUTPUT_TYPES))
        self.page.wait_for_function(
            "() => app.graph.nodes.filter(n => " + types + ".includes(n.type) || n.type === 'PreviewAny')"
            ".every(n => { const o = (app.nodeOutputs || {})[String(n.id)];"
            " return o && ((o.images && o.images.length) || (o.text && o.text.length)); })",
            timeout=RUN_TIMEOUT_MS)
        self.page.wait_for_function(
            "() => app.graph.nodes.filter(n => " + types + ".includes(n.type))"
            ".every(n => n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0))",
            timeout=READY_TIMEOUT_MS)
        return time.time() - t0

    def outputs(self) -> dict:
        """What the app received for each node: {node id: {'images': [...], 'text': [...]}}."""
        return self.page.evaluate("() => JSON.parse(JSON.stringify(app.nodeOutputs || {}))")

    def fit_view(self):
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(800)

    def screenshot_canvas(self, path: Path):
        """The canvas as the user sees it, 3:2, without what floats over it: the Run bar and the
        notices beside it (job done, a model file to download), so the graph shows whole."""
        self.page.evaluate("""() => {
          const hide = e => { e.style.visibility = 'hidden'; };
          document.querySelectorAll('.actionbar-container, .p-toast').forEach(hide);
          document.querySelectorAll('[class*="pointer-events-auto"]').forEach(e => {
            const r = e.getBoundingClientRect();
            if (r.top < window.innerHeight / 3 && r.left > window.innerWidth / 2) hide(e);
          });
        }""")
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path), clip=CANVAS_CLIP)
        self.page.evaluate("() => document.querySelectorAll('[style*=\"visibility: hidden\"]')"
                           ".forEach(e => { e.style.visibility = ''; })")


def overlapping(nodes: list[dict]) -> list[tuple]:
    """Pairs of nodes whose boxes (as drawn, after any image they show) overlap."""
    out = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["box"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a["title"], b["title"]))
    return out
