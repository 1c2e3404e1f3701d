"""CLIP-RPN checkpoints: safetensors with the config and format version in the metadata.
Loading never unpickles, validates every key and shape, and says exactly what is wrong."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .arch import CLIPRPN
from .config import FORMAT_NAME, FORMAT_VERSION, CLIPRPNConfig
from .imageio import atomic_write_bytes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and what to do."""


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, hex (what provenance metadata and measurement caches name a checkpoint by)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_model(model: CLIPRPN, path, extra_meta: dict | None = None, dtype: torch.dtype | None = None):
    """Write model weights atomically. ``dtype`` (e.g. torch.float16) shrinks the file."""
    sd = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).cpu().contiguous()
          for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": model.config.to_json()}
    for k, v in (extra_meta or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    atomic_write_bytes(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def read_metadata(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
        raise CheckpointError(f"{path}: CLIP-RPN only loads .safetensors files (pickle files are never loaded for "
                              "safety); convert it with a trusted script or use a CLIP-RPN checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file, it may be truncated or corrupt ({e}); "
                              "download or copy it again") from e


def read_config(path) -> CLIPRPNConfig:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a CLIP-RPN checkpoint (metadata format={meta.get('format')!r}); "
                              "pick a file made by CLIP-RPN's train/fine-tune or the shipped default model")
    ver = int(meta.get("format_version", "0"))
    if ver > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {ver} is newer than this CLIP-RPN supports "
                              f"({FORMAT_VERSION}); update the CLIP-RPN node pack")
    try:
        return CLIPRPNConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: checkpoint config is missing or invalid ({e})") from e


def load_model(path, device="cpu", strict: bool = True) -> CLIPRPN:
    """Build the model from the stored config and load the weights, validating keys and shapes."""
    cfg = read_config(path)
    model = CLIPRPN(cfg)
    try:
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: could not read tensors, the file may be truncated or corrupt ({e})") from e
    load_state_checked(model, sd, str(path), strict=strict)
    return model.to(device).eval()


def load_state_checked(model: torch.nn.Module, sd: dict, where: str = "checkpoint", strict: bool = True):
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing and strict:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors with the wrong shape ({'; '.join(wrong[:3])})")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        problems.append(f"{len(bad)} tensors contain NaN/Inf (e.g. {', '.join(bad[:3])})")
    if problems:
        raise CheckpointError(f"{where} does not match its stored config: " + "; ".join(problems)
                              + ". The file is damaged or was edited; use an intact copy")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items() if k in own}, strict=False)


def describe(path) -> dict:
    """Summary for `cliprpn info`."""
    cfg = read_config(path)
    meta = read_metadata(path)
    model = load_model(path)
    n = sum(p.numel() for p in model.parameters())
    per_expert = sum(p.numel() for p in model.experts[0].parameters())
    info = {"path": str(path), "format_version": meta.get("format_version"), "config": json.loads(cfg.to_json()),
            "parameters": n, "parameters_per_expert": per_expert, "size_multiple": cfg.pad_multiple}
    for k, v in meta.items():
        if k not in ("format", "format_version", "config"):
            try:
                info[k] = json.loads(v)
            except ValueError:
                info[k] = v
    return info
