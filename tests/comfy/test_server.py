"""Integration tests against a real ComfyUI server (COMFYUI_DIR; skipped without it).

The server is started once per session (conftest.server): CPU only, loopback, random port, its
own base directory, this pack loaded through extra_model_paths.yaml, HF_ENDPOINT pointing at a
local fake hub. Every test checks the server is still alive afterwards."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_server as cs
import workflow_graphs as wg

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "rain100l"
API_DIR = REPO / "workflows" / "api"
OUR_NODES = json.loads((REPO / "node_list.json").read_text())
LOADER = {"class_type": "CLIPRPNLoader", "inputs": {"checkpoint": "clip_rpn_default.safetensors",
                                                    "clip": "none (built-in pattern head)", "device": "auto",
                                                    "dtype": "auto"}}


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_scene(h=96, w=128, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([120 + 80 * np.sin(xx / 17.0), 100 + 60 * np.cos(yy / 11.0), 90 + 40 * np.sin((xx + yy) / 23.0)], -1)
    return np.clip(base + g.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


def load_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def srv(server):
    """Inputs the workflows use, a tiny upscale model and a placeholder inpainting checkpoint."""
    rain = DATA / "rain" / "001.png"
    gt = DATA / "gt" / "001.png"
    rainy = rain.read_bytes() if rain.is_file() else png_bytes(synthetic_scene(seed=1))
    clean = gt.read_bytes() if gt.is_file() else png_bytes(synthetic_scene(seed=2))
    server.upload_image(rainy, "rainy.png")
    server.upload_image(clean, "clean.png")
    server.upload_image(png_bytes(synthetic_scene(64, 64, 3)), "small.png")
    server.upload_image(png_bytes(synthetic_scene(64, 64, 4)), "small2.png")
    upscaler = server.models / "upscale_models" / wg.REALESRGAN["name"]
    try:  # a real (tiny, random) 4x ESRGAN under the workflow's file name, so it runs end to end
        from safetensors.torch import save_file
        from spandrel.architectures.ESRGAN import ESRGAN
        torch.manual_seed(0)
        up = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
        save_file({k: v.contiguous() for k, v in up.state_dict().items()}, str(upscaler))
    except ImportError:  # spandrel is ComfyUI's dependency; without it the workflow can only validate
        upscaler.write_bytes(b"\0" * 16)
    # a placeholder: the inpaint workflow needs an SD inpainting model we cannot have here
    from safetensors.torch import save_file
    save_file({"placeholder": torch.zeros(1)}, str(server.models / "checkpoints" / wg.SD2_INPAINT["name"]))
    yield server
    assert server.alive(), server.log()[-3000:]


def test_pack_loads_without_errors(srv):
    log = srv.log()
    assert "ComfyUI-CLIP-RPN" in log
    assert "IMPORT FAILED" not in log, log[-3000:]
    assert "nodes are disabled" not in log
    tpl = srv.get("/workflow_templates")
    assert sorted(tpl.get("ComfyUI-CLIP-RPN", [])) == sorted(wg.TITLES.values())


def test_object_info_lists_every_node(srv):
    info = srv.object_info()
    ours = {k for k, v in info.items() if v.get("python_module", "").endswith("ComfyUI-CLIP-RPN") or k in OUR_NODES}
    assert ours == set(OUR_NODES), "node_list.json and the registered nodes differ"
    for name in OUR_NODES:
        n = info[name]
        assert n["category"] == "image/restoration/CLIP-RPN"
        assert len(n["description"]) > 30
        for sect in ("required", "optional"):
            for iname, spec in n["input"].get(sect, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{iname} has no tooltip"

    def sig(name):
        n = info[name]
        req = {k: (v[0] if not isinstance(v[0], list) else "COMBO") for k, v in n["input"]["required"].items()}
        opt = {k: v[0] for k, v in n["input"].get("optional", {}).items()}
        return req, opt, n["output"], n["output_name"]

    assert sig("CLIPRPNLoader") == ({"checkpoint": "COMBO", "clip": "COMBO", "device": "COMBO", "dtype": "COMBO"},
                                    {}, ["CLIPRPN_MODEL"], ["model"])
    assert sig("CLIPRPNRainPerceiver") == ({"model": "CLIPRPN_MODEL", "image": "IMAGE"}, {},
                                           ["RAIN_PATTERN", "STRING", "IMAGE"], ["pattern", "summary", "chart"])
    assert sig("CLIPRPNExpertRouter") == ({"model": "CLIPRPN_MODEL", "pattern": "RAIN_PATTERN", "top_k": "INT",
                                           "temperature": "FLOAT", "expert_override": "COMBO"}, {},
                                          ["RAIN_ROUTING", "STRING"], ["routing", "summary"])
    assert sig("CLIPRPNMaskEstimator") == ({"model": "CLIPRPN_MODEL", "image": "IMAGE", "tile": "INT",
                                            "overlap": "INT"}, {"work_side": "INT"}, ["MASK"], ["mask"])
    assert sig("CLIPRPNCrossAttentionDerain") == (
        {"model": "CLIPRPN_MODEL", "image": "IMAGE", "top_k": "INT", "temperature": "FLOAT", "tile": "INT",
         "overlap": "INT"}, {"routing": "RAIN_ROUTING", "mask": "MASK", "self_ensemble": "BOOLEAN", "passes": "INT",
                            "expert_check": "BOOLEAN", "work_side": "INT", "verify_light": "BOOLEAN"},
        ["IMAGE", "MASK"],
        ["image", "rain_mask"])
    assert sig("CLIPRPNDerain") == ({"model": "CLIPRPN_MODEL", "image": "IMAGE"},
                                    {"expert_check": "BOOLEAN", "work_side": "INT", "verify_light": "BOOLEAN"},
                                    ["IMAGE"], ["image"])
    assert sig("CLIPRPNSynthesizeRain") == ({"image": "IMAGE", "seed": "INT", "regime": "COMBO"}, {},
                                            ["IMAGE", "MASK"], ["rainy", "rain_mask"])
    assert sig("CLIPRPNFinetune") == (
        {"model": "CLIPRPN_MODEL", "rainy": "IMAGE", "clean": "IMAGE", "steps": "INT", "learning_rate": "FLOAT",
         "schedule": "COMBO", "patch_size": "INT", "batch_size": "INT", "seed": "INT", "save_name": "STRING"}, {},
        ["CLIPRPN_MODEL", "IMAGE", "STRING"], ["model", "loss_curve", "report"])
    # the shipped model is offered (found in the pack's own models/ folder) and is the default
    assert info["CLIPRPNLoader"]["input"]["required"]["checkpoint"][1]["options"][0] == "clip_rpn_default.safetensors"
    opts = info["CLIPRPNFinetune"]["input"]["required"]["schedule"][1]["options"]
    assert opts == ["charbonnier", "mix", "curriculum", "dwa", "uncertainty", "equal_mix", "psnr", "psnr_mix", "psnr_dwa",
                    "psnr_equal", "psnr_uncertainty"]


@pytest.mark.parametrize("name", sorted(wg.GRAPHS))
def test_ui_workflow_matches_api_copy(srv, name):
    info = srv.object_info()
    ui = json.loads(wg.ui_file(name).read_text())
    api = json.loads((API_DIR / f"{name}.json").read_text())
    assert wg.ui_to_api(ui, info) == wg.strip_meta(api)
    assert wg.snapshot_of(info) == wg.load_snapshot(), "object_info_snapshot.json is stale: rerun workflow_graphs.py URL"
    assert wg.build(name, info) == (ui, api), "workflows/ is stale: rerun tests/comfy/workflow_graphs.py"
    assert wg.thumb_file(name).is_file()
    types = {lk[0]: lk[5] for lk in ui["links"]}
    for node in ui["nodes"]:
        if node["type"] in wg.VIRTUAL:
            continue  # every link carries the type its source outputs
        for inp in node["inputs"]:
            assert inp["type"] in (types[inp["link"]], "*") or types[inp["link"]] in inp["type"].split(",")


@pytest.mark.parametrize("name", sorted(p.stem for p in API_DIR.glob("*.json")))
def test_api_workflow_runs(srv, name):
    api = json.loads((API_DIR / f"{name}.json").read_text())
    for node in api.values():  # keep the suite fast: fewer fine-tune steps than the example uses
        if node["class_type"] == "CLIPRPNFinetune":
            node["inputs"]["steps"] = 4
    status, body = srv.queue(api)
    assert status == 200 and not body.get("node_errors"), body
    hist = srv.wait(body["prompt_id"])
    if name == "clip_rpn_rain_mask_inpaint":
        # needs a real SD inpainting checkpoint: it validates, our nodes run, the placeholder checkpoint fails
        err = cs.messages(hist).get("execution_error")
        assert err is None or err["node_type"] == "CheckpointLoaderSimple", err
    else:
        assert cs.status_str(hist) == "success", json.dumps(hist["status"])[:3000]
        imgs = [im for out in hist["outputs"].values() for im in out.get("images", [])]
        assert imgs, hist["outputs"]
        if name == "clip_rpn_derain_upscale":
            saved = load_png(srv.view(hist["outputs"]["6"]["images"][0]))
            src = Image.open(io.BytesIO(srv.view({"filename": "rainy.png", "subfolder": "", "type": "input"})))
            assert saved.shape[:2] == (src.height * 4, src.width * 4)
    assert srv.alive()


def test_rain100l_image_gets_better(srv):
    from cliprpn_core.metrics import psnr_y
    if not (DATA / "rain" / "001.png").is_file():
        pytest.skip("Rain100L sample not present")
    api = json.loads((API_DIR / "clip_rpn_basic_derain.json").read_text())
    hist = srv.run(api)
    assert cs.status_str(hist) == "success"
    out = load_png(srv.view(hist["outputs"]["4"]["images"][0]))
    rain = np.asarray(Image.open(DATA / "rain" / "001.png").convert("RGB"))
    gt = np.asarray(Image.open(DATA / "gt" / "001.png").convert("RGB"))
    before, after = psnr_y(rain, gt), psnr_y(out, gt)
    print(f"Rain100L 001: PSNR-Y {before:.2f} dB -> {after:.2f} dB")
    assert out.shape == gt.shape
    assert after > before + 0.5


def test_loader_runs_once_for_many_consumers(srv):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
        "2": {**LOADER, "inputs": {**LOADER["inputs"], "device": "cpu", "dtype": "fp32"}},
        "3": {"class_type": "CLIPRPNRainPerceiver", "inputs": {"model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "CLIPRPNExpertRouter", "inputs": {"model": ["2", 0], "pattern": ["3", 0], "top_k": 2,
                                                              "temperature": 1.0, "expert_override": "veil"}},
        "5": {"class_type": "CLIPRPNMaskEstimator", "inputs": {"model": ["2", 0], "image": ["1", 0], "tile": 32,
                                                               "overlap": 8}},
        "6": {"class_type": "CLIPRPNCrossAttentionDerain",
              "inputs": {"model": ["2", 0], "image": ["1", 0], "routing": ["4", 0], "mask": ["5", 0], "top_k": 1,
                         "temperature": 1.0, "tile": 32, "overlap": 8}},
        "7": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["2", 0], "image": ["1", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
        "12": {"class_type": "CLIPRPNCrossAttentionDerain",
               "inputs": {"model": ["2", 0], "image": ["1", 0], "top_k": 1, "temperature": 1.0, "tile": 0,
                          "overlap": 8, "self_ensemble": True, "passes": 2}},
        "14": {"class_type": "CLIPRPNExpertRouter", "inputs": {"model": ["2", 0], "pattern": ["3", 0], "top_k": 1,
                                                               "temperature": 1.0, "expert_override": "auto (router decides)"}},
        "15": {"class_type": "CLIPRPNCrossAttentionDerain",
               "inputs": {"model": ["2", 0], "image": ["1", 0], "routing": ["14", 0], "top_k": 1, "temperature": 1.0,
                          "tile": 0, "overlap": 8, "expert_check": True}},
        "16": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }
    n0 = srv.log().count("CLIP-RPN: loaded")
    ws = srv.open_ws()
    status, body = srv.queue(prompt)
    assert status == 200, body
    if ws is not None:  # tiled nodes report progress per tile: 64x64, tile 32 -> the core's tile count
        from cliprpn_core import default_model_path, read_config
        from cliprpn_core.inference import count_tiles
        try:
            evs = list(srv.events(ws, lambda e: e["type"] in ("execution_success", "execution_error")
                                  and e["data"].get("prompt_id") == body["prompt_id"]))
        finally:
            ws.close()
        tiles = count_tiles(64, 64, 32, 8, read_config(default_model_path()).pad_multiple)
        assert tiles > 1
        for node in ("5", "6"):
            prog = [e["data"] for e in evs if e["type"] == "progress" and e["data"].get("node") == node]
            assert prog and all(p["max"] == tiles for p in prog), (node, prog)
            assert prog[-1]["value"] == tiles
    hist = srv.wait(body["prompt_id"])
    assert cs.status_str(hist) == "success", json.dumps(hist["status"])[:3000]
    assert srv.log().count("CLIP-RPN: loaded") == n0 + 1
    assert hist["outputs"]["10"]["text"][0].strip() == "image 1: veil=1.00"  # the override reached the router
    assert hist["outputs"]["11"]["text"][0].splitlines()[-1] == "(perceived by pattern-head)"
    # the tiled, routed result differs from the one-node derain but keeps the size
    a = load_png(srv.view(hist["outputs"]["8"]["images"][0]))
    b = load_png(srv.view(hist["outputs"]["9"]["images"][0]))
    e = load_png(srv.view(hist["outputs"]["13"]["images"][0]))  # flip self-ensemble: same size, not the plain result
    assert a.shape == b.shape == e.shape == (64, 64, 3)
    assert (e.astype(int) - b.astype(int)).any()
    assert load_png(srv.view(hist["outputs"]["16"]["images"][0])).shape == (64, 64, 3)  # expert check ran
    # a second prompt with the same loader settings reuses the loaded model
    prompt["1"]["inputs"]["image"] = "small2.png"
    hist = srv.run(prompt)
    assert cs.status_str(hist) == "success"
    assert srv.log().count("CLIP-RPN: loaded") == n0 + 1


def _finetune_prompt(steps, save_name, image="small.png"):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": LOADER,
        "3": {"class_type": "CLIPRPNSynthesizeRain", "inputs": {"image": ["1", 0], "seed": 7, "regime": "random"}},
        "4": {"class_type": "CLIPRPNFinetune",
              "inputs": {"model": ["2", 0], "rainy": ["3", 0], "clean": ["1", 0], "steps": steps,
                         "learning_rate": 1e-4, "schedule": "charbonnier", "patch_size": 32, "batch_size": 1,
                         "seed": 0, "save_name": save_name}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
    }


def _no_trace_of(folder: Path, stem: str):
    left = [p.name for p in folder.iterdir() if stem in p.name or p.name.endswith(".part")]
    assert not left, f"files left behind: {left}"


def test_finetune_saves_atomically_and_the_result_is_listed(srv):
    from cliprpn_core import load_model
    hist = srv.run(_finetune_prompt(3, "ft_saved"))
    assert cs.status_str(hist) == "success", json.dumps(hist["status"])[:3000]
    path = srv.models / "clip_rpn" / "ft_saved.safetensors"
    assert path.is_file() and "saved to" in hist["outputs"]["6"]["text"][0]
    m = load_model(path)
    assert m.config.num_experts == 4
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]
    opts = srv.object_info()["CLIPRPNLoader"]["input"]["required"]["checkpoint"][1]["options"]
    assert "ft_saved.safetensors" in opts
    assert not (REPO / "models" / "ft_saved.safetensors").exists()
    # the saved model loads in the loader; replacing the file on disk makes the loader load it again
    p = {"1": {**LOADER, "inputs": {**LOADER["inputs"], "checkpoint": "ft_saved.safetensors"}},
         "2": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
         "3": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    n0 = srv.log().count("CLIP-RPN: loaded ft_saved")
    assert cs.status_str(srv.run(p)) == "success"
    assert cs.status_str(srv.run(p)) == "success"
    assert srv.log().count("CLIP-RPN: loaded ft_saved") == n0 + 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cs.status_str(srv.run(p)) == "success"
    assert srv.log().count("CLIP-RPN: loaded ft_saved") == n0 + 2
    # a checkpoint that is not an earlier fine-tune is never replaced
    (srv.models / "clip_rpn" / "precious.safetensors").write_bytes(path.read_bytes().replace(b"finetuned_from", b"finetunedXfrom"))
    _expect_node_error(srv, _finetune_prompt(2, "precious"), "CLIPRPNFinetune", r"not an earlier fine-tune")


def test_interrupt_during_finetune_leaves_no_file(srv):
    import time
    ws = srv.open_ws()
    status, body = srv.queue(_finetune_prompt(100000, "interrupted_model"))
    assert status == 200, body
    pid = body["prompt_id"]
    if ws is not None:  # interrupt once the fine-tune reports progress (steps are running)
        try:
            evs = list(srv.events(ws, lambda e: e["type"] == "progress" and e["data"].get("node") == "4"
                                  and e["data"]["value"] >= 1, timeout=120))
        finally:
            ws.close()
        assert evs[-1]["data"]["max"] == 100000
    else:
        t0 = time.time()
        while not srv.running() and time.time() - t0 < 60:
            time.sleep(0.2)
        time.sleep(4)  # well inside the fine-tune loop (loader + synthesis take < 2 s)
    srv.post("/interrupt")
    hist = srv.wait(pid, timeout=60)
    msgs = cs.messages(hist)
    assert "execution_interrupted" in msgs, json.dumps(hist["status"])[:2000]
    assert msgs["execution_interrupted"]["node_type"] == "CLIPRPNFinetune"
    _no_trace_of(srv.models / "clip_rpn", "interrupted_model")
    _no_trace_of(REPO / "models", "interrupted_model")
    assert srv.alive()


def _expect_node_error(srv, prompt, node_type, pattern):
    hist = srv.run(prompt)
    err = cs.messages(hist).get("execution_error")
    assert err, f"expected an error from {node_type}: {json.dumps(hist['status'])[:2000]}"
    assert err["node_type"] == node_type and re.search(pattern, err["exception_message"]), err["exception_message"]
    assert srv.alive()


def test_bad_inputs_are_node_errors(srv):
    tiny_img = {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}}
    _expect_node_error(srv, {"1": LOADER, "2": tiny_img,
                             "3": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
                             "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}},
                       "CLIPRPNDerain", r"8x8")
    # pairs of different sizes
    p = _finetune_prompt(2, "")
    p["7"] = {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                     "width": 48, "height": 48, "crop": "disabled"}}
    p["4"]["inputs"]["clean"] = ["7", 0]
    _expect_node_error(srv, p, "CLIPRPNFinetune", r"same size")
    # routing for another batch size
    r = {"1": LOADER, "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 3,
                                                                    "color": 100}},
         "3": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 100}},
         "4": {"class_type": "CLIPRPNRainPerceiver", "inputs": {"model": ["1", 0], "image": ["3", 0]}},
         "5": {"class_type": "CLIPRPNExpertRouter", "inputs": {"model": ["1", 0], "pattern": ["4", 0], "top_k": 1,
                                                               "temperature": 1.0,
                                                               "expert_override": "auto (router decides)"}},
         "6": {"class_type": "CLIPRPNCrossAttentionDerain",
               "inputs": {"model": ["1", 0], "image": ["2", 0], "routing": ["5", 0], "top_k": 1, "temperature": 1.0,
                          "tile": 0, "overlap": 32}},
         "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}}
    _expect_node_error(srv, r, "CLIPRPNCrossAttentionDerain", r"one row per image")
    # validation errors: HTTP 400 naming the node, nothing runs
    bad = _finetune_prompt(2, "../escape")
    status, body = srv.queue(bad)
    assert status == 400 and "4" in body["node_errors"], body
    bad = {"1": {**LOADER, "inputs": {**LOADER["inputs"], "checkpoint": "missing.safetensors"}},
           "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
           "3": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
           "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    status, body = srv.queue(bad)
    assert status == 400 and "1" in body["node_errors"], body
    assert srv.alive()


def test_corrupt_checkpoint_is_a_clear_error(srv):
    (srv.models / "clip_rpn" / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    p = {"1": {**LOADER, "inputs": {**LOADER["inputs"], "checkpoint": "broken.safetensors"}},
         "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
         "3": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    _expect_node_error(srv, p, "CLIPRPNLoader", r"broken\.safetensors.*(corrupt|truncated|valid)")


def _tiny_clip_folder(dest: Path):
    """A tiny random open_clip model as a 'local-dir' folder (real CLIP code path, no real weights)."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file
    cfg = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                                         "head_width": 16},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                              "std": [0.26862954, 0.26130258, 0.27577711]}}
    torch.manual_seed(0)
    m = open_clip.model.CLIP(**cfg["model_cfg"])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(dest / "open_clip_model.safetensors"))


