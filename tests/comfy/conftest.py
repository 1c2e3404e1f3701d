"""Fixtures for the ComfyUI layer: the pack imported as a package (unit tests) and a real
ComfyUI server (integration tests; COMFYUI_DIR must point at a ComfyUI checkout, else skipped)."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_server  # noqa: E402  (helpers next to this file)
from packutil import PACK_NAME, REPO, import_pack  # noqa: E402


@pytest.fixture(scope="session")
def node_logic():
    import_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.node_logic")


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
