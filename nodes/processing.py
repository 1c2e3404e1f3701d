"""Perceive, route, estimate masks and derain: thin nodes over cliprpn_core.inference."""
from __future__ import annotations

from dataclasses import replace

import torch
from comfy_api.latest import io

from ..cliprpn_core import node_names as N
from ..cliprpn_core.arch import HANDOVER, route_pattern
from ..cliprpn_core.config import MAX_PASSES
from ..cliprpn_core.inference import (
    DEFAULT_OVERLAP,
    MIN_WORK_SIDE,
    WORK_SIDE,
    Derainer,
    DerainOptions,
    check_work_side,
    count_tiles,
    work_size,
)
from . import _host as H
from . import node_logic
from ._types import CATEGORY, CLIPRPNModel, RainPattern, RainRouting

PERCEIVE_CHUNK = 16
EXPERT_CHECK_TIP = ("Where the two best-ranked experts are the two streak experts, restore with both and keep the "
                    "second only where the model finds clearly less rain left in its result (the image still goes "
                    "through one expert). About three times slower; a manual expert override is never checked.")


def derainer(handle: node_logic.ModelHandle, pixels: int = 0) -> Derainer:
    """A light Derainer on the device ComfyUI loaded the shared model to (no copy of weights)."""
    dev = H.load_to_device(handle, pixels)
    return Derainer(handle.model, handle.perceiver, device=dev, dtype=handle.dtype)


def _tile_inputs():
    return [
        io.Int.Input("tile", default=0, min=0, max=8192, step=8, advanced=True,
                     tooltip="Tile size in pixels (0 = automatic: the whole image, tiled above 2 MP on a GPU and "
                             "above about 0.3 MP on the CPU, where 384-px tiles run twice as fast). Halved "
                             "automatically down to 128 when the GPU runs out of memory."),
        io.Int.Input("overlap", default=DEFAULT_OVERLAP, min=0, max=512, step=8, advanced=True,
                     tooltip="Overlap between tiles; the seams are feathered across it."),
    ]


def _work_side_input():
    return io.Int.Input("work_side", default=WORK_SIDE, min=0, max=8192, step=1, optional=True, advanced=True,
                        tooltip=f"Working size: an image whose shorter side is above this many pixels is restored at "
                                f"that shorter side, and the rain removed there is taken off the full-size image, "
                                f"which keeps its own detail. The model learned rain on photos {WORK_SIDE} px on their "
                                f"shorter side; restored at full size, the larger rain of a big photo mostly stays. "
                                f"0 = restore at full size (slower; for rain that is fine at full size). Values from 1 "
                                f"to {MIN_WORK_SIDE - 1} are refused.")


def _verify_light_input():
    return io.Boolean.Input("verify_light", default=True, optional=True, advanced=True,
                            tooltip="With automatic routing, an image routed to light_streaks goes to heavy_streaks "
                                    "(or to the model's handover network, where it has one) instead where the light "
                                    "network finds too little of the rain it knows "
                                    "(photographed downpours and rain haze taken for light rain; the model's "
                                    "verify_light_mask, a model without it is never verified); where the heavy "
                                    "network finds little of its rain either (a rain-free photo; the model's "
                                    "verify_heavy_mask) the light network's result is kept or mixed in. With a model that "
                                    "sets verify_heavy_routing, an image routed to heavy_streaks in which the heavy "
                                    "network finds little of its rain gets the light network's result, or a mix. Off: "
                                    "every image keeps the network it is routed to. A forced expert is always kept.")


def perceive(handle: node_logic.ModelHandle, image: torch.Tensor) -> node_logic.RainPattern:
    x = node_logic.bhwc_to_bchw(image)
    d = derainer(handle, x.shape[-1] * x.shape[-2])
    bar = H.Progress(x.shape[0])
    probs, src = [], "pattern-head"
    for i in range(0, x.shape[0], PERCEIVE_CHUNK):
        p, src = d.perceive(x[i:i + PERCEIVE_CHUNK])
        probs.append(p)
        bar(min(i + PERCEIVE_CHUNK, x.shape[0]), x.shape[0])
    return node_logic.RainPattern(torch.cat(probs), src)


