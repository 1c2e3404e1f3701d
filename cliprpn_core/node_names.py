"""The ComfyUI node class names (node ids) this pack registers, by role, in one table.

Saved workflows refer to nodes by these ids, so they are a public contract: ``nodes/`` registers its
nodes under them and ``cliprpn batch`` (``cliprpn_core/batch/workflow.py``) finds and adds CLIP-RPN
nodes in API workflows by them. Plain constants: importable without ComfyUI or torch.
tests/comfy/test_node_names.py checks the table against the ids the pack's node schemas declare."""
from __future__ import annotations

LOADER = "CLIPRPNLoader"
RAIN_PERCEIVER = "CLIPRPNRainPerceiver"
EXPERT_ROUTER = "CLIPRPNExpertRouter"
MASK_ESTIMATOR = "CLIPRPNMaskEstimator"
CROSS_ATTENTION_DERAIN = "CLIPRPNCrossAttentionDerain"
DERAIN = "CLIPRPNDerain"
SYNTHESIZE_RAIN = "CLIPRPNSynthesizeRain"
FINETUNE = "CLIPRPNFinetune"

NODE_IDS = {
    "loader": LOADER,
    "rain_perceiver": RAIN_PERCEIVER,
    "expert_router": EXPERT_ROUTER,
    "mask_estimator": MASK_ESTIMATOR,
    "cross_attention_derain": CROSS_ATTENTION_DERAIN,
    "derain": DERAIN,
    "synthesize_rain": SYNTHESIZE_RAIN,
    "finetune": FINETUNE,
}

# the nodes that restore an image (and take ``expert_check``)
DERAIN_NODES = (DERAIN, CROSS_ATTENTION_DERAIN)

__all__ = [
    "CROSS_ATTENTION_DERAIN",
    "DERAIN",
    "DERAIN_NODES",
    "EXPERT_ROUTER",
    "FINETUNE",
    "LOADER",
    "MASK_ESTIMATOR",
    "NODE_IDS",
    "RAIN_PERCEIVER",
    "SYNTHESIZE_RAIN",
]
