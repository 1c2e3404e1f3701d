"""ComfyUI host services used by the nodes: the model folder, devices and dtypes, the
ModelPatcher wrapper, progress bars that are also Cancel checkpoints."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from ..cliprpn_core import DEFAULT_MODEL_NAME
from ..cliprpn_core.inference import resolve_dtype
from . import node_logic

log = logging.getLogger("CLIP-RPN")

FOLDER = "clip_rpn"
PACK_MODELS = Path(__file__).resolve().parent.parent / "models"
EXAMPLE_INPUTS = Path(__file__).resolve().parent.parent / "example_inputs"


def register_model_folder():
    """models/clip_rpn first, keep entries from extra_model_paths.yaml, the pack's own models/ last
    (so the shipped default works without copying)."""
    paths, _exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    own = str(Path(folder_paths.models_dir) / FOLDER)
    keep = [p for p in paths if p not in (own, str(PACK_MODELS))]
    folder_paths.folder_names_and_paths[FOLDER] = ([own] + keep + [str(PACK_MODELS)],
                                                   set(folder_paths.supported_pt_extensions))


def install_example_inputs(src: Path = EXAMPLE_INPUTS) -> list[str]:
    """Copy the example workflows' input images (example_inputs/*.png, made by
    scripts/make_example_inputs.py) into ComfyUI's input folder, where their Load Image nodes
    look. A file already there is never replaced (a user's own image of that name wins); any
    failure is logged, never raised. Returns the names copied."""
    import shutil
    copied = []
    try:
        dest = Path(folder_paths.get_input_directory())
        for f in sorted(src.glob("*.png")):
            target = dest / f.name
            if target.exists():
                continue
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / f".{f.name}.cliprpn.part"
            shutil.copyfile(f, tmp)
            tmp.replace(target)
            copied.append(f.name)
    except Exception as e:  # noqa: BLE001 - a read-only input folder must not stop the pack loading
        log.warning("CLIP-RPN: could not copy the example inputs into ComfyUI's input folder: %s", e)
    if copied:
        log.info("CLIP-RPN: example inputs %s copied into %s", ", ".join(copied), dest)
    return copied


def model_roots() -> list[str]:
    return list(folder_paths.get_folder_paths(FOLDER))


def save_dir() -> Path:
    """Where fine-tuned models go: the first (models/clip_rpn) folder, never the pack's models/."""
    for p in model_roots():
        if Path(p).resolve() != PACK_MODELS.resolve():
            return Path(p)
    return Path(folder_paths.models_dir) / FOLDER


def list_files() -> list[str]:
    try:
        return list(folder_paths.get_filename_list(FOLDER))
    except Exception as e:  # an unreadable folder must not break the node list
        log.warning("CLIP-RPN: could not list the %s model folder: %s", FOLDER, e)
        return []


def checkpoint_options() -> list[str]:
    opts = node_logic.checkpoint_choices(list_files(), node_logic.find_clip_folders(model_roots()))
    if DEFAULT_MODEL_NAME in opts:  # the shipped model first: it is the default choice
        opts.remove(DEFAULT_MODEL_NAME)
        opts.insert(0, DEFAULT_MODEL_NAME)
    return opts or [DEFAULT_MODEL_NAME]


def clip_options() -> list[str]:
    from ..cliprpn_core.perceiver import SUPPORTED_CLIP
    return node_logic.clip_choices(list_files(), node_logic.find_clip_folders(model_roots()), SUPPORTED_CLIP)


def resolve(name: str, what: str) -> Path:
    return node_logic.resolve_in(model_roots(), name, what, FOLDER)


# -- devices -----------------------------------------------------------------------------------

def load_device(choice: str) -> torch.device:
    return torch.device("cpu") if choice == "cpu" else mm.get_torch_device()


def offload_device(choice: str) -> torch.device:
    return torch.device("cpu") if choice == "cpu" else mm.unet_offload_device()


def pick_dtype(choice: str, device: torch.device, params: int = 0) -> torch.dtype:
    """The core's dtype policy (inference.resolve_dtype) with ComfyUI's answer to what ``device`` runs well."""
    def supports(dtype: torch.dtype) -> bool:
        ask = mm.should_use_bf16 if dtype == torch.bfloat16 else mm.should_use_fp16
        return bool(ask(device, model_params=params, prioritize_performance=True))
    return resolve_dtype(choice, device, supports)


def make_patcher(module: torch.nn.Module, device_choice: str):
    cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return cls(module, load_device=load_device(device_choice), offload_device=offload_device(device_choice))


def load_to_device(handle: node_logic.ModelHandle, image_pixels: int = 0) -> torch.device:
    """Ask ComfyUI to put the model on its load device (evicting others if needed); -> device."""
    if handle.patcher is None:
        return next(handle.model.parameters()).device
    tile_px = min(image_pixels, 512 * 512) if image_pixels else 512 * 512
    need = tile_px * 3 * 4 * 160  # activations of one tile, generous
    mm.load_models_gpu([handle.patcher], memory_required=need, force_full_load=True)
    return handle.patcher.load_device


def output(t: torch.Tensor) -> torch.Tensor:
    return t.to(mm.intermediate_device(), mm.intermediate_dtype())


def is_oom(e: BaseException) -> bool:
    try:
        return bool(mm.is_oom(e))
    except Exception:
        return isinstance(e, torch.cuda.OutOfMemoryError)


def free_after_oom():
    mm.soft_empty_cache()


def check_cancel():
    mm.throw_exception_if_processing_interrupted()


PREVIEW_MAX = 512  # longer side of progress previews (ComfyUI's default --preview-size)
PREVIEW_EVERY = 0.5  # seconds between two previews of one node (every tile would flood a fast GPU's socket)


def preview_tuple(image: torch.Tensor, max_side: int = PREVIEW_MAX):
    """[1,C,H,W] or [C,H,W] (0..1, C = 1 or 3) -> ComfyUI's progress preview ("JPEG", PIL image, max size)."""
    from PIL import Image
    t = image[0] if image.dim() == 4 else image
    a = (t.detach().float().clamp(0, 1).mul(255).round().byte().movedim(0, -1).cpu().numpy())
    pil = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a[..., :3]).convert("RGB")
    return ("JPEG", pil, max_side)


