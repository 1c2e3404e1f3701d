"""Packaging of the node pack: requirements.txt never pulls torch, install.py's CLIP decision (installed
versions mocked), the Registry entry in pyproject.toml (Icon) and what .comfyignore leaves out."""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "timm", "open-clip-torch", "open-clip", "xformers",
                "pytorch-lightning", "lightning", "accelerate", "kornia", "torchsde", "triton"}


def _load_install():
    spec = importlib.util.spec_from_file_location("cliprpn_install_under_test", REPO / "install.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


install = _load_install()


def _requirement_names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"pip option in {path.name}: {line!r} (ComfyUI-Manager installs line by line)"
        m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        assert m, f"unparsable requirement {line!r}"
        names.append(re.sub(r"[-_.]+", "-", m.group(0)).lower())
    return names


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# -- requirements.txt ------------------------------------------------------------------------------

def test_requirements_never_pull_torch():
    names = _requirement_names(REPO / "requirements.txt")
    assert names, "requirements.txt is empty"
    assert not set(names) & TORCH_FAMILY, f"torch-dependent packages in requirements.txt: {set(names) & TORCH_FAMILY}"
    assert all(n not in TORCH_FAMILY and not n.startswith(("torch", "open-clip", "nvidia-")) for n in names)


def test_requirements_have_no_hard_pins():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        assert "==" not in line and "<" not in line, f"pinned requirement {line!r}: lower bounds only"


def test_the_clip_packages_dependencies_that_are_pure_python_are_in_requirements():
    names = set(_requirement_names(REPO / "requirements.txt"))
    # open_clip_torch needs ftfy, regex, huggingface_hub, safetensors, tqdm; timm needs pyyaml
    assert {"ftfy", "regex", "huggingface-hub", "safetensors", "tqdm", "pyyaml"} <= names


# -- install.py: the CLIP decision -------------------------------------------------------------------

@pytest.mark.parametrize("torch_v, tv_v, ok", [
    ("2.5.1+cu121", "0.20.1+cu121", True),
    ("2.5.1", "0.20.0", True),
    ("2.14.1", "0.29.1", True),
    ("2.0.1+cu118", "0.15.2+cu118", True),
    ("2.5.1+cu121", "0.20.1+cpu", False),   # another build of the right release
    ("2.5.1+cu121", "0.21.0+cu121", False),  # built for torch 2.6
    ("2.5.1", "0.19.1", False),
    ("1.13.1", "0.14.1", False),  # torch 1.x: no rule, never guessed
])
def test_torchvision_matches_torch(torch_v, tv_v, ok):
    assert install.torchvision_matches(torch_v, tv_v) is ok


def test_cuda_torch_without_torchvision_says_how_to_get_the_matching_one():
    p = install.clip_plan("2.5.1+cu121", None, None, None)
    assert p.action == "hint"
    assert "torchvision" in p.message and "pattern head" in p.message
    assert 'torchvision==0.20.*' in p.message and "download.pytorch.org/whl/cu121" in p.message


def test_mismatched_torchvision_is_named():
    p = install.clip_plan("2.5.1+cu121", "0.20.1+cpu", None, None)
    assert p.action == "hint" and "does not match" in p.message


def test_matching_torchvision_gets_the_no_deps_command_for_the_clip_packages():
    p = install.clip_plan("2.5.1+cu121", "0.20.1+cu121", None, None)
    assert p.action == "hint"
    assert [re.split(r"[<>=]", x)[0] for x in p.packages] == ["open_clip_torch", "timm"]
    cmd = install.pip_command(p.packages)
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in cmd
    assert not any(re.match(r"\"?torch(vision|audio)?\b", a) for a in cmd)
    assert shlex.join(cmd) in p.message


def test_only_what_is_missing_is_named():
    p = install.clip_plan("2.5.1", "0.20.1", "2.30.0", None)
    assert len(p.packages) == 1 and p.packages[0].startswith("timm")
    p = install.clip_plan("2.5.1", "0.20.1", "2.20.0", "1.0.9")  # too old an open_clip
    assert p.packages[0].startswith("open_clip_torch")


def test_already_installed_is_idempotent_and_silent():
    p = install.clip_plan("2.5.1+cu121", None, "3.3.0", "1.0.31")
    assert p.action == "none" and p.message == ""


def test_no_torch_is_named():
    p = install.clip_plan(None, None, None, None)
    assert p.action == "hint" and "torch is not installed" in p.message


def test_main_never_runs_pip_or_any_subprocess(monkeypatch, capsys):
    import subprocess as sp

    def refuse(*a, **kw):
        raise AssertionError(f"install.py started a process: {a}")

    for name in ("run", "call", "check_call", "check_output", "Popen"):
        monkeypatch.setattr(sp, name, refuse)
    monkeypatch.setattr(install.os, "system", refuse)
    versions = {"torch": "2.5.1+cu121"}
    monkeypatch.setattr(install, "installed", lambda dist: versions.get(dist))
    for tv in (None, "0.20.1+cpu", "0.20.1+cu121"):
        versions["torchvision"] = tv
        assert install.main() == 0
        assert "pattern head" in capsys.readouterr().out
    versions.update({"open_clip_torch": "3.3.0", "timm": "1.0.31"})
    assert install.main() == 0 and capsys.readouterr().out == ""


# -- Registry entry ---------------------------------------------------------------------------------

def test_registry_icon_is_the_committed_square_png():
    data = _toml()
    comfy, urls = data["tool"]["comfy"], data["project"]["urls"]
    icon = comfy["Icon"]
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", urls["Repository"].rstrip("/"))
    assert m, urls["Repository"]
    prefix = f"https://raw.githubusercontent.com/{m.group(1)}/{m.group(2)}/main/"
    assert icon.startswith(prefix), f"Icon {icon!r} is not a raw address in the Repository {urls['Repository']}"
    path = REPO / icon[len(prefix):]
    assert path.is_file(), f"the Icon points at {path}, which is not in the repository"
    from PIL import Image
    with Image.open(path) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width == im.height <= 400
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "--error-unmatch", str(path)],
                             check=False, capture_output=True)
    assert tracked.returncode == 0 or not (REPO / ".git").exists(), f"{path} is not committed"


