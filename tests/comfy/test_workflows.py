"""The example workflows as a user meets them in the ComfyUI UI (issue 23), checked on the JSON.

Without a server: every saved node's widget values against the node definitions (this pack's
nodes from their own schemas, read through pack_schema; core nodes from the committed
object_info snapshot), layout (no overlap, left to right, top row below the tab bar), template
titles and thumbnails, example inputs, model download URLs, text outputs shown, the fine-tune
demo's regime. With COMFYUI_DIR: the same widget check against the live /object_info, and the
example inputs installed into the server's input folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pack_schema as ps
import pytest
import workflow_graphs as wg
from PIL import Image

REPO = wg.REPO
NAMES = sorted(wg.GRAPHS)
MB_HOSTS = ("https://huggingface.co/", "https://civitai.com/")  # what the frontend offers to download
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")
MODEL_WIDGETS = {"UpscaleModelLoader": ("model_name", "upscale_models"),
                 "CheckpointLoaderSimple": ("ckpt_name", "checkpoints")}
# nodes that show an image after a run: the image outputs and the pack's nodes with a progress preview
IMAGE_NODES = ("LoadImage", "PreviewImage", "SaveImage", "CLIPRPNDerain", "CLIPRPNMaskEstimator",
               "CLIPRPNCrossAttentionDerain", "CLIPRPNFinetune")


def ui(name):
    return json.loads(wg.ui_file(name).read_text())


def api(name):
    return json.loads(wg.api_file(name).read_text())


@pytest.fixture(scope="module")
def pack_info(tmp_path_factory):
    return ps.pack_object_info(tmp_path_factory.mktemp("pack_schema"))


@pytest.fixture(scope="module")
def snapshot():
    return wg.load_snapshot()


def widget_problems(node: dict, info: dict, check_options: bool = True) -> list[str]:
    """Saved values of one UI node that do not fit the widgets the frontend builds for it."""
    linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None and "widget" not in i}
    want = [w for w in ps.frontend_widgets(info) if w[0] not in linked]
    vals = node.get("widgets_values", [])
    where = f"node {node['id']} ({node['type']})"
    if len(vals) != len(want):
        return [f"{where}: {len(vals)} saved values for {len(want)} widgets {[f'{n}:{k}' for n, k, _ in want]}"]
    return [f"{where} {n}: {p}" for (n, k, o), v in zip(want, vals)
            if (p := ps.value_problem(v, k, o, check_options))]


# -- widget values ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_our_nodes_saved_values_match_the_pack_schema(name, pack_info):
    """Each CLIP-RPN node's widgets_values line up with the widgets the frontend makes from the
    node's own schema, seed controls included (the Fine-tune node's seed has one: it is named
    'seed'), with values of the right type, in range and among the choices."""
    problems = []
    for node in ui(name)["nodes"]:
        if node["type"] in pack_info:
            problems += widget_problems(node, pack_info[node["type"]])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_core_nodes_saved_values_match_the_snapshot(name, snapshot):
    problems = []
    for node in ui(name)["nodes"]:
        if node["type"] in wg.VIRTUAL:
            assert len(node["widgets_values"]) == 1 and isinstance(node["widgets_values"][0], str)
        elif not node["type"].startswith("CLIPRPN"):
            problems += widget_problems(node, snapshot[node["type"]], check_options=False)
    assert not problems, "\n".join(problems)


def test_frontend_widget_rule_gives_seeds_a_control():
    """The rule itself: a seed control after an INT that asks for it or is named seed/noise_seed,
    none when the definition says control_after_generate=False."""
    info = {"input": {"required": {"seed": ["INT", {}], "noise_seed": ["INT", {}], "n": ["INT", {}],
                                   "c": ["INT", {"control_after_generate": True}],
                                   "seed2": ["INT", {"control_after_generate": False}],
                                   "img": [["a.png"], {"image_upload": True}], "x": ["IMAGE", {}]}}}
    kinds = [(n, k) for n, k, _ in ps.frontend_widgets(info)]
    assert kinds == [("seed", "INT"), ("seed", "CONTROL"), ("noise_seed", "INT"), ("noise_seed", "CONTROL"),
                     ("n", "INT"), ("c", "INT"), ("c", "CONTROL"), ("seed2", "INT"), ("img", "COMBO"),
                     ("img", "UPLOAD")]
    # the old fine-tune file: 7 values for the 8 widgets
    node = {"id": 4, "type": "CLIPRPNFinetune", "inputs": [], "widgets_values": [30, 1e-4, "mix", 64, 2, 0, ""]}
    fine = {"input": {"required": {"steps": ["INT", {}], "learning_rate": ["FLOAT", {}],
                                   "schedule": ["COMBO", {"options": ["mix"]}], "patch_size": ["INT", {}],
                                   "batch_size": ["INT", {}], "seed": ["INT", {}], "save_name": ["STRING", {}]}}}
    assert widget_problems(node, fine) and "7 saved values for 8 widgets" in widget_problems(node, fine)[0]


def test_snapshot_agrees_with_the_pack_schema(pack_info, snapshot):
    """The committed object_info snapshot the files are built from lists our nodes' widgets as
    their schemas do (names, kinds, defaults), so it cannot go stale for this pack."""
    for node_id, info in pack_info.items():
        if node_id not in snapshot:
            continue
        ours = [(n, k, o.get("default")) for n, k, o in ps.frontend_widgets(info)]
        snap = [(n, k, o.get("default")) for n, k, o in ps.frontend_widgets(snapshot[node_id])]
        assert ours == snap, node_id
        assert info["output"] == snapshot[node_id]["output"]


@pytest.mark.parametrize("name", NAMES)
def test_files_are_built_from_the_specs(name, snapshot):
    """The committed UI and API files are what the generator builds (no hand edits, no drift),
    and the UI file converts to the API copy."""
    built_ui, built_api = wg.build(name, snapshot)
    assert built_ui == ui(name), "stale: rerun python tests/comfy/workflow_graphs.py"
    assert built_api == api(name)
    assert wg.ui_to_api(ui(name), snapshot) == wg.strip_meta(api(name))


# -- layout ----------------------------------------------------------------------------------

def rects(wf):
    """Each node's rectangle on the canvas, its title bar (above pos) included."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - wg.TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in wf["nodes"]}


