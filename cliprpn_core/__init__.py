"""CLIP-RPN: CLIP-driven rain perception, pattern-aware expert routing and mask-guided
cross-attention deraining. Plain PyTorch; importable without ComfyUI."""
from .arch import CLIPRPN, ExpertRouter, MaskEstimator, MaskGuidedCrossAttention, PatternHead, pattern_probs, route
from .arch import route_pattern
from .checkpoint import CheckpointError, load_model, read_config, save_model
from .config import CLIPRPNConfig, tiny_config
from .inference import Derainer, DerainOptions, DerainResult
from .patterns import ATTRIBUTES, EXPERTS, PATTERN_DIM, describe

__version__ = "0.1.0"

DEFAULT_MODEL_NAME = "clip_rpn_default.safetensors"


def default_model_path():
    """The model shipped in the pack's models/ folder."""
    from pathlib import Path
    return Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL_NAME


__all__ = ["CLIPRPN", "CLIPRPNConfig", "ExpertRouter", "MaskEstimator", "MaskGuidedCrossAttention", "PatternHead",
           "pattern_probs", "route", "route_pattern", "CheckpointError", "load_model", "read_config", "save_model",
           "tiny_config", "Derainer", "DerainOptions", "DerainResult", "ATTRIBUTES", "EXPERTS", "PATTERN_DIM",
           "describe", "default_model_path", "DEFAULT_MODEL_NAME"]
