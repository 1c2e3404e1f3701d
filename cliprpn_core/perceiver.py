"""CLIP Rain Perceiver: zero-shot CLIP matching of an image against the rain-pattern prompt bank.

CLIP weights are loaded from local files only:
  * a safetensors checkpoint file named ``<ARCH>__<TAG>.safetensors`` (e.g.
    ``ViT-B-32__laion2b_s34b_b79k.safetensors``), or any name with ``arch=`` given; or
  * an open_clip ``local-dir`` folder with ``open_clip_config.json`` and ``open_clip_model.safetensors``.
OpenAI weights get QuickGELU (their towers were trained with it); the preprocessing (size,
mean, std) comes from open_clip's config for the architecture/folder.
``download_clip`` fetches a supported model on a machine that is online (never at import).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .patterns import ATTRIBUTES, CLASS_PHRASES, NUM_CLASSES, TEMPLATES

# display name -> (open_clip architecture, pretrained tag)
SUPPORTED_CLIP = {
    "ViT-B-32 LAION-2B": ("ViT-B-32", "laion2b_s34b_b79k"),
    "ViT-B-32 OpenAI": ("ViT-B-32-quickgelu", "openai"),
    "MobileCLIP2-S0": ("MobileCLIP2-S0", "dfndr2b"),
}
WHERE_TO_GET = ("put a CLIP safetensors file named like 'ViT-B-32__laion2b_s34b_b79k.safetensors' (or an open_clip "
                "folder with open_clip_config.json + open_clip_model.safetensors) there; on a machine that is online, "
                "`cliprpn fetch-clip \"ViT-B-32 LAION-2B\" DIR` or the loader node's download option gets one")


class CLIPMissingError(FileNotFoundError):
    pass


def _import_open_clip():
    try:
        import open_clip  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("CLIP perception needs the open_clip_torch package: pip install open_clip_torch") from e
    return open_clip


def prompt_texts() -> list[list[str]]:
    """For every class (attribute order), the prompt strings that are averaged into its embedding."""
    out = []
    for name, classes in ATTRIBUTES.items():
        for phrases in CLASS_PHRASES[name]:
            out.append([t.format(p) for p in phrases for t in TEMPLATES])
    return out


class RainPerceiver(torch.nn.Module):
    """CLIP image encoder + cached text embeddings of the prompt bank -> per-attribute probabilities."""

    def __init__(self, clip_model, tokenizer, mean, std, size, name: str, logit_scale: float = 100.0):
        super().__init__()
        self.clip = clip_model.eval().requires_grad_(False)
        self.name = name
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.logit_scale = logit_scale
        self.register_buffer("text", self._encode_prompts(tokenizer), persistent=False)

    @torch.no_grad()
    def _encode_prompts(self, tokenizer):
        embs = []
        for texts in prompt_texts():
            e = self.clip.encode_text(tokenizer(texts)).float()
            e = F.normalize(e, dim=-1).mean(0)
            embs.append(F.normalize(e, dim=-1))
        return torch.stack(embs)  # [PATTERN_DIM, D], computed once per CLIP model

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] 0..1 -> CLIP input: resize shorter side, center crop, normalise."""
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        x = F.interpolate(x.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        t, l = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., t:t + self.size, l:l + self.size]
        return (x - self.mean.to(x)) / self.std.to(x)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        dev = self.text.device
        p = self.preprocess(x.to(dev))
        dt = next(self.clip.parameters()).dtype
        img = F.normalize(self.clip.encode_image(p.to(dt)).float(), dim=-1)
        return self.logit_scale * img @ self.text.t()

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Per-attribute softmax over the matching scores: [B, PATTERN_DIM]."""
        return torch.cat([c.softmax(-1) for c in self.logits(x).split(list(NUM_CLASSES), -1)], -1)


def parse_clip_filename(path) -> tuple[str, str] | None:
    m = re.match(r"^(.+?)__(.+)$", Path(path).stem)
    return (m.group(1), m.group(2)) if m else None


def load_clip(path, arch: str | None = None, device="cpu") -> RainPerceiver:
    """Load CLIP from a local file or open_clip folder (see module docstring)."""
    import logging
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights" before we load them ourselves
    try:
        return _load_clip(path, arch, device)
    finally:
        root.setLevel(level)


def _load_clip(path, arch, device):
    open_clip = _import_open_clip()
    path = Path(path)
    if not path.exists():
        raise CLIPMissingError(f"CLIP weights not found: {path}. Expected in {path.parent}: {WHERE_TO_GET}")
    if path.is_dir():
        cfg_file = path / "open_clip_config.json"
        if not cfg_file.is_file():
            raise CLIPMissingError(f"CLIP folder {path} has no open_clip_config.json; {WHERE_TO_GET}")
        if not any(path.glob("*.safetensors")):
            raise CLIPMissingError(f"CLIP folder {path} has no open_clip_model.safetensors (pickle .bin weights are "
                                   f"not loaded); {WHERE_TO_GET}")
        cfg = json.loads(cfg_file.read_text())
        model = open_clip.create_model(f"local-dir:{path}", device="cpu")
        tok = open_clip.get_tokenizer(f"local-dir:{path}")
        pp = {**dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
              **cfg.get("preprocess_cfg", {})}
        size = cfg["model_cfg"]["vision_cfg"].get("image_size", 224)
        name = path.name
    else:
        if path.suffix.lower() != ".safetensors":
            raise CLIPMissingError(f"{path}: CLIP weights must be a .safetensors file (pickle files are not loaded); "
                                   f"{WHERE_TO_GET}")
        parsed = parse_clip_filename(path)
        tag = parsed[1] if parsed else ""
        arch = arch or (parsed[0] if parsed else None)
        if not arch:
            raise ValueError(f"{path.name}: cannot tell the CLIP architecture; name the file '<ARCH>__<TAG>.safetensors' "
                             f"(e.g. ViT-B-32__laion2b_s34b_b79k.safetensors) or pass arch=")
        if arch not in open_clip.list_models():
            raise ValueError(f"{path.name}: unknown open_clip architecture {arch!r}")
        quick = tag == "openai" or arch.endswith("quickgelu")
        model = open_clip.create_model(arch, pretrained=None, load_weights=False, force_quick_gelu=quick, device="cpu")
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file, it may be truncated ({e}); download it again") from e
        sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
        if missing or wrong:
            raise ValueError(f"{path.name} does not fit architecture {arch}: {len(missing)} missing and {len(wrong)} "
                             f"mis-shaped tensors (e.g. {(missing + wrong)[:3]}); check the file name's architecture")
        model.load_state_dict(sd, strict=False)
        tok = open_clip.get_tokenizer(arch)
        ppc = getattr(model.visual, "preprocess_cfg", None) or {}
        pp = {"mean": ppc.get("mean", (0.48145466, 0.4578275, 0.40821073)),
              "std": ppc.get("std", (0.26862954, 0.26130258, 0.27577711))}
        size = ppc.get("size", getattr(model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        name = f"{arch}/{tag}" if tag else arch
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return RainPerceiver(model, tok, tuple(pp["mean"]), tuple(pp["std"]), int(size), name).to(device)


def download_clip(choice: str, dest_dir, progress: Callable[[int, int], None] | None = None) -> Path:
    """Fetch a supported CLIP model (online machines only) into ``dest_dir`` as
    ``<ARCH>__<TAG>.safetensors``, atomically. Uses open_clip's hub names (HF_ENDPOINT is honoured).
    ``progress(done_bytes, total_bytes)``, when given, follows the download and is called once more with
    the whole file before it is copied into place (an exception raised there, e.g. a host's Cancel, stops
    before anything is written to ``dest_dir``)."""
    open_clip = _import_open_clip()
    if choice not in SUPPORTED_CLIP:
        raise ValueError(f"unknown CLIP choice {choice!r}; supported: {', '.join(SUPPORTED_CLIP)}")
    arch, tag = SUPPORTED_CLIP[choice]
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "").rstrip("/")
    if not hub:
        raise ValueError(f"{choice}: open_clip has no hub name for {arch}/{tag}")
    from huggingface_hub import hf_hub_download

    from .imageio import atomic_write_bytes
    dest = Path(dest_dir) / f"{arch}__{tag}.safetensors"
    extra = {} if progress is None else {"tqdm_class": _progress_tqdm(progress)}
    src = hf_hub_download(hub, filename="open_clip_model.safetensors", cache_dir=str(Path(dest_dir) / ".cache"),
                          **extra)
    if progress is not None:
        size = Path(src).stat().st_size
        progress(size, size)
    import shutil
    atomic_write_bytes(dest, lambda tmp: shutil.copyfile(src, tmp))
    return dest


def _progress_tqdm(progress: Callable[[int, int], None]):
    """A tqdm class (huggingface_hub's ``tqdm_class``) that also reports its bytes to ``progress(done, total)``."""
    from tqdm.auto import tqdm

    class ProgressTqdm(tqdm):
        done = 0  # counted here: a disabled console bar (HF_HUB_DISABLE_PROGRESS_BARS) does not count

        def update(self, n=1):
            out = super().update(n)
            self.done += n or 0
            if self.total:
                progress(min(int(self.done), int(self.total)), int(self.total))
            return out
    return ProgressTqdm