def test_clip_folder_drives_perception(srv):
    _tiny_clip_folder(srv.models / "clip_rpn" / "tiny_clip")
    info = srv.object_info()
    assert "tiny_clip" in info["CLIPRPNLoader"]["input"]["required"]["clip"][1]["options"]
    assert "tiny_clip/open_clip_model.safetensors" not in info["CLIPRPNLoader"]["input"]["required"]["checkpoint"][1]["options"]
    p = {"1": {**LOADER, "inputs": {**LOADER["inputs"], "clip": "tiny_clip"}},
         "2": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
         "3": {"class_type": "CLIPRPNRainPerceiver", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
         "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
         "5": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
         "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}
    hist = srv.run(p)
    assert cs.status_str(hist) == "success", json.dumps(hist["status"])[:3000]
    assert hist["outputs"]["4"]["text"][0].splitlines()[-1] == "(perceived by clip:tiny_clip)"


def test_clip_download_goes_through_the_hub_endpoint(srv):
    """'download: ...' fetches open_clip_model.safetensors from HF_ENDPOINT (a local fake hub here)
    into models/clip_rpn as <ARCH>__<TAG>.safetensors, atomically. The fake hub serves a tiny file,
    so loading it as ViT-B-32 then fails with a clear node error (not a crash)."""
    from safetensors.torch import save_file
    tmp = srv.work / "hub_payload.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(tmp))
    payload = tmp.read_bytes()
    srv.hub.files["open_clip_model.safetensors"] = payload
    p = {"1": {**LOADER, "inputs": {**LOADER["inputs"], "clip": "download: ViT-B-32 LAION-2B"}},
         "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
         "3": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["1", 0], "image": ["2", 0]}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    ws = srv.open_ws()
    status, body = srv.queue(p)
    assert status == 200, body
    if ws is not None:
        try:
            evs = list(srv.events(ws, lambda e: e["type"] in ("execution_error", "execution_success")
                                  and e["data"].get("prompt_id") == body["prompt_id"]))
        finally:
            ws.close()
        prog = [e["data"] for e in evs if e["type"] == "progress" and e["data"].get("node") == "1"]
        assert prog and prog[-1]["max"] == len(payload) and prog[-1]["value"] == len(payload), prog
    hist = srv.wait(body["prompt_id"])
    dest = srv.models / "clip_rpn" / "ViT-B-32__laion2b_s34b_b79k.safetensors"
    assert any("/resolve/" in r and "laion" in r.lower() for r in srv.hub.requests), srv.hub.requests
    assert dest.is_file() and dest.read_bytes() == payload
    assert not [q for q in dest.parent.iterdir() if q.name.endswith(".part")]
    err = cs.messages(hist).get("execution_error")
    assert err and err["node_type"] == "CLIPRPNLoader" and "ViT-B-32" in err["exception_message"], hist["status"]
    # once on disk it is offered as a local file, no longer as a download
    opts = srv.object_info()["CLIPRPNLoader"]["input"]["required"]["clip"][1]["options"]
    assert dest.name in opts and "download: ViT-B-32 LAION-2B" not in opts
    dest.unlink()
    assert srv.alive()


def test_whole_batch_and_unload_models(srv):
    """Every image of a batch is processed; after 'Unload models' (POST /free) the next run loads again."""
    batch = {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 3, "color": 0x808080}}
    p = {"1": LOADER, "2": batch,
         "3": {"class_type": "CLIPRPNSynthesizeRain", "inputs": {"image": ["2", 0], "seed": 1, "regime": "random"}},
         "4": {"class_type": "CLIPRPNDerain", "inputs": {"model": ["1", 0], "image": ["3", 0]}},
         "5": {"class_type": "CLIPRPNMaskEstimator", "inputs": {"model": ["1", 0], "image": ["3", 0], "tile": 0,
                                                               "overlap": 32}},
         "6": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
         "7": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 0]}},
         "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}}
    hist = srv.run(p)
    assert cs.status_str(hist) == "success", json.dumps(hist["status"])[:3000]
    assert len(hist["outputs"]["6"]["images"]) == 3 and len(hist["outputs"]["8"]["images"]) == 3
    assert load_png(srv.view(hist["outputs"]["6"]["images"][2])).shape == (24, 40, 3)
    status, _ = srv.post("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    p["3"]["inputs"]["seed"] = 2
    hist = srv.run(p)
    assert cs.status_str(hist) == "success", json.dumps(hist["status"])[:3000]


def test_interrupt_during_tiled_derain(srv):
    """Cancel is honoured between tiles: the prompt ends as interrupted and the server keeps serving."""
    p = {"1": LOADER,
         "2": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 4, "color": 0x606060}},
         "3": {"class_type": "CLIPRPNCrossAttentionDerain",
               "inputs": {"model": ["1", 0], "image": ["2", 0], "top_k": 1, "temperature": 1.0, "tile": 32,
                          "overlap": 16}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    ws = srv.open_ws()
    if ws is None:
        pytest.skip("no websocket client available")
    status, body = srv.queue(p)
    assert status == 200, body
    try:
        list(srv.events(ws, lambda e: e["type"] == "progress" and e["data"].get("node") == "3", timeout=120))
    finally:
        ws.close()
    srv.post("/interrupt")
    hist = srv.wait(body["prompt_id"], timeout=60)
    msgs = cs.messages(hist)
    assert "execution_interrupted" in msgs, json.dumps(hist["status"])[:2000]
    assert msgs["execution_interrupted"]["node_type"] == "CLIPRPNCrossAttentionDerain"
    assert srv.alive() and srv.get("/system_stats")


def test_long_nodes_send_preview_images(srv):
    """Per-tile progress comes with a preview image (issue 22.3): the binary PREVIEW_IMAGE frames the
    frontend draws on the running node (event 1, image type 1 = JPEG), here for the tiled derain, the
    tiled mask estimator and the fine-tune (its loss curve)."""
    import socket
    import struct
    import time
    p = {"1": LOADER,
         "2": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
         "3": {"class_type": "CLIPRPNCrossAttentionDerain",
               "inputs": {"model": ["1", 0], "image": ["2", 0], "top_k": 1, "temperature": 1.0, "tile": 32,
                          "overlap": 8}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
         "5": {"class_type": "CLIPRPNMaskEstimator", "inputs": {"model": ["1", 0], "image": ["2", 0], "tile": 32,
                                                                "overlap": 8}},
         "6": {"class_type": "MaskPreview", "inputs": {"mask": ["5", 0]}}}
    ft = _finetune_prompt(3, "")
    p.update({"13": ft["3"] | {"inputs": {**ft["3"]["inputs"], "image": ["2", 0]}},
              "14": ft["4"] | {"inputs": {**ft["4"]["inputs"], "model": ["1", 0], "rainy": ["13", 0],
                                          "clean": ["2", 0]}},
              "15": {"class_type": "PreviewImage", "inputs": {"images": ["14", 1]}}})
    ws = srv.open_ws()
    if ws is None:
        pytest.skip("no websocket client available")
    status, body = srv.queue(p)
    assert status == 200, body
    previews, running, done = {}, None, False
    try:
        t0 = time.time()
        while not done and time.time() - t0 < cs.RUN_TIMEOUT:
            try:
                op, payload = ws.recv(timeout=30)
            except socket.timeout:
                break
            if op == 1:
                ev = json.loads(payload)
                if ev["type"] == "executing":
                    running = ev["data"].get("node")
                done = ev["type"] in ("execution_success", "execution_error") and \
                    ev["data"].get("prompt_id") == body["prompt_id"]
            elif op == 2 and len(payload) > 8:
                event, kind = struct.unpack(">II", payload[:8])
                if event == 1:
                    assert kind == 1 and payload[8:10] == b"\xff\xd8", "preview is not a JPEG"
                    im = Image.open(io.BytesIO(payload[8:]))
                    previews.setdefault(running, []).append(im.size)
    finally:
        ws.close()
    assert done
    hist = srv.wait(body["prompt_id"])
    assert cs.status_str(hist) == "success", json.dumps(hist["status"])[:3000]
    # ComfyUI scales every preview to fit --preview-size (512): the 64x64 image arrives as 512x512
    assert previews.get("3") and all(w == h for w, h in previews["3"]), previews
    assert previews.get("5") and all(w == h for w, h in previews["5"]), previews
    assert previews.get("14") and all(w > h for w, h in previews["14"]), previews  # the loss curve
