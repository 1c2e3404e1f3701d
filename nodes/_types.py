"""Socket types shared by the CLIP-RPN nodes (defined once so every node uses the same ones)."""
from comfy_api.latest import io

CATEGORY = "image/restoration/CLIP-RPN"

CLIPRPNModel = io.Custom("CLIPRPN_MODEL")
RainPattern = io.Custom("RAIN_PATTERN")
RainRouting = io.Custom("RAIN_ROUTING")
