"""The pack's node definitions as ComfyUI's /object_info would list them, read without a server:
the nodes' ``define_schema()`` is run against a small recording stand-in for
``comfy_api.latest.io`` (plus the few host modules the node files import), and each schema is
written out the way the V3 API serialises it (``[TYPE, {options}]``, combos as ``["COMBO",
{"options": [...]}]``, optional inputs in their own section).

Also the frontend's rule for which saved values a node has (``frontend_widgets``), written from
the frontend's behaviour, not from workflow_graphs.py, so a test using it checks the generator."""
from __future__ import annotations

import importlib
import sys
import types
from contextlib import contextmanager

import torch
from packutil import PACK_NAME, REPO, import_pack

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")  # the frontend gives these a seed control even when not asked
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


class _Input:
    def __init__(self, io_type, name, kw):
        self.io_type, self.name, self.kw = io_type, name, kw


class _Output:
    def __init__(self, io_type, name=None, kw=None):
        self.io_type, self.name, self.kw = io_type, name, kw or {}


def _socket(io_type):
    class Socket:
        @staticmethod
        def Input(name, **kw):
            return _Input(io_type, name, kw)

        @staticmethod
        def Output(name=None, **kw):
            return _Output(io_type, name, kw)
    Socket.io_type = io_type
    return Socket


def _fake_io():
    io = types.ModuleType("comfy_api.latest.io")

    class ComfyNode:
        pass

    class Schema:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class NodeOutput(tuple):
        def __new__(cls, *a, **kw):
            return tuple.__new__(cls, a)

    io.ComfyNode, io.Schema, io.NodeOutput = ComfyNode, Schema, NodeOutput
    for attr, t in (("Image", "IMAGE"), ("Mask", "MASK"), ("Int", "INT"), ("Float", "FLOAT"), ("String", "STRING"),
                    ("Boolean", "BOOLEAN"), ("Combo", "COMBO")):
        setattr(io, attr, _socket(t))
    io.Custom = _socket
    return io


def _fake_host(tmp):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp / "models")
    fp.supported_pt_extensions = {".safetensors"}
    fp.folder_names_and_paths = {}
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths.get(name, ([], set()))[0])

    def get_filename_list(name):
        from pathlib import Path
        out = []
        for root in fp.get_folder_paths(name):
            if Path(root).is_dir():
                out += [p.name for p in Path(root).iterdir() if p.suffix in fp.supported_pt_extensions]
        return sorted(set(out))
    fp.get_filename_list = get_filename_list
    fp.get_input_directory = lambda: str(tmp / "input")
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.InterruptProcessingException = type("InterruptProcessingException", (BaseException,), {})
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    cu, mp = types.ModuleType("comfy.utils"), types.ModuleType("comfy.model_patcher")
    comfy.model_management, comfy.utils, comfy.model_patcher = mm, cu, mp
    return {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": cu,
            "comfy.model_patcher": mp}


@contextmanager
def fake_comfy(tmp):
    """sys.modules with the stand-ins; the pack's node modules are dropped afterwards."""
    api = types.ModuleType("comfy_api")
    api.__path__ = []
    latest = types.ModuleType("comfy_api.latest")
    latest.__path__ = []
    latest.io = _fake_io()
    latest.ComfyExtension = object
    mods = {"comfy_api": api, "comfy_api.latest": latest, "comfy_api.latest.io": latest.io, **_fake_host(tmp)}
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    import_pack()
    try:
        yield mods
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for m in [m for m in sys.modules if m.startswith(PACK_NAME + ".nodes.") and not m.endswith(".node_logic")]:
            sys.modules.pop(m, None)


def _spec(inp: _Input) -> list:
    kw = {k: v for k, v in inp.kw.items() if v is not None and k not in ("optional", "advanced")}
    if inp.io_type == "COMBO":
        kw["options"] = list(kw["options"])
    return [inp.io_type, kw]


def pack_object_info(tmp) -> dict:
    """{node_id: {"input": {...}, "input_order": {...}, "output": [...], "output_name": [...]}} from
    the pack's own schemas."""
    with fake_comfy(tmp) as mods:
        host = importlib.import_module(f"{PACK_NAME}.nodes._host")
        host.register_model_folder()
        out = {}
        for part in importlib.import_module(f"{PACK_NAME}.nodes").PARTS:
            for node in importlib.import_module(f"{PACK_NAME}.nodes.{part}").NODES:
                s = node.define_schema()
                info = {"input": {"required": {}, "optional": {}}, "input_order": {"required": [], "optional": []},
                        "output": [o.io_type for o in s.outputs], "output_name": [o.name for o in s.outputs],
                        "display_name": s.display_name}
                for inp in s.inputs:
                    sect = "optional" if inp.kw.get("optional") else "required"
                    info["input"][sect][inp.name] = _spec(inp)
                    info["input_order"][sect].append(inp.name)
                out[s.node_id] = info
        del mods
    return out


def frontend_widgets(info: dict) -> list[tuple[str, str, dict]]:
    """The values the ComfyUI frontend saves in a node's ``widgets_values``, in order, as
    (name, kind, options): one per widget input (INT, FLOAT, STRING, BOOLEAN, COMBO; a combo
    may be given as its list of choices; ``forceInput`` ones are sockets), then the extra value
    of the seed control ('control after generate': ``kind == "CONTROL"``) after an INT whose
    ``control_after_generate`` is true or, when the definition says nothing, that is named
    seed / noise_seed, and the upload button's value (``kind == "UPLOAD"``) after an image
    combo with ``image_upload``."""
    out = []
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for sect in ("required", "optional"):
        for name in order.get(sect, []):
            spec = info["input"][sect][name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            if isinstance(spec[0], list):
                opts = {**opts, "options": spec[0]}
            out.append((name, kind, opts))
            if kind == "INT" and opts.get("control_after_generate", name in SEED_NAMES):
                out.append((name, "CONTROL", {}))
            if opts.get("image_upload"):
                out.append((name, "UPLOAD", {}))
    return out


def value_problem(value, kind: str, opts: dict, check_options: bool = True) -> str | None:
    """Why ``value`` cannot be the saved value of such a widget (None when it can)."""
    if kind == "CONTROL":
        return None if value in CONTROL_VALUES else f"{value!r} is not a seed control value {CONTROL_VALUES}"
    if kind == "UPLOAD":
        return None if value == "image" else f"{value!r} is not the upload button's value 'image'"
    if kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{value!r} is not an INT"
    if kind == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{value!r} is not a FLOAT"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a BOOLEAN"
    if kind in ("STRING", "COMBO") and not isinstance(value, str):
        return f"{value!r} is not a string"
    if kind in ("INT", "FLOAT") and ("min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]):
        return f"{value!r} is outside {opts.get('min')}..{opts.get('max')}"
    if kind == "COMBO" and check_options and opts.get("options") and value not in opts["options"]:
        return f"{value!r} is not one of {opts['options']}"
    return None


__all__ = ["REPO", "fake_comfy", "frontend_widgets", "pack_object_info", "value_problem"]
