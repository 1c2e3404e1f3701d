"""The example workflows as graph specs, and converters to ComfyUI's two formats.

    python tests/comfy/workflow_graphs.py http://127.0.0.1:PORT   # a running ComfyUI with the pack
    python tests/comfy/workflow_graphs.py                          # offline, from the snapshot

rewrites workflows/<title>.json (UI format, what users drag in and what the template browser
lists: custom-node templates show their file name as title and description, so the file names are
the human titles of TITLES) and workflows/api/<name>.json (API format for POST /prompt, ``cliprpn
batch``). The thumbnails beside them (workflows/<title>.jpg) are screenshots of the workflows run in
ComfyUI's frontend, written by the browser test (tests/comfy/test_browser.py). With a server URL, the node definitions the files are built
from (OBJECT_INFO_SNAPSHOT: /object_info of the node types used, tooltips left out) are
refreshed first. The tests compare the committed files with a fresh build, check every node's
saved widget values against the node definitions (the pack's own schema without a server, the
live /object_info with one) and the layout, so the files never drift from the nodes."""
from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
EXAMPLE_INPUTS = REPO / "example_inputs"
OBJECT_INFO_SNAPSHOT = Path(__file__).resolve().parent / "object_info_snapshot.json"

# node: (id, class_type, column, row, title, {widget: value}, {input: (src_id, out_slot)}[, {extra}])
# extra: {"models": [{name, url, directory}]} -> node.properties.models (the frontend's Missing
# Models panel offers these downloads when the file is absent).
REALESRGAN = {"name": "RealESRGAN_x4plus.safetensors", "directory": "upscale_models",
              "url": "https://huggingface.co/Comfy-Org/Real-ESRGAN_repackaged/resolve/main/RealESRGAN_x4plus.safetensors"}
SD2_INPAINT = {"name": "512-inpainting-ema.safetensors", "directory": "checkpoints",
               "url": "https://huggingface.co/stabilityai/stable-diffusion-2-inpainting/resolve/main/"
                      "512-inpainting-ema.safetensors"}
LOADER_W = {"checkpoint": "clip_rpn_default.safetensors", "clip": "none (built-in pattern head)", "device": "auto",
            "dtype": "auto"}
FINETUNE_REGIME = "light_streaks"

