"""ComfyUI nodes of CLIP-RPN (V3 API). Each part is imported on its own: a part whose import
fails is left out with a log line saying why, the rest of the pack still loads."""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger("CLIP-RPN")

PARTS = ("loader", "processing", "training")


def load_nodes() -> list:
    from . import _host
    _host.register_model_folder()
    _host.install_example_inputs()
    nodes = []
    for part in PARTS:
        try:
            mod = importlib.import_module(f".{part}", __name__)
        except Exception as e:  # noqa: BLE001 - one broken optional part must not hide the others
            log.warning("CLIP-RPN: the '%s' nodes are disabled: %s: %s", part, type(e).__name__, e)
            continue
        nodes.extend(mod.NODES)
    return nodes
