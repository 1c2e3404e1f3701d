"""What the CLIP-RPN nodes do, in plain tensor code without ComfyUI: IMAGE/MASK layout, the socket payloads
(RAIN_PATTERN, RAIN_ROUTING, CLIPRPN_MODEL), expert choices, charts, the model folder's files and save
names, tiling with OOM back-off, and the synthesis wrapper. The model logic itself (inference, the fine-tune
loop) is cliprpn_core's.

Nothing here imports ComfyUI, so it is unit-tested directly; ``_host.py`` supplies the host
services (devices, progress, Cancel) as plain callables."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cliprpn_core import patterns as P
from ..cliprpn_core.arch import HANDOVER
from ..cliprpn_core import plotting
from ..cliprpn_core.finetune import loss_curve, rgb_only
from ..cliprpn_core.losses import PRESETS

CLIP_NONE = "none (built-in pattern head)"
DOWNLOAD_PREFIX = "download: "
SCHEDULES = tuple(PRESETS)  # every loss preset of the core, in its order
EXPERT_AUTO = "auto (router decides)"
REGIME_RANDOM = "random"
MIN_TILE = 128
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")


# -- layout ----------------------------------------------------------------------------------

def bhwc_to_bchw(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] -> [B,C,H,W] float32 (a single [H,W,C] image is accepted)."""
    if not torch.is_tensor(image):
        raise TypeError(f"{what} must be an IMAGE tensor, got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise ValueError(f"{what} must be an IMAGE batch [B,H,W,C], got shape {tuple(image.shape)}")
    return image.movedim(-1, 1).float()


def bchw_to_bhwc(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).contiguous()


def mask_to_b1hw(mask: torch.Tensor | None) -> torch.Tensor | None:
    """ComfyUI MASK [B,H,W] (or [H,W]) -> [B,1,H,W]."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() == 4 and mask.shape[1] == 1:
        return mask.float()
    if mask.dim() != 3:
        raise ValueError(f"mask must be a MASK [B,H,W], got shape {tuple(mask.shape)}")
    return mask[:, None].float()


# -- socket payloads ---------------------------------------------------------------------------

@dataclass
class RainPattern:
    """RAIN_PATTERN: per-image attribute probabilities [B, PATTERN_DIM] (CPU) and who perceived them."""
    probs: torch.Tensor
    source: str

    def summary(self) -> str:
        lines = [f"image {i + 1}: {P.describe(row)}" for i, row in enumerate(self.probs)]
        return "\n".join(lines + [f"(perceived by {self.source})"])


@dataclass
class RainRouting:
    """RAIN_ROUTING: per-image expert weights [B, E] (CPU); ``ranking`` [B, E]: the router's logits (None
    for a manual override), which the Derain node's expert check compares its two best experts by. ``handover``:
    the override "handover", every image to the network the light verification hands over to (the weights say
    heavy streaks)."""
    weights: torch.Tensor
    experts: tuple[str, ...]
    note: str = ""
    ranking: torch.Tensor | None = None
    handover: bool = False

    def summary(self) -> str:
        lines = []
        for i, row in enumerate(self.weights):
            used = [f"{self.experts[e] if e < len(self.experts) else e}={float(w):.2f}"
                    for e, w in enumerate(row) if float(w) > 0]
            lines.append(f"image {i + 1}: " + (f"{HANDOVER} network" if self.handover else ", ".join(used)))
        return "\n".join(lines)


@dataclass
class ModelHandle:
    """CLIPRPN_MODEL: one loaded model (+ optional CLIP perceiver), shared by every consumer.

    ``module`` holds both so the host moves them together; ``patcher`` is the host's wrapper."""
    model: torch.nn.Module
    perceiver: torch.nn.Module | None
    dtype: torch.dtype
    name: str
    clip_name: str | None = None
    module: torch.nn.Module | None = None
    patcher: object = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.module is None:
            parts = {"rpn": self.model}
            if self.perceiver is not None:
                parts["clip"] = self.perceiver
            self.module = torch.nn.ModuleDict(parts)

    @property
    def experts(self) -> tuple[str, ...]:
        n = self.model.config.num_experts
        return tuple(P.EXPERTS[:n]) + tuple(f"expert_{i}" for i in range(len(P.EXPERTS), n))

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.module.parameters()) + list(self.module.buffers()))


def expert_choices() -> list[str]:
    return [EXPERT_AUTO] + list(P.EXPERTS) + [HANDOVER]


def expert_index(choice: str | None, num_experts: int) -> int | None:
    """The Expert Router's override -> an expert's index, None for auto; "handover" -> the heavy-streaks index (its
    network, or the model's handover network, restores; see RainRouting.handover)."""
    if choice in (None, "", EXPERT_AUTO):
        return None
    if choice == HANDOVER:
        choice = "heavy_streaks"
    if choice not in P.EXPERTS:
        raise ValueError(f"unknown expert {choice!r}; choose one of {', '.join(expert_choices())}")
    i = P.EXPERTS.index(choice)
    if i >= num_experts:
        raise ValueError(f"expert {choice!r} is number {i}, but this model has only {num_experts} experts")
    return i


def pattern_chart(pattern: RainPattern) -> torch.Tensor:
    """One bar chart per image -> IMAGE [B,H,W,3]."""
    charts = []
    for i, row in enumerate(pattern.probs):
        groups = {a: [(c, float(p)) for c, p in zip(P.ATTRIBUTES[a], chunk)]
                  for a, chunk in P.split_pattern(row).items()}
        im = plotting.bar_chart(groups, title=f"rain pattern, image {i + 1} ({pattern.source})")
        charts.append(torch.from_numpy(plotting.to_array(im)))
    return torch.stack(charts)


