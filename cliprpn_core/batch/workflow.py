"""API-format workflows for `cliprpn batch`: loading ours or the user's, checking them, finding the
image input and the output node, rewriting them per image, pattern/routing taps and the parsing of
the text those taps send back. Node class names of this pack come from ``cliprpn_core.node_names``."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .. import node_names as N
from ..config import TRAINING_SHORT_SIDE
from .errors import WorkflowError

API_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows" / "api"
DEFAULT_WORKFLOW = "clip_rpn_basic_derain"
# ComfyUI's own nodes that the workflow code recognises
IMAGE_LOADERS = ("LoadImage", "LoadImageMask", "LoadImageOutput")
SAVERS = ("SaveImage",)
PREVIEWERS = ("PreviewImage",)
TEXT_TAP = "PreviewAny"
# this pack's nodes
PERCEIVER, ROUTER, LOADER = N.RAIN_PERCEIVER, N.EXPERT_ROUTER, N.LOADER
DERAIN_NODES = N.DERAIN_NODES
EXPERT_AUTO = "auto (router decides)"
# workflows/api/clip_rpn_basic_derain.json, for installs that carry only the cliprpn_core package
BUILTIN_BASIC = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "rainy.png"}},
    "2": {"class_type": N.LOADER, "inputs": {"checkpoint": "clip_rpn_default.safetensors",
                                             "clip": "none (built-in pattern head)", "device": "auto",
                                             "dtype": "auto"}},
    "3": {"class_type": N.DERAIN, "inputs": {"model": ["2", 0], "image": ["1", 0], "expert_check": False,
                                             "work_side": TRAINING_SHORT_SIDE,  # the default working size
                                             "verify_light": True}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "clip_rpn/derained"}},
}


def load_workflow(spec: str | None) -> tuple[dict, str]:
    """A name of one of ours (``clip_rpn_basic_derain``, ``basic_derain``) or a path -> (API prompt, origin)."""
    spec = spec or DEFAULT_WORKFLOW
    p = Path(spec)
    if not p.is_file():
        stem = p.name.removesuffix(".json")
        for cand in (API_WORKFLOWS / f"{stem}.json", API_WORKFLOWS / f"clip_rpn_{stem}.json"):
            if cand.is_file():
                p = cand
                break
        else:
            if stem in (DEFAULT_WORKFLOW, "basic_derain") and not API_WORKFLOWS.is_dir():
                return copy.deepcopy(BUILTIN_BASIC), f"built-in {DEFAULT_WORKFLOW}"
            ours = ", ".join(sorted(q.stem for q in API_WORKFLOWS.glob("*.json"))) or "not installed here"
            raise WorkflowError(f"workflow {spec!r} is neither a file nor one of ours ({ours})")
    try:
        wf = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkflowError(f"workflow {p} is not readable JSON ({e})") from e
    return check_workflow(wf, str(p)), str(p)


def check_workflow(wf, origin="workflow") -> dict:
    if isinstance(wf, dict) and "prompt" in wf and isinstance(wf["prompt"], dict) and "nodes" not in wf:
        wf = wf["prompt"]  # a saved POST /prompt body
    if isinstance(wf, dict) and "nodes" in wf and "links" in wf:
        raise WorkflowError(f"{origin} is a UI (saved) workflow; export it in API format "
                            "(ComfyUI menu: Workflow > Export (API)) and pass that file")
    if not isinstance(wf, dict) or not wf or not all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        raise WorkflowError(f"{origin} is not an API-format workflow "
                            "({\"<id>\": {\"class_type\": ..., \"inputs\": {...}}})")
    return wf


def _node_order(k):
    return (0, int(k)) if str(k).isdigit() else (1, str(k))


def find_image_node(wf: dict, node_id: str | None = None) -> str:
    """The node whose ``image`` input takes the uploaded file name."""
    if node_id is not None:
        node_id = str(node_id)
        n = wf.get(node_id)
        if n is None:
            raise WorkflowError(f"--image-node {node_id}: no such node (nodes: {', '.join(sorted(wf, key=_node_order))})")
        if not isinstance(n.get("inputs", {}).get("image"), str):
            raise WorkflowError(f"--image-node {node_id} ({n['class_type']}) has no file-name 'image' input")
        return node_id
    cands = [k for k, n in wf.items() if n["class_type"] in IMAGE_LOADERS]
    if not cands:
        cands = [k for k, n in wf.items() if isinstance(n.get("inputs", {}).get("image"), str)]
    if not cands:
        raise WorkflowError("workflow has no image input: add a LoadImage node (its 'image' input receives "
                            "each uploaded file) or name the node with --image-node")
    if len(cands) > 1:
        desc = ", ".join(f"{k} ({wf[k]['class_type']}: {wf[k]['inputs'].get('image')!r})" for k in sorted(cands, key=_node_order))
        raise WorkflowError(f"workflow has several image inputs ({desc}); choose one with --image-node")
    return cands[0]


def find_output_node(wf: dict, node_id: str | None = None) -> str:
    """The node whose saved images are downloaded: SaveImage, else PreviewImage."""
    if node_id is not None:
        node_id = str(node_id)
        if node_id not in wf:
            raise WorkflowError(f"--output-node {node_id}: no such node")
        return node_id
    for kinds in (SAVERS, PREVIEWERS):
        cands = [k for k, n in wf.items() if n["class_type"] in kinds]
        if len(cands) == 1:
            return cands[0]
        if len(cands) > 1:
            raise WorkflowError(f"workflow has several {kinds[0]} nodes ({', '.join(sorted(cands, key=_node_order))}); "
                                "choose the one to download with --output-node")
    raise WorkflowError("workflow saves no image: add a SaveImage node (or name the output node with --output-node)")


def rewrite_workflow(wf: dict, image_node: str, image_name: str, output_node: str | None = None,
                     prefix: str | None = None) -> dict:
    """A copy with the image input set to ``image_name`` and the output node's filename_prefix set."""
    out = copy.deepcopy(wf)
    out[image_node].setdefault("inputs", {})["image"] = image_name
    if output_node is not None and prefix is not None and "filename_prefix" in out[output_node].get("inputs", {}):
        out[output_node]["inputs"]["filename_prefix"] = prefix
    return out


