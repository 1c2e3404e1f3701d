"""The one configuration object of a CLIP-RPN model. It is stored in every checkpoint."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from .patterns import EXPERTS

FORMAT_NAME = "clip-rpn"
FORMAT_VERSION = 1
MAX_PASSES = 8
HEAD_VIEW_GRID = 4  # crops per side at most when the pattern head views an image in crops (head_view)
# the shorter side of the photos every network here learned rain from (Rain100L and its training split: 481 x 321)
TRAINING_SHORT_SIDE = 321
# ... and an image is first downscaled (antialiased) to a shorter side of at most this many pixels, so that a large
# photo's rain is seen at the scale the head learned it (benchmarks/perception_scale.py)
HEAD_VIEW_SHORT = TRAINING_SHORT_SIDE
EXPERT_SCOPES = ("bottleneck", "network")
# the config fields that only say how a model runs, not which tensors it has (CLIPRPNConfig.same_weights ignores them)
INFERENCE_FIELDS = ("passes", "head_view", "verify_light_mask", "verify_heavy_mask", "verify_light_ramp",
                    "verify_heavy_routing")


def check_passes(passes) -> int:
    """A restoration pass count as int, or ValueError if it is outside 1..MAX_PASSES."""
    n = int(passes)
    if not 1 <= n <= MAX_PASSES:
        raise ValueError(f"passes must be 1..{MAX_PASSES}, got {passes}")
    return n


@dataclass(frozen=True)
class CLIPRPNConfig:
    in_channels: int = 3
    widths: tuple[int, ...] = (24, 48, 96)  # one per level; level i runs at 1/2**i resolution
    enc_blocks: tuple[int, ...] = (1, 1)  # blocks per encoder level above the bottleneck
    dec_blocks: tuple[int, ...] = (1, 1)  # blocks per decoder level above the bottleneck
    middle_blocks: int = 2  # shared bottleneck blocks, before the experts
    num_experts: int = len(EXPERTS)
    expert_blocks: int = 2  # blocks per expert sub-network (bottleneck)
    expert_dec_blocks: int = 1  # per-expert refinement blocks at the level above the bottleneck
    ffn_expand: int = 2
    attn_heads: int = 4
    attn_cell: int = 4  # bottleneck pixels per side pooled into one clean-context token
    attn_window: int = 3  # each query attends to the window x window tokens around its cell
    head_width: int = 32  # CLIP-free pattern head
    head_size: int = 256  # pattern head sees the image resized to this square
    # what the pattern head is shown of an image larger than this many pixels per side: 0 = the whole image resized to
    # head_size (as older models); N = crops of N x N pixels on a grid over the image (at most HEAD_VIEW_GRID per side,
    # the image first downscaled to a shorter side of at most HEAD_VIEW_SHORT pixels), their pattern probabilities
    # averaged. Training shows the head patch_size crops, so N = patch_size shows it rain at the scale it learned.
    head_view: int = 0
    passes: int = 1  # restoration passes: each pass restores the previous pass's output (shared weights)
    # "bottleneck": experts are bottleneck blocks plus one refinement level; the encoder, masks, cross-attention and
    # decoder are shared by all rain types. "network": every expert is a whole restoration network of its own (encoder,
    # masks, cross-attention, decoder: the shape above with one expert), so training one rain type moves nothing that
    # another uses; compute per image is the same under top-1 routing, parameters are num_experts times.
    expert_scope: str = "bottleneck"
    # the light routing verified (network scope): an image routed to the light-streaks network alone whose mean rain
    # mask from that network's own restoration pass is below this goes to the heavy-streaks network instead. The light
    # network's mask estimator recognises the rain it learned (every training image of its scores above the value the
    # shipped file sets); photographed downpours and rain haze, which perception takes for light rain, score below.
    # 0 = off (older files). Inference only: DerainOptions(verify=False) turns it off per call.
    verify_light_mask: float = 0.0
    # the light verification's handover confirmed by the heavy network (network scope, with verify_light_mask):
    # (lo, hi). An image handed over is restored as (1 - w) x the light network's restoration + w x the heavy
    # network's, where w is 0 if the heavy network's mean rain mask from its restoration pass is at most lo, 1 if it
    # is at least hi, linear between: an image neither network finds its rain in (a rain-free photo) keeps the light
    # network's light touch. Both restorations are run by the verification anyway. (0, 0) = off (older files): handed
    # over wholly. Inference only, turned off with the verification.
    verify_heavy_mask: tuple[float, float] = (0.0, 0.0)
    # the light verification made a ramp (network scope, with verify_light_mask, above it): an image routed to the
    # light network alone whose light mask is below this is verified, its handover share falling linearly from 1 at
    # verify_light_mask to 0 here (times the heavy network's confirmation, verify_heavy_mask), so that a light mask
    # near the threshold, which a retrained light network moves by a few thousandths, moves the restoration a little
    # instead of switching it between networks. An image at or above it is kept, at no extra cost. 0 = off (a step at
    # verify_light_mask: handed over below it, kept at or above). Inference only, turned off with the verification.
    verify_light_ramp: float = 0.0
    # perception's heavy routing verified by the heavy network's own mask (network scope, with verify_heavy_mask): an
    # image routed to the heavy-streaks network alone is restored by it, and where that network's mean rain mask from
    # its restoration pass is below verify_heavy_mask's hi, the light network restores it too and the two are mixed as
    # a confirmed handover is: the heavy network's share w is 0 at or below lo, 1 at or above hi, linear between. Light
    # rain that perception takes for heavy rain (the heavy network finds little of the rain it learned in it) gets the
    # light network's restoration; an image at or above hi costs nothing more. False = heavy routing is kept as routed
    # (older files). Inference only, turned off with the verification (DerainOptions(verify=False)).
    verify_heavy_routing: bool = False
    # a network of its own for the light verification's handovers (network scope, with verify_light_mask): the photos
    # the light network hands over (photographed downpours, rain haze) are restored by this network instead of the
    # heavy-streaks network, so that the network perception routes heavy rain to can be trained on heavy rain alone
    # while the handovers keep a network that suits them. Perception never routes to it. False = the heavy-streaks
    # network takes the handovers (older files).
    handover_network: bool = False

    def __post_init__(self):
        n = len(self.widths)
        if n < 2:
            raise ValueError("widths needs at least two levels")
        if len(self.enc_blocks) != n - 1 or len(self.dec_blocks) != n - 1:
            raise ValueError(
                f"enc_blocks and dec_blocks need {n - 1} entries for {n} widths, "
                f"got {self.enc_blocks} and {self.dec_blocks}"
            )
        if self.num_experts < 1:
            raise ValueError("num_experts must be at least 1")
        for w in self.widths:
            if w % self.attn_heads:
                raise ValueError(f"width {w} is not divisible by attn_heads={self.attn_heads}")
        if self.attn_window % 2 != 1:
            raise ValueError("attn_window must be odd")
        check_passes(self.passes)
        if self.head_view < 0:
            raise ValueError(f"head_view must be 0 (whole image) or a crop side in pixels, got {self.head_view}")
        if not 0.0 <= self.verify_light_mask < 1.0:
            raise ValueError(f"verify_light_mask must be in [0, 1) (0: off), got {self.verify_light_mask}")
        if self.verify_light_ramp and not (self.verify_light_mask > 0 and
                                           self.verify_light_mask < self.verify_light_ramp < 1.0):
            raise ValueError(f"verify_light_ramp must be 0 (off) or between verify_light_mask "
                             f"({self.verify_light_mask}) and 1, got {self.verify_light_ramp}")
        vh = tuple(float(v) for v in self.verify_heavy_mask)
        object.__setattr__(self, "verify_heavy_mask", vh)  # a list (JSON, a script) becomes the tuple it means
        if len(vh) != 2 or not 0.0 <= vh[0] <= vh[1] < 1.0:
            raise ValueError(f"verify_heavy_mask must be (lo, hi) with 0 <= lo <= hi < 1 ((0, 0): off), got {vh}")
        if self.expert_scope not in EXPERT_SCOPES:
            raise ValueError(f"expert_scope must be one of {EXPERT_SCOPES}, got {self.expert_scope!r}")
        if self.verify_heavy_routing and not (self.expert_scope == "network" and vh[1] > 0):
            raise ValueError("verify_heavy_routing needs expert_scope 'network' and verify_heavy_mask (lo, hi) with hi > 0 "
                             f"(the heavy network's mask that confirms heavy routing), got {self.expert_scope!r} and {vh}")
        if self.handover_network and self.expert_scope != "network":
            raise ValueError("handover_network needs expert_scope 'network' (a whole network per expert)")

    def one_network(self, **over) -> "CLIPRPNConfig":
        """The config of one of a whole-network-expert model's networks as a shared-network model (``expert_scope``
        "bottleneck"), with what only a whole-network-expert model can have turned off (the handover network, heavy
        routing's verification), and ``over`` applied."""
        return replace(self, **{"expert_scope": "bottleneck", "handover_network": False,
                                "verify_heavy_routing": False, **over})

    def same_weights(self, other: "CLIPRPNConfig") -> bool:
        """True when the two configs describe the same tensors (they may differ in the inference settings
        :data:`INFERENCE_FIELDS`)."""
        return replace(self, **{name: getattr(other, name) for name in INFERENCE_FIELDS}) == other

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.widths) - 1)

    @property
    def pad_multiple(self) -> int:
        """Input sides are padded to this multiple (downsampling times the attention cell)."""
        return self.scale_factor * self.attn_cell

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPRPNConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)} (written by a newer CLIP-RPN?)")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "CLIPRPNConfig":
        return cls.from_dict(json.loads(s))


def tiny_config(**over) -> CLIPRPNConfig:
    """A very small config for tests and smoke runs (random weights: never a real model)."""
    base = dict(widths=(8, 16), enc_blocks=(1,), dec_blocks=(1,), middle_blocks=1, expert_blocks=1,
                expert_dec_blocks=1, attn_heads=2, attn_cell=2, head_width=8, head_size=32)
    base.update(over)
    return CLIPRPNConfig(**base)