def loss_chart(history: dict[str, list[float]], title: str) -> torch.Tensor:
    """The fine-tune's loss curve as an IMAGE [1,H,W,3]."""
    return bchw_to_bhwc(loss_curve(history, title))


# -- model files --------------------------------------------------------------------------------

def is_clip_file(name: str) -> bool:
    """CLIP weights follow '<ARCH>__<TAG>.safetensors'; CLIP-RPN checkpoints do not."""
    return "__" in Path(name).stem


def _hidden_or_clip_dir(name: str, clip_folders: set[str]) -> bool:
    parts = Path(name).parts
    return any(p.startswith(".") for p in parts) or (len(parts) > 1 and parts[0] in clip_folders)


def checkpoint_choices(files: list[str], clip_folders: list[str] = ()) -> list[str]:
    """CLIP-RPN checkpoints among the folder's files (not CLIP weights, not inside CLIP folders)."""
    cf = set(clip_folders)
    return sorted(f for f in files if f.lower().endswith(".safetensors") and not is_clip_file(f)
                  and not _hidden_or_clip_dir(f, cf) and Path(f).name != "open_clip_model.safetensors")


def clip_choices(files: list[str], folders: list[str], supported: dict) -> list[str]:
    """'none', local CLIP files and open_clip folders, then download options for models not present."""
    local = sorted(f for f in files if f.lower().endswith(".safetensors") and is_clip_file(f)
                   and not _hidden_or_clip_dir(f, set(folders)))
    local += sorted(folders)
    have = {Path(f).stem for f in local}
    downloads = [DOWNLOAD_PREFIX + name for name, (arch, tag) in supported.items() if f"{arch}__{tag}" not in have]
    return [CLIP_NONE] + local + downloads


def find_clip_folders(roots: list[str]) -> list[str]:
    """open_clip 'local-dir' folders (open_clip_config.json inside) directly under the model folders."""
    out = set()
    for r in roots:
        p = Path(r)
        if not p.is_dir():
            continue
        for d in p.iterdir():
            if d.is_dir() and (d / "open_clip_config.json").is_file():
                out.add(d.name)
    return sorted(out)


def resolve_in(roots: list[str], name: str, what: str, folder: str) -> Path:
    """First existing ``root/name``; a clear error naming every folder searched otherwise."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"invalid {what} name {name!r}")
    for r in roots:
        p = Path(r) / name
        if p.exists():
            return p
    raise FileNotFoundError(f"{what} {name!r} not found in the '{folder}' model folder; searched: "
                            + ", ".join(str(r) for r in roots))


def check_save_name(name: str, reserved: tuple[str, ...]) -> str | None:
    """'' -> None (do not save); otherwise a safe file stem, never a reserved (shipped) one."""
    name = (name or "").strip()
    if not name:
        return None
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"save name {name!r} may only use letters, digits, space, '.', '_' and '-' (no folders)")
    if "__" in name:
        raise ValueError(f"save name {name!r} must not contain '__' (that marks CLIP weight files)")
    if name.lower() in {r.lower() for r in reserved}:
        raise ValueError(f"save name {name!r} is the shipped default model; pick another name")
    return name


def check_overwrite(path: Path, read_metadata: Callable[[Path], dict]) -> bool:
    """May a fine-tune be saved to ``path``? A new name: yes. An existing file only when it is an
    earlier fine-tune output (its metadata says ``finetuned_from``); anything else (a downloaded or
    trained checkpoint, an unreadable file) is never replaced. -> True when a file is replaced."""
    if not path.exists():
        return False
    try:
        meta = read_metadata(path)
    except Exception:  # noqa: BLE001 - unreadable: not ours to replace
        meta = {}
    if "finetuned_from" not in meta:
        raise ValueError(f"{path.name} already exists in {path.parent} and is not an earlier fine-tune; "
                         "choose another save name")
    return True


# -- running with tiles and OOM back-off ---------------------------------------------------------

def run_with_backoff(fn: Callable[[int | None], object], tile: int | None, is_oom: Callable[[BaseException], bool],
                     on_oom: Callable[[], None] = lambda: None, first_tile: int = 512):
    """Run ``fn(tile)``; on out-of-memory halve the tile (an untiled run first becomes
    ``first_tile``) down to MIN_TILE, then re-raise. Other errors pass through unchanged."""
    while True:
        try:
            return fn(tile)
        except Exception as e:
            if not is_oom(e):
                raise
            on_oom()
            nxt = first_tile if not tile else tile // 2
            if nxt < MIN_TILE:
                raise
            tile = nxt


# -- synthesis ---------------------------------------------------------------------------------

def synthesize_rain(clean_bchw: torch.Tensor, seed: int, regime: str = REGIME_RANDOM):
    """-> (rainy [B,3,H,W], mask [B,1,H,W]) reproducible from ``seed``."""
    from ..cliprpn_core.synthesis import synthesize
    clean = rgb_only(clean_bchw).float().clamp(0, 1).contiguous()
    gen = torch.Generator().manual_seed(int(seed))
    reg = None if regime in (None, REGIME_RANDOM) else [P.EXPERTS.index(regime)] * clean.shape[0]
    s = synthesize(clean, gen, regime=reg)
    return s.rainy.clamp(0, 1), s.mask.clamp(0, 1)
