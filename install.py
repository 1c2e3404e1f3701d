"""Run by ComfyUI-Manager (and comfy-cli) after `pip install -r requirements.txt`. Idempotent and quiet.

1. Makes sure ComfyUI's models/clip_rpn folder exists and the shipped default model is present.
2. Optional CLIP perception: open_clip_torch (and timm, which it uses for some CLIP models) need
   torchvision, and installing them with their dependencies into a Python that lacks torchvision pulls a
   torchvision from PyPI, which can bring a different torch and replace ComfyUI's (often a CUDA build).
   So they are never in requirements.txt, and this script never runs pip (ComfyUI's rule for install
   scripts): it prints one line with the exact command that enables CLIP in this Python — ``--no-deps``
   when a torchvision matching the installed torch is there, the matching torchvision first otherwise.
   Without CLIP the model's built-in pattern head perceives the rain.

The decision is the pure function ``clip_plan`` (tested with mocked versions in tests/test_packaging.py)."""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "models", "clip_rpn_default.safetensors")
CLIP_PACKAGES = ("open_clip_torch>=2.24", "timm>=1.0")  # installed with --no-deps
TAG = "[CLIP-RPN]"


@dataclass
class Plan:
    action: str  # "none" (CLIP packages already there) or "hint" (message says how to enable CLIP)
    message: str = ""
    packages: list[str] = field(default_factory=list)


def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"(\d+(?:\.\d+)*)", version or "")
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def _local(version: str) -> str:
    """The local tag of a version ('2.5.1+cu121' -> 'cu121'; '' for a plain PyPI build)."""
    return version.split("+", 1)[1] if "+" in (version or "") else ""


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release series built for a torch 2.x ('2.5.1+cu121' -> '0.20'); torchvision
    0.(m+15) pairs with torch 2.m (0.15 with 2.0, ..., 0.29 with 2.14). None for other torch majors."""
    r = _release(torch_version)
    if len(r) < 2 or r[0] != 2:
        return None
    return f"0.{r[1] + 15}"


def torchvision_matches(torch_version: str, tv_version: str) -> bool:
    want = matching_torchvision(torch_version)
    if want is None or _release(tv_version)[:2] != _release(want)[:2]:
        return False
    lt, lv = _local(torch_version), _local(tv_version)
    return not (lt and lv and lt != lv)  # a +cu121 torch with a +cpu torchvision does not match


def _enable_hint(torch_version: str) -> str:
    series = matching_torchvision(torch_version)
    tag = _local(torch_version)
    index = ["--index-url", f"https://download.pytorch.org/whl/{tag}"] if tag else []
    tv = (shlex.join([sys.executable, "-m", "pip", "install", f"torchvision=={series}.*", *index]) if series
          else "install the torchvision built for your torch")
    return f"To enable it: {tv}, then {shlex.join(pip_command(list(CLIP_PACKAGES)))}"


def clip_plan(torch_version: str | None, tv_version: str | None, open_clip_version: str | None,
              timm_version: str | None = None) -> Plan:
    """What to tell the user about the optional CLIP packages, from the installed versions (None = not
    installed). Never an action that installs anything."""
    if open_clip_version and _release(open_clip_version) >= (2, 24) and timm_version:
        return Plan("none")
    if torch_version is None:
        return Plan("hint", f"{TAG} torch is not installed in this Python; install ComfyUI's requirements first. "
                            "CLIP perception is off (the built-in pattern head is used).")
    pkgs = [p for p, have in zip(CLIP_PACKAGES, (open_clip_version, timm_version))
            if not have or (p.startswith("open_clip") and _release(have) < (2, 24))]
    off = "CLIP perception is off; the model's built-in pattern head perceives the rain. "
    if tv_version is None:
        return Plan("hint", f"{TAG} torchvision is not installed (torch {torch_version}); open_clip_torch needs it, and "
                            "pip would fetch one from PyPI that can replace your torch. " + off
                            + _enable_hint(torch_version), pkgs)
    if not torchvision_matches(torch_version, tv_version):
        return Plan("hint", f"{TAG} torchvision {tv_version} does not match torch {torch_version} (expected "
                            f"{matching_torchvision(torch_version) or '?'}.x with the same build tag). " + off
                            + _enable_hint(torch_version), pkgs)
    return Plan("hint", f"{TAG} {' '.join(p.split('>')[0] for p in pkgs)} not installed. " + off
                        + "To enable it (torch and torchvision are kept): " + shlex.join(pip_command(pkgs)), pkgs)


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pip_command(packages: list[str]) -> list[str]:
    """The command a user runs to add the CLIP packages to this Python without touching torch."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", *packages]


def _comfy_models_dir():
    # custom_nodes/<pack>/ -> ComfyUI/models (only when installed in the usual place)
    root = os.path.dirname(os.path.dirname(HERE))
    models = os.path.join(root, "models")
    return models if os.path.isdir(models) else None


def main():
    rc = 0
    models = _comfy_models_dir()
    if models:
        os.makedirs(os.path.join(models, "clip_rpn"), exist_ok=True)
    if not os.path.isfile(DEFAULT) or os.path.getsize(DEFAULT) < 1024:
        print(f"{TAG} the shipped model {DEFAULT} is missing or incomplete "
              "(git-lfs not installed?); reinstall the pack", file=sys.stderr)
        rc = 1
    plan = clip_plan(installed("torch"), installed("torchvision"), installed("open_clip_torch"), installed("timm"))
    if plan.message:
        print(plan.message)
    return rc


if __name__ == "__main__":
    sys.exit(main())
