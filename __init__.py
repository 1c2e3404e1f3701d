"""CLIP-RPN node pack for ComfyUI: adaptive deraining with CLIP rain perception, expert routing
and mask-guided cross-attention. Nodes use the V3 API (comfy_entrypoint); the model code is the
plain-PyTorch ``cliprpn_core`` package next to this file.

Deliberately no NODE_CLASS_MAPPINGS here: ComfyUI ignores comfy_entrypoint when it exists.
ComfyUI-Manager reads node_list.json instead."""
import logging

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # imported outside ComfyUI (e.g. by tooling): nothing to register
    ComfyExtension = None

if ComfyExtension is not None:
    class CLIPRPNExtension(ComfyExtension):
        async def get_node_list(self):
            from .nodes import load_nodes
            return load_nodes()

    async def comfy_entrypoint():
        return CLIPRPNExtension()
else:
    logging.getLogger("CLIP-RPN").debug("comfy_api not available; CLIP-RPN nodes not registered")