def route(handle: node_logic.ModelHandle, pattern: node_logic.RainPattern, top_k: int, temperature: float,
          expert: str) -> node_logic.RainRouting:
    if not isinstance(pattern, node_logic.RainPattern):
        raise TypeError("pattern must come from a CLIP Rain Perceiver node")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = handle.model.config.num_experts
    idx = node_logic.expert_index(expert, n)
    router = handle.model.router
    with torch.inference_mode():
        dev = next(router.parameters()).device
        w, logits = route_pattern(router, pattern.probs.to(dev), int(top_k), float(temperature), idx)
        w, logits = w.cpu(), logits.cpu()
        ranking = None if idx is not None else logits  # what the Derain node's expert check ranks by
    note = f"override {expert}" if idx is not None else f"top-{top_k}, temperature {temperature:g}"
    return node_logic.RainRouting(w, handle.experts, note, ranking, handover=expert == HANDOVER)


def estimate_mask(handle, image, tile=0, overlap=DEFAULT_OVERLAP, work_side=WORK_SIDE) -> torch.Tensor:
    x = node_logic.bhwc_to_bchw(image)
    d = derainer(handle, x.shape[-1] * x.shape[-2])
    h, w = work_size(*x.shape[-2:], check_work_side(int(work_side))) or x.shape[-2:]  # the size it is estimated at

    def run(t):
        total = x.shape[0] * count_tiles(h, w, t, overlap, d.multiple)
        bar, done = H.Progress(total), [0]

        def step(i, n):
            bar(done[0] + i, total)
            if i == n:
                done[0] += n
        return d.estimate_mask(x, tile=t, overlap=overlap, progress=step, preview=bar.offer, work_side=int(work_side))

    m = node_logic.run_with_backoff(run, tile or None, H.is_oom, H.free_after_oom)
    return m[:, 0]


def derain_options(top_k=1, temperature=1.0, tile=0, overlap=DEFAULT_OVERLAP, self_ensemble=False, passes=0,
                   expert_check=False, work_side=WORK_SIDE, verify_light=True) -> DerainOptions:
    """The Derain nodes' inputs as the core's DerainOptions (0 for tile and passes: the defaults)."""
    return DerainOptions(top_k=int(top_k), temperature=float(temperature), tile=int(tile) or None,
                         overlap=int(overlap), self_ensemble=bool(self_ensemble), passes=int(passes) or None,
                         check=bool(expert_check), work_side=int(work_side), verify=bool(verify_light))


def derain(handle, image, routing=None, mask=None, options: DerainOptions | None = None):
    """Derain an IMAGE batch [B,H,W,C] with per-tile progress and previews; a GPU out of memory halves the
    tile (an untiled run becomes 512-px tiles) down to 128 before giving up."""
    opt = options or DerainOptions()
    x = node_logic.bhwc_to_bchw(image)
    d = derainer(handle, x.shape[-1] * x.shape[-2])
    weights = ranking = None
    if routing is not None:
        if not isinstance(routing, node_logic.RainRouting):
            raise TypeError("routing must come from an Expert Router node")
        weights, ranking = routing.weights, routing.ranking
        if routing.handover:  # the override "handover": a manual choice, as the core's options carry it
            opt = replace(opt, expert=HANDOVER)
    m = node_logic.mask_to_b1hw(mask)

    def run(t):
        bar, shown = [None], [None]  # the preview comes before the tile's progress step

        def step(i, n):
            if bar[0] is None:
                bar[0] = H.Progress(n)
            if shown[0] is not None:
                bar[0].offer(shown[0])
                shown[0] = None
            bar[0](i, n)

        def preview(image):
            shown[0] = image
        r = d.derain(x, replace(opt, tile=t), routing=weights, mask=m, ranking=ranking, progress=step,
                     preview=preview)
        if bar[0] is not None and (opt.check or opt.self_ensemble):
            # the last tile shown was a candidate or one flip: show the kept (averaged) result
            bar[0].show(lambda max_side: r.images[-1:, :3])
        return r

    return node_logic.run_with_backoff(run, opt.tile or None, H.is_oom, H.free_after_oom)