GRAPHS = {
    "clip_rpn_basic_derain": [
        (2, "CLIPRPNLoader", 0, 0, None, LOADER_W, {}),
        (1, "LoadImage", 0, 1, "Rainy image", {"image": "rainy.png"}, {}),
        (3, "CLIPRPNDerain", 1, 0, None, {}, {"model": (2, 0), "image": (1, 0)}),
        (4, "SaveImage", 2, 0, None, {"filename_prefix": "clip_rpn/derained"}, {"images": (3, 0)}),
    ],
    "clip_rpn_full_graph": [
        (2, "CLIPRPNLoader", 0, 1, None, LOADER_W, {}),
        (1, "LoadImage", 0, 2, "Rainy image", {"image": "rainy.png"}, {}),
        (3, "CLIPRPNRainPerceiver", 1, 0, None, {}, {"model": (2, 0), "image": (1, 0)}),
        (12, "PreviewAny", 1, 1, "Perceived rain pattern", {}, {"source": (3, 1)}),
        (4, "PreviewImage", 1, 2, "Rain pattern scores", {}, {"images": (3, 2)}),
        (5, "CLIPRPNExpertRouter", 2, 0, None, {"top_k": 1, "temperature": 1.0,
                                                "expert_override": "auto (router decides)"},
         {"model": (2, 0), "pattern": (3, 0)}),
        (13, "PreviewAny", 2, 1, "Routing: why this expert", {}, {"source": (5, 1)}),
        (6, "CLIPRPNMaskEstimator", 2, 2, None, {"tile": 0, "overlap": 32}, {"model": (2, 0), "image": (1, 0)}),
        (7, "MaskToImage", 2, 3, None, {}, {"mask": (6, 0)}),
        (9, "CLIPRPNCrossAttentionDerain", 3, 0, None, {"top_k": 1, "temperature": 1.0, "tile": 0, "overlap": 64,
                                                        "self_ensemble": False, "passes": 0, "expert_check": False},
         {"model": (2, 0), "image": (1, 0), "routing": (5, 0), "mask": (6, 0)}),
        (8, "PreviewImage", 3, 1, "Rain mask", {}, {"images": (7, 0)}),
        (11, "SaveImage", 4, 0, "Derained (saved)", {"filename_prefix": "clip_rpn/full_graph"}, {"images": (9, 0)}),
    ],
    "clip_rpn_finetune_pairs": [
        (2, "CLIPRPNLoader", 0, 0, None, LOADER_W, {}),
        (1, "LoadImage", 0, 1, "Clean images (your domain)", {"image": "clean.png"}, {}),
        (3, "CLIPRPNSynthesizeRain", 1, 0, None, {"seed": 0, "regime": FINETUNE_REGIME}, {"image": (1, 0)}),
        (4, "CLIPRPNFinetune", 2, 0, None, {"steps": 30, "learning_rate": 0.0001, "schedule": "mix",
                                            "patch_size": 64, "batch_size": 2, "seed": 0, "save_name": ""},
         {"model": (2, 0), "rainy": (3, 0), "clean": (1, 0)}),
        (8, "PreviewAny", 2, 1, "Fine-tune report", {}, {"source": (4, 2)}),
        (6, "CLIPRPNDerain", 3, 0, None, {}, {"model": (4, 0), "image": (3, 0)}),
        (5, "PreviewImage", 3, 1, "Loss curve", {}, {"images": (4, 1)}),
        (7, "SaveImage", 4, 0, None, {"filename_prefix": "clip_rpn/finetuned"}, {"images": (6, 0)}),
    ],
    "clip_rpn_derain_upscale": [
        (2, "CLIPRPNLoader", 0, 0, None, LOADER_W, {}),
        (1, "LoadImage", 0, 1, "Rainy image", {"image": "rainy.png"}, {}),
        (3, "CLIPRPNDerain", 1, 0, None, {}, {"model": (2, 0), "image": (1, 0)}),
        (4, "UpscaleModelLoader", 1, 1, None, {"model_name": REALESRGAN["name"]}, {}, {"models": [REALESRGAN]}),
        (5, "ImageUpscaleWithModel", 2, 0, None, {}, {"upscale_model": (4, 0), "image": (3, 0)}),
        (6, "SaveImage", 3, 0, None, {"filename_prefix": "clip_rpn/derained_upscaled"}, {"images": (5, 0)}),
    ],
    "clip_rpn_rain_mask_inpaint": [
        (2, "CLIPRPNLoader", 0, 0, None, LOADER_W, {}),
        (1, "LoadImage", 0, 1, "Rainy image", {"image": "rainy.png"}, {}),
        (3, "CLIPRPNMaskEstimator", 1, 0, None, {"tile": 0, "overlap": 32}, {"model": (2, 0), "image": (1, 0)}),
        (5, "CheckpointLoaderSimple", 1, 1, "Inpainting checkpoint", {"ckpt_name": SD2_INPAINT["name"]}, {},
         {"models": [SD2_INPAINT]}),
        (4, "GrowMask", 2, 0, None, {"expand": 2, "tapered_corners": True}, {"mask": (3, 0)}),
        (6, "CLIPTextEncode", 2, 1, "Positive", {"text": "a clear photo, no rain, sharp details"}, {"clip": (5, 1)}),
        (7, "CLIPTextEncode", 2, 2, "Negative", {"text": "rain, rain streaks, water drops, blur"}, {"clip": (5, 1)}),
        (8, "VAEEncodeForInpaint", 3, 0, None, {"grow_mask_by": 4},
         {"pixels": (1, 0), "vae": (5, 2), "mask": (4, 0)}),
        (9, "KSampler", 4, 0, None, {"seed": 0, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0},
         {"model": (5, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (8, 0)}),
        (10, "VAEDecode", 4, 1, None, {}, {"samples": (9, 0), "vae": (5, 2)}),
        (11, "SaveImage", 5, 0, None, {"filename_prefix": "clip_rpn/rain_inpainted"}, {"images": (10, 0)}),
    ],
}

# What the template browser shows: custom-node templates are listed under their file name (title
# and description both come from it; the frontend has no metadata file for them), so the UI files
# are named with these titles. No '-' or '_': the description shows them as spaces.
TITLES = {
    "clip_rpn_basic_derain": "CLIP RPN 1, Derain a rainy photo",
    "clip_rpn_full_graph": "CLIP RPN 2, Step by step, see why the router chose an expert",
    "clip_rpn_derain_upscale": "CLIP RPN 3, Derain then upscale 4x",
    "clip_rpn_rain_mask_inpaint": "CLIP RPN 4, Rain mask then SD inpainting",
    "clip_rpn_finetune_pairs": "CLIP RPN 5, Fine tune on your own clean photos",
}

DESCRIPTIONS = {
    "clip_rpn_basic_derain": "Basic deraining: load an image, derain it with the shipped model, save.",
    "clip_rpn_full_graph": "Perceiver -> router -> mask -> cross-attention derain, with the perceived pattern, the "
                           "routing and the rain mask shown.",
    "clip_rpn_finetune_pairs": "Make rainy/clean pairs with Synthesize Rain, fine-tune with a loss schedule, derain.",
    "clip_rpn_derain_upscale": "Derain, then upscale 4x with a built-in upscale-model node, then save.",
    "clip_rpn_rain_mask_inpaint": "Rain mask -> inpaint the rainy areas with built-in SD inpainting nodes.",
}

# A Note node (UI only: the frontend's own node, never sent to the server) per workflow: (column, row, text)
NOTE_ID = 50
NOTES = {
    "clip_rpn_basic_derain": (1, 1, (
        "Derain a rainy photo\n\n"
        "Queue the workflow: the example image rainy.png (a drawn scene with synthetic rain, copied into "
        "ComfyUI's input folder by the pack) is derained by the shipped model and saved under "
        "output/clip_rpn/. Load your own photo in 'Rainy image'.\n\n"
        "The CLIP-RPN Derain node perceives the rain, routes it to one expert and restores the image in one "
        "step; see template 2 for the same pipeline node by node.")),
    "clip_rpn_full_graph": (0, 0, (
        "Step by step\n\n"
        "Rain Perceiver: what kind of rain (density, orientation, intensity, form); the text is shown in "
        "'Perceived rain pattern', the scores in the bar chart.\n"
        "Expert Router: which expert restores it; 'Routing: why this expert' shows the weights.\n"
        "Rain Mask Estimator: where the rain is (shown as 'Rain mask').\n"
        "Cross-Attention Derain: restores the image, using the routing and the mask.\n\n"
        "Try expert_override on the router to see what another expert does.")),
    "clip_rpn_derain_upscale": (1, 2, (
        "Derain, then upscale\n\n"
        "Rain streaks are removed before upscaling (an upscaler would sharpen them). Needs the RealESRGAN x4plus "
        "upscaler in models/upscale_models: when it is missing, ComfyUI's Missing Models panel offers the "
        "download (Comfy-Org/Real-ESRGAN_repackaged on Hugging Face). Any other upscale model works too.")),
    "clip_rpn_rain_mask_inpaint": (1, 2, (
        "Rain mask, then inpainting\n\n"
        "The rain mask (grown by 2 px) marks the pixels an SD inpainting model repaints. Needs an inpainting "
        "checkpoint in models/checkpoints: the Missing Models panel offers Stable Diffusion 2 inpainting "
        "(512-inpainting-ema.safetensors, stabilityai on Hugging Face). Runs best on a GPU; CLIP-RPN Derain "
        "alone (template 1) is the faster way to remove rain.")),
    "clip_rpn_finetune_pairs": (1, 1, (
        "Fine-tune on your own clean photos\n\n"
        "Synthesize Rain adds rain to your clean images (the example: clean.png), Loss-scheduled Fine-tune "
        "trains a copy of the model on the pairs (30 quick steps here; a few hundred for real use; set "
        "save_name to keep the result), and the fine-tuned copy derains the synthetic rainy image.\n\n"
        "Why an earlier version of this demo looked hazy and colour-shifted: the regime was 'random', and "
        "seed 0 draws 'heavy_streaks' for a single image. The heavy_streaks and veil regimes also blend a grey "
        "veil (airlight 0.75-1.0; up to about 20 % for heavy streaks, 20-55 % for veil) over the whole image to imitate "
        "rain accumulation; the model removes only part of such a veil, so the result stays lighter and less "
        "saturated than the clean input. The fine-tune is not the cause: it brings the result closer to the "
        "clean image (measured on the example: Y-PSNR 27.4 dB with the shipped model, 28.3 after the 30 steps; "
        "light_streaks: 44.5 / 44.8). The demo now uses 'light_streaks'; choose heavy_streaks or veil to train "
        "on those, and expect a faint veil to remain.")),
}

FILE_COMBOS = {("LoadImage", "image"), ("UpscaleModelLoader", "model_name"), ("CheckpointLoaderSimple", "ckpt_name"),
               ("CLIPRPNLoader", "checkpoint"), ("CLIPRPNLoader", "clip")}
VIRTUAL = {"Note", "MarkdownNote"}  # frontend-only nodes: no server definition, not in the API format
TITLE_H = 30  # LiteGraph's title bar, drawn above a node's pos
GAP_X, GAP_Y, LEFT, TOP = 70, 50, 40, 80
DS = {"scale": 0.75, "offset": [40, 60]}
# node body sizes [w, h]: large enough for every widget and for the image a node shows after a run
# (the image outputs, and the pack's long nodes, which show a preview while they work: the frontend
# keeps it on the node and grows a node too small for it, over its neighbours; measured in Chromium)
SIZES = {
    "LoadImage": (340, 420), "PreviewImage": (360, 340), "SaveImage": (380, 400), "PreviewAny": (360, 170),
    "Note": (360, 260), "CLIPRPNLoader": (340, 150), "CLIPRPNDerain": (320, 330), "CLIPRPNRainPerceiver": (300, 100),
    "CLIPRPNExpertRouter": (320, 130), "CLIPRPNMaskEstimator": (320, 340), "CLIPRPNCrossAttentionDerain": (340, 500),
    "CLIPRPNSynthesizeRain": (300, 110), "CLIPRPNFinetune": (340, 520), "MaskToImage": (240, 50),
    "UpscaleModelLoader": (340, 60), "ImageUpscaleWithModel": (280, 60), "GrowMask": (280, 90),
    "CheckpointLoaderSimple": (340, 100), "CLIPTextEncode": (360, 150), "VAEEncodeForInpaint": (280, 100),
    "KSampler": (320, 270), "VAEDecode": (220, 60),
}


THUMB_W, THUMB_H = 600, 400  # the screenshot thumbnails (3:2, the browser test's canvas clip scaled down)
THUMB_TAG = "ComfyUI frontend screenshot"  # starts the JPEG comment of every thumbnail


def ui_file(name: str) -> Path:
    return WORKFLOWS / f"{TITLES[name]}.json"


def thumb_file(name: str) -> Path:
    return WORKFLOWS / f"{TITLES[name]}.jpg"


def api_file(name: str) -> Path:
    return WORKFLOWS / "api" / f"{name}.json"


def load_snapshot() -> dict:
    return json.loads(OBJECT_INFO_SNAPSHOT.read_text())


def snapshot_of(object_info: dict) -> dict:
    """The node definitions the workflows use, tooltips left out (a small, stable file)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("tooltip", "output_tooltips")}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    keep = ("input", "input_order", "output", "output_name", "display_name", "name")
    used = sorted({n[1] for g in GRAPHS.values() for n in g})
    snap = {cls: strip({k: object_info[cls][k] for k in keep if k in object_info[cls]}) for cls in used}
    for cls, iname in FILE_COMBOS:  # choices that list the files of one installation
        for sect in snap.get(cls, {}).get("input", {}).values():
            if iname in sect:
                spec = sect[iname]
                if isinstance(spec[0], list):
                    spec[0] = []
                elif len(spec) > 1 and "options" in spec[1]:
                    spec[1]["options"] = []
    return snap


def _inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order", {})
    out = []
    for sect in ("required", "optional"):
        for name in order.get(sect, list(info["input"].get(sect, {}))):
            out.append((name, info["input"][sect][name]))
    return out


def is_widget(spec: list) -> bool:
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _extras(name: str, spec: list) -> list:
    """Values the frontend stores after a widget's own value: the seed control ('control after
    generate') of an INT that asks for it or, when it says nothing, is named seed/noise_seed; the
    upload button of an image combo."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
        return ["fixed"]
    if opts.get("image_upload"):
        return ["image"]
    return []


def _layout(name: str, object_info: dict) -> dict[int, tuple[list[int], list[int]]]:
    """Left-to-right columns, each as wide as its widest node; nodes stacked in a column with a
    title bar and a gap between them. -> {node id: (pos, size)}"""
    items = [(n[0], n[1], n[2], n[3]) for n in GRAPHS[name]]
    if name in NOTES:
        col, row, _ = NOTES[name]
        items.append((NOTE_ID, "Note", col, row))
    cols = sorted({c for _, _, c, _ in items})
    widths = {c: max(SIZES[cls][0] for _, cls, cc, _ in items if cc == c) for c in cols}
    out, x = {}, LEFT
    for c in cols:
        y = TOP
        for nid, cls, _, _row in sorted((i for i in items if i[2] == c), key=lambda i: i[3]):
            w, h = SIZES[cls]
            out[nid] = ([x, y], [w, h])
            y += h + GAP_Y + TITLE_H
        x += widths[c] + GAP_X
    return out


def build(name: str, object_info: dict) -> tuple[dict, dict]:
    graph = [n if len(n) == 8 else (*n, {}) for n in GRAPHS[name]]
    api, nodes = {}, []
    by_id = {n[0]: n for n in graph}
    out_links: dict[tuple[int, int], list[int]] = {}
    link_id = 0
    link_rows = []
    place = _layout(name, object_info)
    for nid, cls, col, row, title, widgets, ins, _extra in sorted(graph):
        for iname, (src, slot) in ins.items():
            link_id += 1
            stype = object_info[by_id[src][1]]["output"][slot]
            link_rows.append([link_id, src, slot, nid, iname, stype])
            out_links.setdefault((src, slot), []).append(link_id)
    for nid, cls, col, row, title, widgets, ins, extra in sorted(graph):
        info = object_info[cls]
        api_inputs, ui_inputs, wvals = {}, [], []
        for iname, spec in _inputs(info):
            if iname in ins:
                api_inputs[iname] = [str(ins[iname][0]), ins[iname][1]]
                lid = next(r[0] for r in link_rows if r[3] == nid and r[4] == iname)
                t = spec[0] if not isinstance(spec[0], list) else "COMBO"
                ui_inputs.append({"name": iname, "type": t, "link": lid})
            elif is_widget(spec):
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                val = widgets.get(iname, opts.get("default"))
                if val is None and isinstance(spec[0], list):
                    val = spec[0][0]
                api_inputs[iname] = val
                wvals.append(val)
                wvals.extend(_extras(iname, spec))
        unknown = set(widgets) - set(api_inputs)
        if unknown:
            raise KeyError(f"{name}: node {nid} ({cls}) has no widgets {sorted(unknown)}")
        api[str(nid)] = {"class_type": cls, "inputs": api_inputs, "_meta": {"title": title or info["display_name"]}}
        outputs = [{"name": oname, "type": otype, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (oname, otype) in enumerate(zip(info["output_name"], info["output"]))]
        pos, size = place[nid]
        props = {"Node name for S&R": cls}
        if extra.get("models"):
            props["models"] = [dict(m) for m in extra["models"]]
        node = {"id": nid, "type": cls, "pos": pos, "size": size, "flags": {}, "order": 0, "mode": 0,
                "inputs": ui_inputs, "outputs": outputs, "properties": props, "widgets_values": wvals}
        if title:
            node["title"] = title
        nodes.append(node)
    # execution order for the UI: a topological order of the graph
    order, done = [], set()
    while len(order) < len(graph):
        for nid, *_rest, ins, _extra in sorted(graph):
            if nid not in done and all(src in done for src, _ in ins.values()):
                order.append(nid)
                done.add(nid)
    for n in nodes:
        n["order"] = order.index(n["id"])
    if name in NOTES:
        pos, size = place[NOTE_ID]
        nodes.append({"id": NOTE_ID, "type": "Note", "pos": pos, "size": size, "flags": {}, "order": len(order),
                      "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow",
                      "properties": {}, "widgets_values": [NOTES[name][2]], "color": "#432", "bgcolor": "#653"})
    links = [[lid, src, slot, dst, next(i for i, x in enumerate(next(n for n in nodes if n["id"] == dst)["inputs"])
                                        if x["name"] == iname), t]
             for lid, src, slot, dst, iname, t in link_rows]
    ui = {"id": f"clip-rpn-{name}", "revision": 0, "last_node_id": max([*by_id, NOTE_ID if name in NOTES else 0]),
          "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [], "config": {},
          "extra": {"info": {"name": TITLES[name], "description": DESCRIPTIONS[name]}, "ds": DS},
          "version": 0.4}
    return ui, api


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Independent UI -> API conversion (what the frontend does), used to check the UI files."""
    links = {lk[0]: lk for lk in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL:
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        vals = list(node.get("widgets_values", []))
        inputs = {}
        for iname, spec in _inputs(info):
            if iname in linked:
                lk = links[linked[iname]]
                inputs[iname] = [str(lk[1]), lk[2]]
                if is_widget(spec):  # a linked widget still owns a value slot
                    vals.pop(0)
                    del vals[:len(_extras(iname, spec))]
            elif is_widget(spec):
                inputs[iname] = vals.pop(0)
                del vals[:len(_extras(iname, spec))]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def write_all(object_info: dict | None = None, out: Path = WORKFLOWS):
    if object_info is not None:
        OBJECT_INFO_SNAPSHOT.write_text(json.dumps(snapshot_of(object_info), indent=1, sort_keys=True) + "\n")
    info = load_snapshot()
    (out / "api").mkdir(parents=True, exist_ok=True)
    for name in GRAPHS:
        ui, api = build(name, info)
        (out / f"{TITLES[name]}.json").write_text(json.dumps(ui, indent=2) + "\n")
        (out / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")


if __name__ == "__main__":
    oi = None
    if len(sys.argv) > 1:
        with urllib.request.urlopen(sys.argv[1].rstrip("/") + "/object_info", timeout=60) as r:
            oi = json.loads(r.read())
    write_all(oi)
    print("wrote", ", ".join(TITLES.values()))
