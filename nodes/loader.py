"""CLIP-RPN Loader: one CLIPRPN_MODEL (checkpoint + optional CLIP perceiver) for every other node."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.latest import io

from ..cliprpn_core import load_model
from ..cliprpn_core import node_names as N
from . import _host as H
from . import node_logic
from ._types import CATEGORY, CLIPRPNModel

log = logging.getLogger("CLIP-RPN")


def _clip_path(choice: str) -> Path:
    from ..cliprpn_core import perceiver
    if not choice.startswith(node_logic.DOWNLOAD_PREFIX):
        return H.resolve(choice, "CLIP model")
    name = choice[len(node_logic.DOWNLOAD_PREFIX):]
    if name not in perceiver.SUPPORTED_CLIP:
        raise ValueError(f"unknown CLIP download {name!r}; supported: {', '.join(perceiver.SUPPORTED_CLIP)}")
    arch, tag = perceiver.SUPPORTED_CLIP[name]
    fname = f"{arch}__{tag}.safetensors"
    for root in H.model_roots():
        if (Path(root) / fname).is_file():
            return Path(root) / fname
    dest = H.save_dir()
    log.info("CLIP-RPN: downloading CLIP %s into %s", name, dest)
    try:  # the bytes on the node's progress bar, which is also where Cancel is checked
        return perceiver.download_clip(name, dest, progress=H.Progress(1))
    except Exception as e:
        raise RuntimeError(f"could not download CLIP {name!r} into {dest} ({type(e).__name__}: {e}). Offline? "
                           f"Put {fname} into {dest} by hand, or choose '{node_logic.CLIP_NONE}'") from e


def load_handle(checkpoint: str, clip: str, device: str, dtype: str) -> node_logic.ModelHandle:
    ckpt = H.resolve(checkpoint, "CLIP-RPN checkpoint")
    model = load_model(ckpt, device="cpu")
    perceiver_mod, clip_name = None, None
    if clip and clip != node_logic.CLIP_NONE:
        from ..cliprpn_core.perceiver import load_clip
        perceiver_mod = load_clip(_clip_path(clip), device="cpu")
        clip_name = perceiver_mod.name
    dev = H.load_device(device)
    n = sum(p.numel() for p in model.parameters())
    dt = H.pick_dtype(dtype, dev, n)
    model = model.to(dt).eval().requires_grad_(False)
    if perceiver_mod is not None and dt != torch.float32:
        perceiver_mod.clip.to(dt)  # text embeddings stay fp32
    handle = node_logic.ModelHandle(model, perceiver_mod, dt, name=checkpoint, clip_name=clip_name,
                             info={"path": str(ckpt), "device": device})
    handle.patcher = H.make_patcher(handle.module, device)
    log.info("CLIP-RPN: loaded %s (%s, %s%s)", checkpoint, dev, str(dt).replace("torch.", ""),
             f", CLIP {clip_name}" if clip_name else "")
    return handle


class CLIPRPNLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=N.LOADER,
            display_name="CLIP-RPN Loader",
            category=CATEGORY,
            description="Loads a CLIP-RPN deraining model (and optionally a CLIP model for rain perception) once; "
                        "connect its output to every other CLIP-RPN node. ComfyUI moves it to the GPU, evicts it "
                        "when other models need room and frees it on 'Unload models'.",
            search_aliases=["derain", "rain removal", "clip-rpn"],
            inputs=[
                io.Combo.Input("checkpoint", options=H.checkpoint_options(),
                               tooltip="CLIP-RPN checkpoint (.safetensors) from models/clip_rpn. The shipped "
                                       "clip_rpn_default.safetensors in the pack's own models/ folder is always listed."),
                io.Combo.Input("clip", options=H.clip_options(), default=node_logic.CLIP_NONE,
                               tooltip="Optional CLIP model that perceives the rain pattern: a "
                                       "'<ARCH>__<TAG>.safetensors' file or an open_clip folder in models/clip_rpn. "
                                       "'download: ...' fetches a supported model into models/clip_rpn (online only). "
                                       "Without CLIP the model's built-in pattern head is used."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="auto: ComfyUI's device (GPU when there is one); cpu: always on the CPU."),
                io.Combo.Input("dtype", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                               tooltip="Weight precision. auto: bf16/fp16 where the GPU runs them well, fp32 on CPU."),
            ],
            outputs=[CLIPRPNModel.Output("model", tooltip="The loaded model; connect it to the other CLIP-RPN nodes.")],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint, clip=node_logic.CLIP_NONE, device="auto", dtype="auto"):
        """Reload when a chosen file is replaced on disk (e.g. a fine-tune saved again under the same
        name); otherwise the cached model is reused by every prompt."""
        parts = []
        for name in (checkpoint, clip):
            try:
                p = H.resolve(name, "file")
                st = p.stat()
                parts.append(f"{p}:{st.st_mtime_ns}:{st.st_size}")
            except (OSError, ValueError):
                parts.append(str(name))
        return "|".join(parts + [device, dtype])

    @classmethod
    def execute(cls, checkpoint, clip=node_logic.CLIP_NONE, device="auto", dtype="auto") -> io.NodeOutput:
        return io.NodeOutput(load_handle(checkpoint, clip, device, dtype))


NODES = [CLIPRPNLoader]