class CLIPRainPerceiver(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=N.RAIN_PERCEIVER,
            display_name="CLIP Rain Perceiver",
            category=CATEGORY,
            description="Describes the rain in each image (density, orientation, intensity, form) with CLIP "
                        "zero-shot matching, or with the model's built-in pattern head when no CLIP is loaded.",
            inputs=[
                CLIPRPNModel.Input("model", tooltip="From CLIP-RPN Loader."),
                io.Image.Input("image", tooltip="Rainy images; every image of the batch is perceived on its own."),
            ],
            outputs=[
                RainPattern.Output("pattern", tooltip="Per-image rain-pattern scores, for the Expert Router."),
                io.String.Output("summary", tooltip="One readable line per image."),
                io.Image.Output("chart", tooltip="Bar chart of the scores, one per image."),
            ],
        )

    @classmethod
    def execute(cls, model, image) -> io.NodeOutput:
        pattern = perceive(model, image)
        return io.NodeOutput(pattern, pattern.summary(), H.output(node_logic.pattern_chart(pattern)))


class ExpertRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=N.EXPERT_ROUTER,
            display_name="Expert Router",
            category=CATEGORY,
            description="Turns rain patterns into expert weights: which restoration experts run on each image.",
            inputs=[
                CLIPRPNModel.Input("model", tooltip="From CLIP-RPN Loader."),
                RainPattern.Input("pattern", tooltip="From CLIP Rain Perceiver."),
                io.Int.Input("top_k", default=1, min=1, max=8,
                             tooltip="How many experts run per image (their weights sum to one)."),
                io.Float.Input("temperature", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="Softness of the mix between the top-k experts (higher = more even)."),
                io.Combo.Input("expert_override", options=node_logic.expert_choices(), default=node_logic.EXPERT_AUTO,
                               tooltip="Force one expert for every image instead of the router's choice. With auto, "
                                       "the Derain node hands an image routed to light_streaks to heavy_streaks "
                                       "where the light network finds too little of the rain it knows (downpours, "
                                       "rain haze); a forced expert is always kept. handover: the network those "
                                       "images go to (it lifts the grey haze of photographed downpours), for a photo "
                                       "the light network keeps."),
            ],
            outputs=[
                RainRouting.Output("routing", tooltip="Per-image expert weights for Cross-Attention Derain."),
                io.String.Output("summary", tooltip="The experts the router chose per image and their weights (before "
                                                    "the Derain node verifies light routing)."),
            ],
        )

    @classmethod
    def execute(cls, model, pattern, top_k=1, temperature=1.0, expert_override=node_logic.EXPERT_AUTO) -> io.NodeOutput:
        r = route(model, pattern, top_k, temperature, expert_override)
        return io.NodeOutput(r, r.summary())


class MaskEstimator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=N.MASK_ESTIMATOR,
            display_name="Rain Mask Estimator",
            category=CATEGORY,
            description="Estimates where rain hides the background (1 = rain). The MASK works with any node "
                        "that takes a MASK, e.g. inpainting or compositing.",
            inputs=[
                CLIPRPNModel.Input("model", tooltip="From CLIP-RPN Loader."),
                io.Image.Input("image", tooltip="Rainy images (whole batch, any size)."),
                *_tile_inputs(),
                _work_side_input(),
            ],
            outputs=[io.Mask.Output("mask", tooltip="Rain mask per image, 0..1, same size as the image.")],
        )

    @classmethod
    def execute(cls, model, image, tile=0, overlap=DEFAULT_OVERLAP, work_side=WORK_SIDE) -> io.NodeOutput:
        return io.NodeOutput(H.output(estimate_mask(model, image, tile, overlap, work_side)))


