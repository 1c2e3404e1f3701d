"""The example workflows where users meet them: ComfyUI's own frontend in headless Chromium.

Every workflow in workflows/ is loaded through the UI's file input, with no node type the frontend
lacks, no dialog about missing nodes and no console error; the three that need no outside model are
run with the Run button, and their outputs are checked on the canvas and on the server, with no
node drawn over another once the images are shown. Needs COMFYUI_DIR (a ComfyUI checkout whose
Python also has the frontend package), playwright and a system Chromium; skipped otherwise.

Screenshots land in pytest's temporary folder; with CLIPRPN_UPDATE_THUMBNAILS=1 they also replace
the template thumbnails in workflows/ (workflows 3 and 4 are shown as loaded: their RealESRGAN and
SD inpainting models are not on a test machine)."""
from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import browser as br
import numpy as np
import pytest
import workflow_graphs as wg
from PIL import Image

NAMES = list(wg.GRAPHS)
RUNNABLE = ("clip_rpn_basic_derain", "clip_rpn_full_graph", "clip_rpn_finetune_pairs")
NOT_RUN = {"clip_rpn_derain_upscale": "RealESRGAN_x4plus", "clip_rpn_rain_mask_inpaint": "SD 2 inpainting"}
PACK_TYPES = {"CLIPRPNLoader", "CLIPRPNDerain", "CLIPRPNRainPerceiver", "CLIPRPNExpertRouter", "CLIPRPNMaskEstimator",
              "CLIPRPNCrossAttentionDerain", "CLIPRPNSynthesizeRain", "CLIPRPNFinetune"}


@pytest.fixture(scope="module")
def chromium():
    why = br.playwright_missing()
    if why:
        pytest.skip(why)
    exe = br.find_chromium()
    if not exe:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set CLIPRPN_CHROMIUM)")
    return exe


@pytest.fixture(scope="module")
def playwright(chromium):
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    yield pw
    pw.stop()


@pytest.fixture(scope="module")
def page(chromium, playwright, server):
    pg = br.ComfyPage(server.url, chromium, playwright)
    try:
        pg.open()
        yield pg
    finally:
        pg.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


def _missing_node_dialogs(state) -> list[str]:
    return [d for d in state["dialogs"] + state["toasts"] if "missing" in d.lower() and "node" in d.lower()]


def _thumbnail(png: Path, name: str, how: str, server) -> None:
    """The screenshot as the template's thumbnail, when asked for."""
    if os.environ.get("CLIPRPN_UPDATE_THUMBNAILS") != "1":
        return
    stats = server.get("/system_stats")["system"]
    versions = {p["name"]: p["installed"] for p in stats.get("comfy_package_versions", [])}
    comment = (f"{wg.THUMB_TAG}: {wg.TITLES[name]}, {how}; ComfyUI {stats['comfyui_version']}, "
               f"frontend {versions.get('comfyui-frontend-package', '?')}, headless Chromium")
    im = Image.open(png).convert("RGB").resize((wg.THUMB_W, wg.THUMB_H), Image.LANCZOS)
    im.save(wg.thumb_file(name), quality=82, optimize=True, comment=comment.encode())


def test_the_check_sees_a_missing_node(page, tmp_path):
    """The check the next tests rely on: a node type the server does not have is reported."""
    wf = json.loads(wg.ui_file("clip_rpn_basic_derain").read_text())
    wf["nodes"][0]["type"] = "CLIPRPNNoSuchNode"
    bad = tmp_path / "missing node.json"
    bad.write_text(json.dumps(wf))
    state = page.load_workflow(bad)
    assert state["missing"] == ["CLIPRPNNoSuchNode"]
    page.console.clear()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_through_the_ui(page, server, shots, name):
    page.console.clear()
    state = page.load_workflow(wg.ui_file(name))
    saved = json.loads(wg.ui_file(name).read_text())
    assert sorted(n["type"] for n in state["nodes"]) == sorted(n["type"] for n in saved["nodes"])
    assert state["missing"] == [], f"the frontend has no definition for {state['missing']}"
    assert _missing_node_dialogs(state) == [], state["dialogs"] + state["toasts"]
    assert page.console.errors == [], page.console.errors
    assert {n["type"] for n in state["nodes"]} & PACK_TYPES
    if name in NOT_RUN:
        page.fit_view()
        png = shots / f"{name}.png"
        page.screenshot_canvas(png)
        _thumbnail(png, name, f"as loaded (not run: needs the {NOT_RUN[name]} model)", server)