def _set_derain_input(wf: dict, name: str, value, flag: str) -> dict:
    out = copy.deepcopy(wf)
    hits = [n for n in out.values() if isinstance(n, dict) and n.get("class_type") in DERAIN_NODES]
    if not hits:
        raise WorkflowError(f"{flag} needs a CLIP-RPN Derain or Cross-Attention Derain node in the workflow; "
                            "this one has none")
    for n in hits:
        n.setdefault("inputs", {})[name] = value
    return out


def set_expert_check(wf: dict, on: bool = True) -> dict:
    """A copy of ``wf`` with the expert check switched on (or off) in every CLIP-RPN derain node."""
    return _set_derain_input(wf, "expert_check", bool(on), "--check")


def set_verify_light(wf: dict, on: bool = True) -> dict:
    """A copy of ``wf`` with the light routing's verification switched on (or off) in every CLIP-RPN derain node."""
    return _set_derain_input(wf, "verify_light", bool(on), "--no-verify")


def _new_id(wf: dict) -> str:
    return str(max([int(k) for k in wf if str(k).isdigit()] + [0]) + 1)


def add_pattern_taps(wf: dict, image_node: str, add_nodes: bool = False) -> tuple[dict, dict]:
    """A copy of ``wf`` where the summaries of its Rain Perceiver / Expert Router feed PreviewAny
    nodes (their text comes back in /history), and {"pattern"|"routing": tap node id}.
    ``add_nodes`` first adds a perceiver and a router on the image (same defaults as CLIP-RPN
    Derain: top_k 1, auto) when the workflow has a CLIP-RPN Loader but no perceiver/router."""
    out = copy.deepcopy(wf)
    first = (lambda kind: next((k for k in sorted(out, key=_node_order) if out[k]["class_type"] == kind), None))
    perc, rout = first(PERCEIVER), first(ROUTER)
    loader = first(LOADER)
    if add_nodes and perc is None and loader is not None:
        perc = _new_id(out)
        out[perc] = {"class_type": PERCEIVER, "inputs": {"model": [loader, 0], "image": [image_node, 0]}}
    if add_nodes and rout is None and perc is not None:
        rout = _new_id(out)
        out[rout] = {"class_type": ROUTER, "inputs": {"model": out[perc]["inputs"].get("model", [loader, 0]),
                                                      "pattern": [perc, 0], "top_k": 1, "temperature": 1.0,
                                                      "expert_override": EXPERT_AUTO}}
    taps = {}
    for kind, node in (("pattern", perc), ("routing", rout)):
        if node is not None:
            tid = _new_id(out)
            out[tid] = {"class_type": TEXT_TAP, "inputs": {"source": [node, 1]}}
            taps[kind] = tid
    return out, taps


def parse_pattern_text(text: str) -> tuple[str | None, str | None]:
    """Rain Perceiver summary -> (pattern line of the first image, perceived_by)."""
    pattern = by = None
    for line in str(text).splitlines():
        line = line.strip()
        if line.startswith("image ") and ":" in line and pattern is None:
            pattern = line.split(":", 1)[1].strip()
        elif line.startswith("(perceived by") and line.endswith(")"):
            by = line[len("(perceived by"):-1].strip()
    return pattern, by


def parse_routing_text(text: str) -> dict | None:
    """Expert Router summary ('image 1: light_streaks=1.00, veil=0.00') -> {expert: weight}."""
    for line in str(text).splitlines():
        if line.strip().startswith("image ") and ":" in line:
            out = {}
            for part in line.split(":", 1)[1].split(","):
                k, _, v = part.strip().partition("=")
                try:
                    out[k.strip()] = round(float(v), 4)
                except ValueError:
                    continue
            return out or None
    return None


def outputs_pattern(outputs: dict):
    """Rain pattern / routing from any UI output in /history that carries them (text or dedicated keys)."""
    pattern = routing = None
    for node in outputs.values():
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("pattern"), list) and node["pattern"]:
            pattern = str(node["pattern"][0])
        if isinstance(node.get("routing"), list) and node["routing"]:
            routing = node["routing"][0]
        for t in node.get("text", []) if isinstance(node.get("text"), list) else []:
            if isinstance(t, str) and "density:" in t and pattern is None:
                pattern = t
            elif isinstance(t, str) and t.startswith(("routing", "experts")) and routing is None:
                routing = t
    return pattern, routing
