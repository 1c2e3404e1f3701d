"""The example workflows as graph specs, and converters to ComfyUI's two formats.

``python tests/comfy/workflow_graphs.py http://127.0.0.1:PORT`` (a running ComfyUI with the pack
loaded) rewrites workflows/*.json (UI format, what users drag in), workflows/*.jpg (thumbnails)
and workflows/api/*.json (API format for POST /prompt). The tests convert the committed UI files
back to API format with the server's /object_info and compare, so the two never drift apart."""
from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"

# node: (id, class_type, column, row, title, {widget: value}, {input: (src_id, out_slot)})
GRAPHS = {
    "clip_rpn_basic_derain": [
        (1, "LoadImage", 0, 0, "Rainy image", {"image": "rainy.png"}, {}),
        (2, "CLIPRPNLoader", 0, 1, None, {"checkpoint": "clip_rpn_default.safetensors",
                                          "clip": "none (built-in pattern head)", "device": "auto", "dtype": "auto"}, {}),
        (3, "CLIPRPNDerain", 1, 0, None, {}, {"model": (2, 0), "image": (1, 0)}),
        (4, "SaveImage", 2, 0, None, {"filename_prefix": "clip_rpn/derained"}, {"images": (3, 0)}),
    ],
    "clip_rpn_full_graph": [
        (1, "LoadImage", 0, 0, "Rainy image", {"image": "rainy.png"}, {}),
        (2, "CLIPRPNLoader", 0, 1, None, {"checkpoint": "clip_rpn_default.safetensors",
                                          "clip": "none (built-in pattern head)", "device": "auto", "dtype": "auto"}, {}),
        (3, "CLIPRPNRainPerceiver", 1, 0, None, {}, {"model": (2, 0), "image": (1, 0)}),
        (4, "PreviewImage", 2, 0, "Rain pattern scores", {}, {"images": (3, 2)}),
        (5, "CLIPRPNExpertRouter", 2, 1, None, {"top_k": 1, "temperature": 1.0,
                                                "expert_override": "auto (router decides)"},
         {"model": (2, 0), "pattern": (3, 0)}),
        (6, "CLIPRPNMaskEstimator", 1, 2, None, {"tile": 0, "overlap": 32}, {"model": (2, 0), "image": (1, 0)}),
        (7, "MaskToImage", 2, 2, None, {}, {"mask": (6, 0)}),
        (8, "PreviewImage", 3, 2, "Rain mask", {}, {"images": (7, 0)}),
        (9, "CLIPRPNCrossAttentionDerain", 3, 0, None, {"top_k": 1, "temperature": 1.0, "tile": 0, "overlap": 64,
                                                        "self_ensemble": False, "passes": 0, "expert_check": False},
         {"model": (2, 0), "image": (1, 0), "routing": (5, 0), "mask": (6, 0)}),
        (10, "PreviewImage", 4, 0, "Derained", {}, {"images": (9, 0)}),
        (11, "SaveImage", 4, 1, None, {"filename_prefix": "clip_rpn/full_graph"}, {"images": (9, 0)}),
    ],
    "clip_rpn_finetune_pairs": [
        (1, "LoadImage", 0, 0, "Clean images (your domain)", {"image": "clean.png"}, {}),
        (2, "CLIPRPNLoader", 0, 1, None, {"checkpoint": "clip_rpn_default.safetensors",
                                          "clip": "none (built-in pattern head)", "device": "auto", "dtype": "auto"}, {}),
        (3, "CLIPRPNSynthesizeRain", 1, 0, None, {"seed": 0, "regime": "random"}, {"image": (1, 0)}),
        (4, "CLIPRPNFinetune", 2, 0, None, {"steps": 30, "learning_rate": 0.0001, "schedule": "mix",
                                            "patch_size": 64, "batch_size": 2, "seed": 0, "save_name": ""},
         {"model": (2, 0), "rainy": (3, 0), "clean": (1, 0)}),
        (5, "PreviewImage", 3, 1, "Loss curve", {}, {"images": (4, 1)}),
        (6, "CLIPRPNDerain", 3, 0, None, {}, {"model": (4, 0), "image": (3, 0)}),
        (7, "SaveImage", 4, 0, None, {"filename_prefix": "clip_rpn/finetuned"}, {"images": (6, 0)}),
    ],
    "clip_rpn_derain_upscale": [
        (1, "LoadImage", 0, 0, "Rainy image", {"image": "rainy.png"}, {}),
        (2, "CLIPRPNLoader", 0, 1, None, {"checkpoint": "clip_rpn_default.safetensors",
                                          "clip": "none (built-in pattern head)", "device": "auto", "dtype": "auto"}, {}),
        (3, "CLIPRPNDerain", 1, 0, None, {}, {"model": (2, 0), "image": (1, 0)}),
        (4, "UpscaleModelLoader", 1, 1, None, {"model_name": "RealESRGAN_x2.safetensors"}, {}),
        (5, "ImageUpscaleWithModel", 2, 0, None, {}, {"upscale_model": (4, 0), "image": (3, 0)}),
        (6, "SaveImage", 3, 0, None, {"filename_prefix": "clip_rpn/derained_upscaled"}, {"images": (5, 0)}),
    ],
    "clip_rpn_rain_mask_inpaint": [
        (1, "LoadImage", 0, 0, "Rainy image", {"image": "rainy.png"}, {}),
        (2, "CLIPRPNLoader", 0, 1, None, {"checkpoint": "clip_rpn_default.safetensors",
                                          "clip": "none (built-in pattern head)", "device": "auto", "dtype": "auto"}, {}),
        (3, "CLIPRPNMaskEstimator", 1, 0, None, {"tile": 0, "overlap": 32}, {"model": (2, 0), "image": (1, 0)}),
        (4, "GrowMask", 2, 0, None, {"expand": 2, "tapered_corners": True}, {"mask": (3, 0)}),
        (5, "CheckpointLoaderSimple", 0, 2, "Inpainting checkpoint",
         {"ckpt_name": "sd15_inpainting.safetensors"}, {}),
        (6, "CLIPTextEncode", 1, 2, "Positive", {"text": "a clear photo, no rain, sharp details"}, {"clip": (5, 1)}),
        (7, "CLIPTextEncode", 1, 3, "Negative", {"text": "rain, rain streaks, water drops, blur"}, {"clip": (5, 1)}),
        (8, "VAEEncodeForInpaint", 3, 0, None, {"grow_mask_by": 4},
         {"pixels": (1, 0), "vae": (5, 2), "mask": (4, 0)}),
        (9, "KSampler", 4, 0, None, {"seed": 0, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0},
         {"model": (5, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (8, 0)}),
        (10, "VAEDecode", 5, 0, None, {}, {"samples": (9, 0), "vae": (5, 2)}),
        (11, "SaveImage", 6, 0, None, {"filename_prefix": "clip_rpn/rain_inpainted"}, {"images": (10, 0)}),
    ],
}

DESCRIPTIONS = {
    "clip_rpn_basic_derain": "Basic deraining: load an image, derain it with the shipped model, save.",
    "clip_rpn_full_graph": "Perceiver -> router -> mask -> cross-attention derain, with previews of pattern, mask, result.",
    "clip_rpn_finetune_pairs": "Make rainy/clean pairs with Synthesize Rain, fine-tune with a loss schedule, derain.",
    "clip_rpn_derain_upscale": "Derain, then upscale with a built-in upscale-model node, then save.",
    "clip_rpn_rain_mask_inpaint": "Rain mask -> inpaint the rainy areas with built-in SD inpainting nodes.",
}


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


def _extras(spec: list) -> list:
    """Values the frontend stores after a widget's own value."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("control_after_generate"):
        return ["fixed"]
    if opts.get("image_upload"):
        return ["image"]
    return []


def build(name: str, object_info: dict) -> tuple[dict, dict]:
    graph = GRAPHS[name]
    api, nodes, links = {}, [], []
    by_id = {n[0]: n for n in graph}
    out_links: dict[tuple[int, int], list[int]] = {}
    link_id = 0
    link_rows = []
    for nid, cls, col, row, title, widgets, ins in graph:
        info = object_info[cls]
        for iname, (src, slot) in ins.items():
            link_id += 1
            stype = object_info[by_id[src][1]]["output"][slot]
            link_rows.append([link_id, src, slot, nid, iname, stype])
            out_links.setdefault((src, slot), []).append(link_id)
    for nid, cls, col, row, title, widgets, ins in graph:
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
                wvals.extend(_extras(spec))
        unknown = set(widgets) - set(api_inputs)
        if unknown:
            raise KeyError(f"{name}: node {nid} ({cls}) has no widgets {sorted(unknown)}")
        api[str(nid)] = {"class_type": cls, "inputs": api_inputs, "_meta": {"title": title or info["display_name"]}}
        outputs = [{"name": oname, "type": otype, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (oname, otype) in enumerate(zip(info["output_name"], info["output"]))]
        node = {"id": nid, "type": cls, "pos": [40 + col * 360, 40 + row * 260], "size": [320, 200],
                "flags": {}, "order": 0, "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                "properties": {"Node name for S&R": cls}, "widgets_values": wvals}
        if title:
            node["title"] = title
        nodes.append(node)
    # execution order for the UI: a topological order of the graph
    order, done = [], set()
    while len(order) < len(graph):
        for nid, _c, _x, _y, _t, _w, ins in graph:
            if nid not in done and all(src in done for src, _ in ins.values()):
                order.append(nid)
                done.add(nid)
    for n in nodes:
        n["order"] = order.index(n["id"])
    links = [[lid, src, slot, dst, next(i for i, x in enumerate(next(n for n in nodes if n["id"] == dst)["inputs"])
                                        if x["name"] == iname), t]
             for lid, src, slot, dst, iname, t in link_rows]
    ui = {"id": f"clip-rpn-{name}", "revision": 0, "last_node_id": max(by_id), "last_link_id": link_id,
          "nodes": nodes, "links": links, "groups": [], "config": {},
          "extra": {"info": {"description": DESCRIPTIONS[name]}, "ds": {"scale": 0.8, "offset": [0, 0]}},
          "version": 0.4}
    return ui, api


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Independent UI -> API conversion (what the frontend does), used to check the UI files."""
    links = {lk[0]: lk for lk in ui["links"]}
    api = {}
    for node in ui["nodes"]:
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
                    del vals[:len(_extras(spec))]
            elif is_widget(spec):
                inputs[iname] = vals.pop(0)
                del vals[:len(_extras(spec))]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def thumbnail(name: str, ui: dict, object_info: dict | None = None):
    """A small picture of the graph: nodes as boxes (CLIP-RPN nodes highlighted) and links."""
    from PIL import Image, ImageDraw
    w, h = 512, 288
    im = Image.new("RGB", (w, h), (30, 33, 40))
    d = ImageDraw.Draw(im)
    xs = [n["pos"][0] for n in ui["nodes"]]
    ys = [n["pos"][1] for n in ui["nodes"]]
    sx = (w - 40) / (max(xs) - min(xs) + 330)
    sy = (h - 60) / (max(ys) - min(ys) + 210)
    s = min(sx, sy)
    box = {}
    for n in ui["nodes"]:
        x0 = 20 + (n["pos"][0] - min(xs)) * s
        y0 = 40 + (n["pos"][1] - min(ys)) * s
        box[n["id"]] = (x0, y0, x0 + 300 * s, y0 + 110 * s)
    for lk in ui["links"]:
        a, b = box[lk[1]], box[lk[3]]
        d.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(150, 160, 170), width=2)
    for n in ui["nodes"]:
        x0, y0, x1, y1 = box[n["id"]]
        ours = n["type"].startswith("CLIPRPN")
        d.rectangle([x0, y0, x1, y1], fill=(40, 90, 140) if ours else (70, 74, 82), outline=(220, 220, 220))
        label = n.get("title") or (object_info or {}).get(n["type"], {}).get("display_name") or n["type"]
        chars = max(4, int((x1 - x0 - 6) / 5))
        d.text((x0 + 4, y0 + 4), label if len(label) <= chars else label[:chars - 2] + "..", fill=(255, 255, 255))
    words, line, lines = DESCRIPTIONS[name].split(), "", []
    for wd in words:
        if len(line) + len(wd) > 80:
            lines.append(line)
            line = ""
        line = (line + " " + wd).strip()
    d.text((12, 6), "\n".join(lines + [line]), fill=(255, 255, 255))
    return im


def write_all(object_info: dict, out: Path = WORKFLOWS):
    (out / "api").mkdir(parents=True, exist_ok=True)
    for name in GRAPHS:
        ui, api = build(name, object_info)
        (out / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        (out / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")
        thumbnail(name, ui, object_info).save(out / f"{name}.jpg", quality=88)


if __name__ == "__main__":
    url = sys.argv[1].rstrip("/")
    with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
        write_all(json.loads(r.read()))
    print("wrote", ", ".join(GRAPHS))
