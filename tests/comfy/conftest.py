"""Fixtures for the ComfyUI layer: the pack imported as a package (unit tests) and a real
ComfyUI server (integration tests; COMFYUI_DIR must point at a ComfyUI checkout, else skipped)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "cliprpn_pack_under_test"

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_server  # noqa: E402  (helpers next to this file)


def import_pack():
    """The repo root as a package (ComfyUI imports it the same way: by path, under any name)."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = mod
        spec.loader.exec_module(mod)
    return sys.modules[PACK_NAME]


@pytest.fixture(scope="session")
def ops():
    import_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.ops")


@pytest.fixture(scope="session")
def pack_core():
    import_pack()
    return importlib.import_module(f"{PACK_NAME}.cliprpn_core")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("COMFYUI_DIR is not set: no ComfyUI server to test against")
    if not (Path(comfy_dir) / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={comfy_dir} has no main.py")
    srv = comfy_server.ComfyServer(Path(comfy_dir), REPO, tmp_path_factory.mktemp("comfy"))
    try:
        srv.start()
    except Exception:
        srv.stop()
        raise
    yield srv
    srv.stop()
