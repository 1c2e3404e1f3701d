"""Import the repo root as a package, the way ComfyUI does (by path, under an arbitrary name),
so nodes/ is only ever imported relatively (never as a top-level `nodes`)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "cliprpn_pack_under_test"


def import_pack():
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = mod
        spec.loader.exec_module(mod)
    return sys.modules[PACK_NAME]