@pytest.mark.parametrize("name", RUNNABLE)
def test_workflow_runs_with_the_run_button(page, server, shots, name):
    """Loaded as a user would, the LoadImage node pointed at a freshly uploaded copy of its example
    image (so nothing comes from the server's cache and every node really runs, previews included),
    then Run."""
    page.console.clear()
    state = page.load_workflow(wg.ui_file(name))
    (load,) = [n for n in state["nodes"] if n["type"] == "LoadImage"]
    saved = json.loads(wg.ui_file(name).read_text())
    example = next(n for n in saved["nodes"] if n["type"] == "LoadImage")["widgets_values"][0]
    src = wg.EXAMPLE_INPUTS / example
    fresh = server.upload_image(src.read_bytes(), f"{Path(example).stem}_{uuid.uuid4().hex[:8]}.png")
    page.page.evaluate("([id, v]) => { const n = app.graph.getNodeById(id); n.widgets[0].value = v;"
                       " n.widgets[0].callback && n.widgets[0].callback(v); }", [int(load["id"]), fresh])
    seconds = page.run()
    state = page.state()
    assert page.console.errors == [], page.console.errors
    assert not [d for d in state["dialogs"] if "error" in d.lower()], state["dialogs"]
    outputs = page.outputs()
    saves = [n for n in state["nodes"] if n["type"] == "SaveImage"]
    assert saves and all(n["images"] >= 1 for n in saves), "the saved image is not shown on the canvas"
    for n in saves:
        (img,) = outputs[str(n["id"])]["images"]
        assert img["type"] == "output"
        data = server.get(f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type=output")
        out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
        ref = np.asarray(Image.open(src).convert("RGB"), dtype=np.float64)
        assert out.shape == ref.shape
        if name == "clip_rpn_finetune_pairs":  # rain synthesized on the clean photo, then derained: back near it
            assert 10 * np.log10(255 ** 2 / ((out - ref) ** 2).mean()) > 25
        else:
            assert np.abs(out - ref).mean() > 1.0, "the output is the input unchanged"
    for n in state["nodes"]:
        if n["type"] == "PreviewAny":
            assert outputs[str(n["id"])]["text"][0].strip(), f"{n['title']} shows no text"
    assert br.overlapping(state["nodes"]) == [], "nodes drawn over each other after the run"
    page.fit_view()
    png = shots / f"{name}.png"
    page.screenshot_canvas(png)
    _thumbnail(png, name, f"after a run ({seconds:.0f} s on CPU)", server)


@pytest.fixture(scope="module")
def vue_page(chromium, playwright, server):
    """A page with the frontend's Vue node renderer on (nodes as DOM elements, widgets drawn from the
    node schema)."""
    pg = br.ComfyPage(server.url, chromium, playwright)
    try:
        pg.open()
        pg.page.evaluate("async () => await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
        pg.page.wait_for_timeout(1000)
        yield pg
    finally:
        pg.close()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_renders_in_the_vue_node_renderer(vue_page, shots, name):
    """Every node is drawn as a Vue node with its title, the pack's nodes with every widget their
    schema gives them (by name), and nothing is reported missing or failing."""
    vue_page.console.clear()
    state = vue_page.load_workflow(wg.ui_file(name))
    assert state["missing"] == [] and _missing_node_dialogs(state) == []
    vue_page.page.wait_for_function(f"() => document.querySelectorAll('[data-node-id]').length === "
                                    f"{len(state['nodes'])}", timeout=br.READY_TIMEOUT_MS)
    drawn = vue_page.page.evaluate("() => Object.fromEntries([...document.querySelectorAll('[data-node-id]')]"
                                   ".map(e => [e.getAttribute('data-node-id'), e.innerText]))")
    info = wg.load_snapshot()
    for n in state["nodes"]:
        text = drawn[str(n["id"])]
        assert n["title"] in text, f"{n['title']} is not drawn"
        if n["type"] in PACK_TYPES:
            for wname, spec in wg._inputs(info[n["type"]]):
                advanced = len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("advanced")
                if wg.is_widget(spec) and not advanced:
                    assert wname in text, f"{n['title']}: widget {wname} is not drawn"
    assert vue_page.console.errors == [], vue_page.console.errors
    vue_page.fit_view()
    vue_page.screenshot_canvas(shots / f"{name}_vue.png")