@pytest.mark.parametrize("name", NAMES)
def test_nodes_do_not_overlap_and_images_have_room(name):
    wf = ui(name)
    r = rects(wf)
    ids = sorted(r)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            ra, rb = r[a], r[b]
            overlap = ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]
            assert not overlap, f"nodes {a} and {b} overlap: {ra} {rb}"
    for n in wf["nodes"]:
        if n["type"] in IMAGE_NODES:  # the image shown after a run fits inside the node
            assert n["size"][0] >= 300 and n["size"][1] >= 300, n
        if n["type"] in ("PreviewAny", "Note"):
            assert n["size"][0] >= 300 and n["size"][1] >= 150, n


@pytest.mark.parametrize("name", NAMES)
def test_graph_reads_left_to_right_and_opens_below_the_tab_bar(name):
    wf = ui(name)
    pos = {n["id"]: n["pos"] for n in wf["nodes"]}
    for lk in wf["links"]:
        assert pos[lk[1]][0] <= pos[lk[3]][0], f"link {lk} goes right to left"
    ds = wf["extra"]["ds"]
    top = min(y for _, y, _, _ in rects(wf).values())
    left = min(x for x, _, _, _ in rects(wf).values())
    assert (top + ds["offset"][1]) * ds["scale"] >= 60, "the top row is under the tab bar"
    assert (left + ds["offset"][0]) * ds["scale"] >= 0
    assert 0.5 <= ds["scale"] <= 1.0


# -- template browser --------------------------------------------------------------------------

def test_templates_have_human_titles_and_screenshot_thumbnails():
    """The template browser lists custom-node templates by file name (title and description), so
    the files carry human titles; each has a thumbnail that is a screenshot of the workflow in
    ComfyUI's frontend (written by tests/comfy/test_browser.py, which says in the JPEG comment
    whether the workflow ran). The API copies are not listed (the server lists only workflows/*.json)."""
    listed = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert listed == sorted(wg.TITLES.values())
    for name, title in wg.TITLES.items():
        assert " " in title and "_" not in title and title[0].isupper(), title
        thumb = Image.open(wg.thumb_file(name))
        assert thumb.format == "JPEG" and thumb.size == (wg.THUMB_W, wg.THUMB_H)
        assert wg.thumb_file(name).stat().st_size < 150_000
        comment = thumb.info.get("comment", b"").decode()
        assert comment.startswith(f"{wg.THUMB_TAG}: {title}"), comment
        assert np.asarray(thumb.convert("RGB")).std() > 12  # not a blank page
    for name in NAMES:
        assert ui(name)["extra"]["info"]["name"] == wg.TITLES[name]


# -- example inputs ----------------------------------------------------------------------------

def test_every_loaded_image_is_a_shipped_example_input():
    shipped = {p.name for p in wg.EXAMPLE_INPUTS.glob("*.png")}
    assert shipped == {"rainy.png", "clean.png"}
    for p in wg.EXAMPLE_INPUTS.glob("*.png"):
        assert p.stat().st_size < 300_000, p
        assert min(Image.open(p).size) >= 128
    for name in NAMES:
        for n in ui(name)["nodes"]:
            if n["type"] == "LoadImage":
                assert n["widgets_values"][0] in shipped, (name, n["widgets_values"])