def test_registry_metadata_basics():
    data = _toml()
    proj, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", proj["version"])
    assert "comfyui" not in proj["name"].lower()
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    for inc in comfy.get("includes", []):  # includes override .comfyignore: only files that must ship
        assert (REPO / inc).is_file(), f"includes names {inc!r}, not a file of the pack"


# -- .comfyignore -----------------------------------------------------------------------------------

def _ignored(patterns: list[str], path: str) -> bool:
    import warnings
    pathspec = pytest.importorskip("pathspec")  # what comfy-cli matches with (gitwildmatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pathspec 1.x renamed it; comfy-cli still uses it
        return pathspec.PathSpec.from_lines("gitwildmatch", patterns).match_file(path)


def _comfyignore() -> list[str]:
    return [ln.strip() for ln in (REPO / ".comfyignore").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_comfyignore_lists_the_development_folders():
    pats = set(_comfyignore())
    for p in ("tests/", "benchmarks/", "experiments/", "docs/experiments.md", "scripts/", "runs/", ".ci/"):
        assert p in pats, f".comfyignore should leave out {p}"
    for keep in ("models", "workflows", "example_inputs", "nodes", "cliprpn_core", "docs/"):
        assert not any(p.rstrip("/") == keep.rstrip("/") or p.startswith(keep.rstrip("/") + "/") and p != "docs/experiments.md"
                       for p in pats), f".comfyignore must not leave out {keep}"


def test_comfyignore_matches_as_comfy_cli_does():
    pats = _comfyignore()
    for out in ("tests/test_packaging.py", "tests/comfy/conftest.py", "benchmarks/x.py", "experiments/a.toml",
                "docs/experiments.md", "scripts/make_icon.py", "runs/r/ckpt.safetensors", ".ci/run"):
        assert _ignored(pats, out), out
    for keep in ("models/clip_rpn_default.safetensors", "models/MODEL_CARD.md", "workflows/api/clip_rpn_full_graph.json",
                 "example_inputs/rainy.png", "nodes/processing.py", "cliprpn_core/inference.py", "__init__.py",
                 "install.py", "requirements.txt", "pyproject.toml", "node_list.json", "docs/icon.png",
                 "docs/pipeline.png", "LICENSE", "README.md"):
        assert not _ignored(pats, keep), keep