class Progress:
    """ProgressBar that is also a Cancel checkpoint; ``self(done, total)`` fits the core callbacks.

    ``offer(image)`` hands it a preview: ``image(max_side)`` -> [1,C,H,W] 0..1 (computed only when shown).
    The next update shows it on the node (ComfyUI's ProgressBar preview, the one the KSampler uses, which
    also reaches the new frontend's per-node progress); at most one preview every ``every`` seconds,
    and always on the last update."""

    def __init__(self, total: int = 1, every: float = PREVIEW_EVERY, clock=None):
        import time
        self.total = max(1, int(total))
        self.bar = comfy.utils.ProgressBar(self.total)
        self.every, self.clock = every, clock or time.monotonic
        self._image, self._shown = None, None

    def offer(self, image):
        self._image = image

    def show(self, image):
        """Show ``image`` now, at the bar's end (the finished result, when the last tile shown was not it)."""
        self.offer(image)
        self(self.total, self.total)

    def __call__(self, done: int, total: int):
        check_cancel()
        self.total = total
        image, self._image = self._image, None
        now = self.clock()
        if image is not None and (self._shown is None or now - self._shown >= self.every or done >= total):
            try:
                preview = preview_tuple(image(PREVIEW_MAX))
            except Exception as e:  # noqa: BLE001 - a preview must never fail the run
                log.debug("CLIP-RPN: no preview: %s", e)
            else:
                self._shown = now
                self.bar.update_absolute(done, total, preview)
                return
        self.bar.update_absolute(done, total)