def test_example_inputs_are_copied_into_the_input_folder(tmp_path):
    """At load the pack copies example_inputs/*.png into ComfyUI's input folder (where Load Image
    looks), never replacing a file of the same name, and survives a folder it cannot write."""
    import importlib

    from packutil import PACK_NAME
    with ps.fake_comfy(tmp_path) as mods:
        host = importlib.import_module(f"{PACK_NAME}.nodes._host")
        inp = tmp_path / "input"
        inp.mkdir()
        (inp / "clean.png").write_bytes(b"the user's own")
        assert host.install_example_inputs() == ["rainy.png"]
        assert (inp / "rainy.png").read_bytes() == (wg.EXAMPLE_INPUTS / "rainy.png").read_bytes()
        assert (inp / "clean.png").read_bytes() == b"the user's own"
        assert host.install_example_inputs() == []
        assert not list(inp.glob(".*part"))
        mods["folder_paths"].get_input_directory = lambda: (_ for _ in ()).throw(RuntimeError("no input dir"))
        assert host.install_example_inputs() == []


# -- models, text outputs, the fine-tune demo --------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_third_party_models_carry_download_urls(name):
    """A node that loads a third-party model file names it in properties.models with a URL the
    frontend's Missing Models panel downloads (Hugging Face / Civitai, a model-file suffix) and
    the folder it goes to."""
    for n in ui(name)["nodes"]:
        if n["type"] not in MODEL_WIDGETS:
            continue
        _widget, folder = MODEL_WIDGETS[n["type"]]
        fname = n["widgets_values"][0]
        models = {m["name"]: m for m in n["properties"].get("models", [])}
        assert fname in models, f"{name}: node {n['id']} names {fname} with no download URL"
        m = models[fname]
        assert m["directory"] == folder
        assert m["url"].startswith(MB_HOSTS) and m["url"].endswith(MODEL_SUFFIXES), m["url"]
        assert m["url"].rsplit("/", 1)[1].split("?")[0] == fname


@pytest.mark.parametrize("name", NAMES)
def test_text_outputs_are_shown(name, pack_info):
    """Every STRING output of a CLIP-RPN node in a workflow (perceiver summary, router summary,
    fine-tune report) feeds a node that shows it (PreviewAny, core 'Preview as Text')."""
    wf = ui(name)
    types = {n["id"]: n["type"] for n in wf["nodes"]}
    for n in wf["nodes"]:
        if n["type"] not in pack_info:
            continue
        for o in n["outputs"]:
            if o["type"] == "STRING":
                shown = [lk for lk in wf["links"] if lk[1] == n["id"] and lk[2] == o["slot_index"]
                         and types[lk[3]] == "PreviewAny"]
                assert shown, f"{name}: {n['type']}.{o['name']} is wired to nothing that shows it"


def test_finetune_demo_uses_light_rain_and_explains_the_veil():
    wf = ui("clip_rpn_finetune_pairs")
    synth = next(n for n in wf["nodes"] if n["type"] == "CLIPRPNSynthesizeRain")
    assert synth["widgets_values"][2] == "light_streaks"
    note = next(n for n in wf["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "veil" in note and "heavy_streaks" in note


def test_heavy_and_veil_synthesis_add_a_veil_light_streaks_do_not():
    """What the note says: light streaks leave the pixels between streaks alone; heavy streaks
    and veil blend a grey veil over the whole image (measured on the example scene)."""
    import torch

    from cliprpn_core.patterns import EXPERTS
    from cliprpn_core.synthesis import synthesize
    clean = torch.from_numpy(np.array(Image.open(wg.EXAMPLE_INPUTS / "clean.png").convert("RGB")))
    clean = clean.float().div(255).permute(2, 0, 1)[None]
    contrast = {}
    for regime in ("light_streaks", "heavy_streaks", "veil"):
        s = synthesize(clean, torch.Generator().manual_seed(0), regime=[EXPERTS.index(regime)])
        between = s.mask[0, 0] < 0.02  # pixels with no streak on them
        contrast[regime] = float(s.rainy[0][:, between].std() / clean[0][:, between].std())
    print(contrast)
    assert contrast["light_streaks"] > 0.995  # untouched between the streaks
    assert contrast["heavy_streaks"] < 0.995 and contrast["veil"] < contrast["heavy_streaks"]  # a veil: less contrast


# -- against a live ComfyUI (COMFYUI_DIR) ------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_saved_values_match_the_live_object_info(server, name):
    info = server.object_info()
    problems = []
    for node in ui(name)["nodes"]:
        if node["type"] in wg.VIRTUAL:
            continue
        assert node["type"] in info, f"{node['type']} is not a node of this ComfyUI"
        problems += widget_problems(node, info[node["type"]], check_options=node["type"] != "UpscaleModelLoader"
                                    and node["type"] != "CheckpointLoaderSimple")
    assert not problems, "\n".join(problems)


def test_the_server_has_the_example_inputs(server):
    opts = server.object_info()["LoadImage"]["input"]["required"]["image"][0]
    assert {"rainy.png", "clean.png"} <= set(opts)
    assert "example inputs" in server.log() or (Path(server.base) / "input" / "rainy.png").is_file()