class CrossAttentionDerain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=N.CROSS_ATTENTION_DERAIN,
            display_name="Cross-Attention Derain",
            category=CATEGORY,
            description="Removes rain with mask-guided cross-attention and the routed experts. Without a routing "
                        "input each image is perceived and routed on its own; a MASK input replaces the estimated "
                        "rain mask. Large images are tiled with feathered overlap.",
            inputs=[
                CLIPRPNModel.Input("model", tooltip="From CLIP-RPN Loader."),
                io.Image.Input("image", tooltip="Rainy images (whole batch, any size)."),
                RainRouting.Input("routing", optional=True,
                                  tooltip="From Expert Router; one row per image (or one row for all)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Rain mask guiding the attention (1 = rain); resized to the image."),
                io.Int.Input("top_k", default=1, min=1, max=8, advanced=True,
                             tooltip="Experts per image when no routing is connected."),
                io.Float.Input("temperature", default=1.0, min=0.05, max=10.0, step=0.05, advanced=True,
                               tooltip="Expert mix softness when no routing is connected."),
                *_tile_inputs(),
                io.Boolean.Input("self_ensemble", default=False, optional=True, advanced=True,
                                 tooltip="Average the results of the image and its three flips: a little "
                                         "cleaner (+0.3 dB on Rain100L), four times slower."),
                io.Int.Input("passes", default=0, min=0, max=MAX_PASSES, optional=True, advanced=True,
                             tooltip="Restoration passes: each pass restores the previous result again "
                                     "(0 = the checkpoint's own setting). More passes remove more rain, "
                                     "and take that many times longer."),
                io.Boolean.Input("expert_check", default=False, optional=True, advanced=True,
                                 tooltip=EXPERT_CHECK_TIP),
                _work_side_input(),
                _verify_light_input(),
            ],
            outputs=[
                io.Image.Output("image", tooltip="Derained images, same size and channels as the input."),
                io.Mask.Output("rain_mask", tooltip="The rain mask the model estimated (1 = rain)."),
            ],
        )

    @classmethod
    def execute(cls, model, image, routing=None, mask=None, top_k=1, temperature=1.0, tile=0,
                overlap=DEFAULT_OVERLAP, self_ensemble=False, passes=0, expert_check=False,
                work_side=WORK_SIDE, verify_light=True) -> io.NodeOutput:
        r = derain(model, image, routing, mask,
                   derain_options(top_k, temperature, tile, overlap, self_ensemble, passes, expert_check, work_side,
                                  verify_light))
        return io.NodeOutput(H.output(node_logic.bchw_to_bhwc(r.images)), H.output(r.masks[:, 0]))


class CLIPRPNDerain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=N.DERAIN,
            display_name="CLIP-RPN Derain",
            category=CATEGORY,
            description="One-node deraining: perceives, routes and restores each image of the batch.",
            search_aliases=["derain", "remove rain", "rain removal"],
            inputs=[
                CLIPRPNModel.Input("model", tooltip="From CLIP-RPN Loader."),
                io.Image.Input("image", tooltip="Rainy images (whole batch, any size)."),
                io.Boolean.Input("expert_check", default=False, optional=True, advanced=True,
                                 tooltip=EXPERT_CHECK_TIP),
                _work_side_input(),
                _verify_light_input(),
            ],
            outputs=[io.Image.Output("image", tooltip="Derained images.")],
        )

    @classmethod
    def execute(cls, model, image, expert_check=False, work_side=WORK_SIDE, verify_light=True) -> io.NodeOutput:
        r = derain(model, image, options=derain_options(expert_check=expert_check, work_side=work_side,
                                                        verify_light=verify_light))
        return io.NodeOutput(H.output(node_logic.bchw_to_bhwc(r.images)))


NODES = [CLIPRainPerceiver, ExpertRouter, MaskEstimator, CrossAttentionDerain, CLIPRPNDerain]
