"""Fixtures for `cliprpn batch`: small test images, fake ComfyUI servers (always stopped), and real
ComfyUI servers for the integration tests (COMFYUI_DIR; skipped cleanly without it). The real
server helper is tests/comfy/comfy_server.py, imported by path under its own name."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from batch_helpers import make_images  # noqa: E402
from fake_comfy import FakeComfy  # noqa: E402


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "in", 8)


@pytest.fixture
def fakes():
    """fakes(n, **kw) -> list of started FakeComfy; all killed at teardown."""
    made = []

    def make(n=1, **kw):
        new = [FakeComfy(**kw).start() for _ in range(n)]
        made.extend(new)
        return new
    yield make
    for f in made:
        f.kill()


def comfy_server_module():
    name = "cliprpn_batch_comfy_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "comfy" / "comfy_server.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def comfy_servers(tmp_path_factory):
    """Two real ComfyUI servers with this pack loaded (CPU, loopback, random ports)."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("COMFYUI_DIR is not set: no ComfyUI server to test against")
    if not (Path(comfy_dir) / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={comfy_dir} has no main.py")
    cs = comfy_server_module()
    servers = []
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # two servers share a small machine
    try:
        for i in range(2):
            srv = cs.ComfyServer(Path(comfy_dir), REPO, tmp_path_factory.mktemp(f"comfy{i}"))
            servers.append(srv)
            srv.start()
        yield servers
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
        for srv in servers:
            srv.stop()
