"""CLIP-RPN network: pattern head, expert router, mask estimator, mask-guided cross-attention
restorer with routed expert sub-networks. Plain PyTorch.

Shapes: images are [B, 3, H, W] in 0..1 with H, W multiples of ``config.pad_multiple``
(``inference.py`` pads). Nothing in the restorer pools over the whole image, so tiled inference
matches untiled inference once the tile overlap covers the receptive field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .config import HEAD_VIEW_GRID, HEAD_VIEW_SHORT, INFERENCE_FIELDS, CLIPRPNConfig, check_passes
from .patterns import EXPERTS, NUM_CLASSES, PATTERN_DIM, prior_routing_matrix


class LayerNorm2d(nn.Module):
    """Per-pixel layer norm over channels, computed in fp32 for fp16/bf16 safety."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        # layer_norm over the last dim of an NHWC view: one fused kernel, fast with channels_last
        y = F.layer_norm(x.permute(0, 2, 3, 1).float(), x.shape[1:2], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype).permute(0, 3, 1, 2)


class Block(nn.Module):
    """NAFNet-style gated block without global channel attention (keeps tiling exact).

    A block whose residual scales ``beta`` and ``gamma`` are all zero computes the identity (the blocks that
    :func:`grow_from` adds, and a network assembled beside a deeper one carries them). Without gradients
    (inference) such a block is skipped, which is exact for finite inputs: one network may then be deeper than the
    others of the same model at no cost to them. With gradients it runs, so that its zero scales can learn, unless
    both scales are frozen (``requires_grad`` off: a block a run keeps removed); then it is skipped there too.

    Without gradients the scales are also folded into the 1x1 convolutions before them (``pw2``, ``ffn2``: the
    same map up to float rounding), which saves two full-size multiplications per block, and each residual sum is
    taken in place in the convolution's fresh output.
    """

    def __init__(self, c: int, expand: int = 2):
        super().__init__()
        h = c * expand
        self.norm1 = LayerNorm2d(c)
        self.pw1 = nn.Conv2d(c, h, 1)
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h)
        self.pw2 = nn.Conv2d(h // 2, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.ffn1 = nn.Conv2d(c, h, 1)
        self.ffn2 = nn.Conv2d(h // 2, c, 1)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

        self._inference_key = None  # what the inference cache was computed from
        self._inference = None  # (is the identity, pw2 and ffn2 weights and biases with the scales folded in)

    def _apply(self, fn, *args, **kwargs):
        self._inference_key = self._inference = None  # moved or cast: the folded copies must not keep old memory
        return super()._apply(fn, *args, **kwargs)

    def _inference_cache(self):
        """(identity, w2, b2, w3, b3), cached: recomputed (small reductions and products, a device sync) only after
        the scales or the folded convolutions changed in place (their version counters), were replaced, or moved.
        Weights made in ``torch.inference_mode`` (a model loaded inside a ComfyUI node) carry no version counter;
        they cannot be trained, and are taken as fixed while they stay in place."""
        params = (self.beta, self.gamma, self.pw2.weight, self.pw2.bias, self.ffn2.weight, self.ffn2.bias)
        key = tuple((id(p), None if p.is_inference() else p._version, p.data_ptr(), p.device, p.dtype)
                    for p in params)
        if key != self._inference_key:
            with torch.no_grad():
                beta, gamma = self.beta.reshape(-1), self.gamma.reshape(-1)
                identity = not (bool(beta.any()) or bool(gamma.any()))
                self._inference = (identity,
                                   self.pw2.weight * beta.view(-1, 1, 1, 1), self.pw2.bias * beta,
                                   self.ffn2.weight * gamma.view(-1, 1, 1, 1), self.ffn2.bias * gamma)
            self._inference_key = key
        return self._inference

    def is_identity(self) -> bool:
        """Whether ``beta`` and ``gamma`` are all zero (cached, see :meth:`_inference_cache`)."""
        return self._inference_cache()[0]

    def forward(self, x):
        if torch.is_grad_enabled():  # training: the scales may then change where no version counter sees it
            self._inference_key = self._inference = None  # (a fused optimiser's step): decide afresh next time
            if not (self.beta.requires_grad or self.gamma.requires_grad or self.beta.any() or self.gamma.any()):
                return x  # frozen at zero: the identity, and nothing of it can learn
            y = self.dw(self.pw1(self.norm1(x)))
            a, b = y.chunk(2, 1)
            x = x + self.pw2(a * b) * self.beta
            a, b = self.ffn1(self.norm2(x)).chunk(2, 1)
            return x + self.ffn2(a * b) * self.gamma
        identity, w2, b2, w3, b3 = self._inference_cache()
        if identity:
            return x
        a, b = self.dw(self.pw1(self.norm1(x))).chunk(2, 1)
        x = F.conv2d(a * b, w2, b2).add_(x)
        a, b = self.ffn1(self.norm2(x)).chunk(2, 1)
        return F.conv2d(a * b, w3, b3).add_(x)


def _blocks(c: int, n: int, expand: int) -> nn.Sequential:
    return nn.Sequential(*[Block(c, expand) for _ in range(n)])


class PatternHead(nn.Module):
    """CLIP-free rain-pattern classifier: predicts the same per-attribute distribution as the CLIP
    perceiver from a downscaled copy of the image plus its high-pass residual (rain is high
    frequency)."""

    def __init__(self, width: int = 32, size: int = 256):
        super().__init__()
        self.size = size
        w = width
        layers = []
        cin = 6
        for i, cout in enumerate((w, w, 2 * w, 2 * w, 4 * w)):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.GELU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(2 * cin, 2 * cin), nn.GELU(), nn.Linear(2 * cin, PATTERN_DIM))

    def forward(self, x):
        x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=True).to(self.fc[0].weight.dtype)
        hp = x - F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        f = self.features(torch.cat([x, hp * 4], 1))
        f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return self.fc(f)  # logits [B, PATTERN_DIM]


def head_views(x: torch.Tensor, side: int, grid: int = HEAD_VIEW_GRID, short: int = HEAD_VIEW_SHORT):
    """The crops the pattern head views an image in (``config.head_view``): ``None`` when ``side`` is 0 or the image
    is at most ``side`` pixels in both directions or under it in one (the head then sees the whole image), else
    (crops [B * n, C, side, side], n). An image whose shorter side is above ``short`` pixels (at least ``side``; 321 by
    default, the training photos' 481 x 321) is first downscaled (antialiased) to that shorter side, so that the rain of
    a large photo is seen at the scale the head learned it; the crops lie on an even grid of ceil(extent / side)
    positions per axis, at most ``grid``, from edge to edge (overlapping where the extent is not a multiple of
    ``side``): 12 crops of 128 px for a 481 x 321 or a 4:3 photo, 9 for a square one."""
    h, w = x.shape[-2:]
    if not side or max(h, w) <= side or min(h, w) < side:
        return None
    short = max(int(short), side)
    if min(h, w) > short:
        s = short / min(h, w)
        h, w = max(side, round(h * s)), max(side, round(w * s))
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True).to(x.dtype)

    def starts(n):
        k = min(grid, -(-n // side))
        return [round(i * (n - side) / (k - 1)) for i in range(k)] if k > 1 else [0]
    crops = [x[..., y:y + side, c:c + side] for y in starts(h) for c in starts(w)]
    return torch.stack(crops, 1).flatten(0, 1), len(crops)


def pattern_probs(logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-attribute softmax of concatenated logits."""
    return torch.cat([c.float().mul(scale).softmax(-1) for c in logits.split(list(NUM_CLASSES), -1)], -1)


class ExpertRouter(nn.Module):
    """Pattern probabilities -> expert weights (top-k, temperature, manual override).

    Starts from an interpretable prior mapping and learns a correction on top of it.
    Experts whose weight is zero for an image are not executed for that image."""

    def __init__(self, num_experts: int):
        super().__init__()
        prior = prior_routing_matrix()[:, :num_experts]
        self.register_buffer("prior", prior, persistent=False)
        self.linear = nn.Linear(PATTERN_DIM, num_experts)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.num_experts = num_experts

    def logits(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.float()
        return 4.0 * probs @ self.prior.to(probs) + self.linear(probs.to(self.linear.weight.dtype)).float()

    def forward(self, probs: torch.Tensor, top_k: int = 1, temperature: float = 1.0,
                override: int | None = None) -> torch.Tensor:
        """Returns expert weights [B, E] that sum to one per row, zeros outside the top-k."""
        return route_pattern(self, probs, top_k, temperature, override)[0]


def route_pattern(router: ExpertRouter, probs: torch.Tensor, top_k: int = 1, temperature: float = 1.0,
                  override: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing step, the one place pattern probabilities [B, PATTERN_DIM] become a routing:
    router logits -> expert weights. Returns ``(weights [B, E], logits [B, E] float32)``; the logits are
    the ranking the expert check compares experts by (meaningless under a manual ``override``, which sets
    the weights alone). Runs where ``probs`` are (move them to the router's device first)."""
    logits = router.logits(probs)
    return route(logits, top_k=top_k, temperature=temperature, override=override), logits


def route(logits: torch.Tensor, top_k: int = 1, temperature: float = 1.0,
          override: int | None = None) -> torch.Tensor:
    """Router logits [B, E] -> expert weights [B, E]: a softmax at ``temperature`` over the ``top_k``
    largest logits, zeros elsewhere; ``override`` sends every row to that one expert instead."""
    b, e = logits.shape
    if override is not None:
        if not 0 <= override < e:
            raise ValueError(f"expert override {override} is out of range: this model has {e} experts (0..{e - 1})")
        w = torch.zeros_like(logits, dtype=torch.float32)
        w[:, override] = 1.0
        return w
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = max(1, min(int(top_k), e))
    top, idx = logits.float().topk(k, dim=-1)
    w = torch.zeros_like(logits, dtype=torch.float32)
    w.scatter_(1, idx, (top / temperature).softmax(-1))
    return w


class MaskEstimator(nn.Module):
    """Multi-scale rain masks from the encoder features: one logit map per level, fused at full
    resolution. Returns (fused logits, [per-level logits])."""

    def __init__(self, widths):
        super().__init__()
        self.heads = nn.ModuleList([nn.Conv2d(w, 1, 3, padding=1) for w in widths])
        self.fuse = nn.Conv2d(len(widths), 1, 1)

    def forward(self, feats):
        full = feats[0].shape[-2:]
        per = [h(f) for h, f in zip(self.heads, feats)]
        up = [p if p.shape[-2:] == full else F.interpolate(p, size=full, mode="bilinear", align_corners=False)
              for p in per]
        return self.fuse(torch.cat(up, 1)) + up[0], per


class MaskGuidedCrossAttention(nn.Module):
    """Rainy-region features attend to clean-region context.

    Keys/values are tokens pooled over cells of ``cell``x``cell`` pixels, weighted by how clean
    each pixel is (1 - mask); every pixel queries the ``window``x``window`` tokens around its cell,
    with a log-cleanliness bias so that clean cells dominate. The result enters the feature map
    gated by the mask. Cost is linear in pixel count: HW x window^2 per head.
    """

    def __init__(self, c: int, heads: int, cell: int, window: int):
        super().__init__()
        self.heads, self.cell, self.window = heads, cell, window
        self.norm = LayerNorm2d(c)
        self.q = nn.Conv2d(c, c, 1)
        self.kv = nn.Conv2d(c, 2 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.gate = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x, mask):
        b, c, h, w = x.shape
        s, n, hd = self.cell, self.window, self.heads
        d = c // hd
        if h % s or w % s:
            raise ValueError(f"feature size {h}x{w} is not a multiple of the attention cell {s}")
        Y, X = h // s, w // s
        y = self.norm(x)
        clean = (1.0 - mask.float()).clamp_min(0) + 1e-3  # [b,1,h,w]
        kv = self.kv(y).float()
        wsum = F.avg_pool2d(clean, s)  # [b,1,Y,X]
        tok = F.avg_pool2d(kv * clean, s) / wsum  # clean-weighted mean per cell
        pad = n // 2
        tok = F.unfold(tok, n, padding=pad).view(b, 2 * c, n * n, Y, X)
        bias = F.unfold(wsum.log(), n, padding=pad).view(b, 1, n * n, Y, X)
        valid = F.unfold(torch.ones_like(wsum), n, padding=pad).view(b, 1, n * n, Y, X)
        bias = bias.masked_fill(valid < 0.5, float("-inf"))
        k, v = tok.view(b, 2, hd, d, n * n, Y, X).unbind(1)
        q = self.q(y).float().view(b, hd, d, Y, s, X, s)
        logits = torch.einsum("bhdyixj,bhdnyx->bhnyixj", q, k) / math.sqrt(d)
        attn = (logits + bias.view(b, 1, n * n, Y, 1, X, 1)).softmax(2)
        out = torch.einsum("bhnyixj,bhdnyx->bhdyixj", attn, v).reshape(b, c, h, w).to(x.dtype)
        return x + self.proj(out) * mask.to(x.dtype) * self.gate


class Expert(nn.Module):
    """One specialised sub-network of the shared network: bottleneck blocks plus refinement blocks one level up."""

    def __init__(self, cfg: CLIPRPNConfig):
        super().__init__()
        c = cfg.widths[-1]
        self.body = _blocks(c, cfg.expert_blocks, cfg.ffn_expand)
        self.refine = _blocks(cfg.widths[-2], cfg.expert_dec_blocks, cfg.ffn_expand)

    def forward(self, bottom, up, skip):
        return self.refine(up(self.body(bottom)) + skip)


@dataclass
class CLIPRPNOutput:
    image: torch.Tensor | None  # [B,3,H,W] restored (not clamped during training); None if not restored
    mask_logits: torch.Tensor | None  # [B,1,H,W] fused rain-mask logits
    mask_pyramid: list  # per-level logits
    routing: torch.Tensor  # [B,E] expert weights used
    pattern_logits: torch.Tensor | None  # pattern head logits when it ran
    router_logits: torch.Tensor | None = None  # router logits when perception ran
    pass_images: list = field(default_factory=list)  # outputs of the passes before the last one


def _map(fn, out):
    return type(out)(_map(fn, o) for o in out) if isinstance(out, (tuple, list)) else fn(out)


def _zip_map(fn, acc, out):
    if isinstance(out, (tuple, list)):
        return type(out)(_zip_map(fn, a, o) for a, o in zip(acc, out))
    return fn(acc, out)


# the handover network's name (CLIPRPNConfig.handover_network), taken by CLIPRPN.restore in place of a routing
HANDOVER = "handover"
# the expert slot a handover network sits in when it is written as (or taken from) a shared-network file: it is a
# heavy-rain network, trained as one (``route_all_to`` = this index)
HANDOVER_SLOT = EXPERTS.index("heavy_streaks")


def _sole_expert(routing: torch.Tensor) -> int | None:
    """The expert every image is routed to at weight exactly 1 (top-1 routing of a whole batch), else None."""
    active = (routing > 0).any(0).nonzero().flatten()
    if active.numel() != 1:
        return None
    e = int(active[0])
    return e if bool((routing[:, e] == 1).all()) else None


class Restorer(nn.Module):
    """The restoration network: encoder -> multi-scale masks -> MGCA -> routed experts -> decoder.
    The whole CLIP-RPN model is one (expert_scope "bottleneck"), or holds one per expert ("network")."""

    def __init__(self, config: CLIPRPNConfig):
        super().__init__()
        self.config = config
        self._build_restorer(config)

    def _build_restorer(self, cfg: CLIPRPNConfig):
        W = cfg.widths
        self.intro = nn.Conv2d(cfg.in_channels, W[0], 3, padding=1)
        self.encoders = nn.ModuleList([_blocks(W[i], cfg.enc_blocks[i], cfg.ffn_expand) for i in range(len(W) - 1)])
        self.downs = nn.ModuleList([nn.Conv2d(W[i], W[i + 1], 2, stride=2) for i in range(len(W) - 1)])
        self.middle = _blocks(W[-1], cfg.middle_blocks, cfg.ffn_expand)
        self.mask_estimator = MaskEstimator(W)
        self.mgca = MaskGuidedCrossAttention(W[-1], cfg.attn_heads, cfg.attn_cell, cfg.attn_window)
        self.ups = nn.ModuleList([nn.Sequential(nn.Conv2d(W[i + 1], W[i] * 4, 1), nn.PixelShuffle(2))
                                  for i in range(len(W) - 1)])
        self.decoders = nn.ModuleList([_blocks(W[i], cfg.dec_blocks[i], cfg.ffn_expand) for i in range(len(W) - 1)])
        self.experts = nn.ModuleList([Expert(cfg) for _ in range(cfg.num_experts)])
        self.outro = nn.Conv2d(W[0], cfg.in_channels, 3, padding=1)

    def encode(self, x):
        feats = []
        h = self.intro(x)
        for enc, down in zip(self.encoders, self.downs):
            h = enc(h)
            feats.append(h)
            h = down(h)
        h = self.middle(h)
        feats.append(h)
        return feats

    def _masks(self, x, routing=None):
        """-> (fused mask logits, per-level logits) from the encoder (``routing`` is for the network scope)."""
        return self.mask_estimator(self.encode(x))

    def _restore_once(self, x, routing, mask=None):
        feats = self.encode(x)
        mask_logits, pyramid = self.mask_estimator(feats)
        bottom = feats[-1]
        if mask is None:
            m = torch.sigmoid(pyramid[-1].float())
        else:
            m = F.adaptive_avg_pool2d(mask.float(), bottom.shape[-2:])
        bottom = self.mgca(bottom, m)
        skip = feats[-2]
        routing = routing.to(x.device)
        only = _sole_expert(routing)
        if only is not None:  # one expert takes every image at weight 1: no weighted sum needed
            h = self.experts[only](bottom, self.ups[-1], skip)
        else:
            h = self._mixed_experts(bottom, skip, routing)
        n = len(self.decoders)
        h = self.decoders[n - 1](h)
        for i in range(n - 2, -1, -1):
            h = self.decoders[i](self.ups[i](h) + feats[i])
        return x + self.outro(h), mask_logits, pyramid

    def _mixed_experts(self, bottom, skip, routing):
        """The routing-weighted sum of the experts' outputs; an expert no image is routed to never runs."""
        h = torch.zeros_like(skip)
        for e, expert in enumerate(self.experts):
            idx = (routing[:, e] > 0).nonzero().flatten()
            if idx.numel() == 0:
                continue  # not routed to: never executed
            if idx.numel() == bottom.shape[0]:
                h = h + routing[:, e].view(-1, 1, 1, 1).to(h.dtype) * expert(bottom, self.ups[-1], skip)
            else:
                y = expert(bottom[idx], self.ups[-1], skip[idx])
                h = h.index_add(0, idx, routing[idx, e].view(-1, 1, 1, 1).to(h.dtype) * y)
        return h


class CLIPRPN(Restorer):
    """The whole model. ``forward`` = pattern head -> router -> encoder -> masks -> MGCA ->
    routed experts -> decoder. Routing/perception can be supplied from outside (CLIP, a node).
    With ``config.expert_scope == "network"`` each expert is a whole :class:`Restorer` of its own
    (``self.experts[e]``), run only on the images routed to it. With ``config.handover_network`` it also has
    ``self.handover``, a whole network of the same shape that perception never routes to: the light verification's
    handovers go to it (``restore(x, HANDOVER)``)."""

    def __init__(self, config: CLIPRPNConfig | None = None):
        nn.Module.__init__(self)
        cfg = self.config = config or CLIPRPNConfig()
        self.pattern_head = PatternHead(cfg.head_width, cfg.head_size)
        self.router = ExpertRouter(cfg.num_experts)
        if cfg.expert_scope == "network":
            one = cfg.one_network(num_experts=1)
            self.experts = nn.ModuleList([Restorer(one) for _ in range(cfg.num_experts)])
            if cfg.handover_network:
                self.handover = Restorer(one)
        else:
            self._build_restorer(cfg)

    @property
    def network_experts(self) -> bool:
        return self.config.expert_scope == "network"

    # -- pieces usable on their own -------------------------------------------------------
    def perceive(self, x: torch.Tensor) -> torch.Tensor:
        """Pattern-head logits [B, PATTERN_DIM] (CLIP-free perception). With ``config.head_view`` the head sees
        crops of that side (:func:`head_views`) and the result is the log of their mean per-attribute probabilities
        (so :func:`pattern_probs` of it gives those means)."""
        views = head_views(x, self.config.head_view)
        if views is None:
            return self.pattern_head(x)
        crops, n = views  # the head runs on at most HEAD_VIEW_GRID**2 crops at once, whatever the batch
        logits = torch.cat([self.pattern_head(c) for c in crops.split(HEAD_VIEW_GRID ** 2)])
        probs = pattern_probs(logits).view(x.shape[0], n, -1).mean(1)
        return probs.clamp_min(1e-12).log().to(crops.dtype)

    def estimate_mask(self, x, routing=None):
        """Fused rain-mask logits at the (padded) input resolution. Network-scope experts each have their own
        mask estimator: the masks of the experts ``routing`` (default: the model's own top-1 routing) picks."""
        return self._masks(x, routing)[0]

    def _masks(self, x, routing=None):
        if not self.network_experts:
            return super()._masks(x)
        if routing is None:
            routing = self.router(pattern_probs(self.perceive(x)))
        return self._per_expert(x, routing, lambda r, xs, idx: r._masks(xs))

    def _restore_once(self, x, routing, mask=None):
        if not self.network_experts:
            return super()._restore_once(x, routing, mask)
        one = torch.ones(1, 1, device=x.device)

        def run(r, xs, idx):
            return r._restore_once(xs, one.expand(xs.shape[0], 1), None if mask is None else mask[idx])
        return self._per_expert(x, routing, run)

    def _per_expert(self, x, routing, run):
        """Network scope: ``run(restorer, images, their indices)`` on the images routed to each expert (the others
        never run), its tensors (or lists of tensors) weighted by the routing and summed per image."""
        routing = routing.to(x.device)
        only = _sole_expert(routing)
        if only is not None:  # one expert takes every image at weight 1: its output as it is (no weighted sum)
            return run(self.experts[only], x, torch.arange(x.shape[0], device=x.device))
        total = None
        for e, restorer in enumerate(self.experts):
            idx = (routing[:, e] > 0).nonzero().flatten()
            if idx.numel() == 0:
                continue  # not routed to: never executed
            whole = idx.numel() == x.shape[0]
            out = run(restorer, x if whole else x[idx], idx)
            w = routing[idx, e].view(-1, 1, 1, 1)
            if total is None:
                total = _map(lambda t: t.new_zeros((x.shape[0], *t.shape[1:])), out)
            total = _zip_map(lambda acc, t: acc.index_add(0, idx, w.to(t.dtype) * t), total, out)
        return total

    def restore(self, x, routing, mask=None, passes=None):
        """Restore with given expert weights [B,E], or with the handover network (``routing`` = ``HANDOVER``, a
        model with ``config.handover_network``). ``mask`` (0..1, [B,1,H,W]) overrides the
        estimated one in the cross-attention. ``passes`` (default: the config's) restores the
        previous pass's output again with the same weights and routing; the masks returned are
        those of the first pass (the rain of the input)."""
        images, mask_logits, pyramid = self.restore_passes(x, routing, mask, passes)
        return images[-1], mask_logits, pyramid

    def restore_passes(self, x, routing, mask=None, passes=None):
        """-> (the image after each pass, first-pass mask logits, first-pass mask pyramid)."""
        passes = self.config.passes if passes is None else check_passes(passes)
        once = self._restore_once
        if isinstance(routing, str):
            if routing != HANDOVER or not self.config.handover_network:
                raise ValueError(f"routing {routing!r}: only {HANDOVER!r} is a named routing, and only for a model "
                                 "with a handover network (config.handover_network)")
            one = torch.ones(x.shape[0], 1, device=x.device)
            once = lambda xs, _r, m: self.handover._restore_once(xs, one, m)  # noqa: E731
        y, mask_logits, pyramid = once(x, routing, mask)
        images = [y]
        for _ in range(passes - 1):
            # the next pass sees a valid image, as at the first pass (clamp passes gradients inside 0..1)
            y = once(y.clamp(0, 1), routing, mask)[0]
            images.append(y)
        return images, mask_logits, pyramid

    def forward(self, x, routing=None, pattern_logits=None, top_k=1, temperature=1.0, override=None,
                mask=None, with_pattern=False, passes=None, own_routing=None, restore=True) -> CLIPRPNOutput:
        """``routing`` given: use it (training routes by synthetic labels). ``with_pattern``: also run
        the pattern head and router so their losses share this forward (one DDP forward).
        ``own_routing`` (bool [B], with ``routing``): these samples go where the model's own router
        sends them instead (its top expert), from the same pattern-head pass. ``restore=False``: perception
        and routing only (training perception alone); the output's image and masks are None."""
        if pattern_logits is None and (routing is None or with_pattern or own_routing is not None):
            pattern_logits = self.perceive(x)
        router_logits = None
        if pattern_logits is not None:
            # the router learns on top of perception; it does not push gradients into the head
            routed, router_logits = route_pattern(self.router, pattern_probs(pattern_logits).detach(),
                                                  top_k, temperature, override)
        if routing is None:
            routing = routed
        elif own_routing is not None:
            own = route(router_logits.detach().float(), top_k=1).to(routing.dtype)
            routing = torch.where(own_routing.to(routing.device).view(-1, 1), own, routing)
        if not restore:
            return CLIPRPNOutput(None, None, [], routing, pattern_logits, router_logits)
        images, ml, pyr = self.restore_passes(x, routing, mask, passes)
        return CLIPRPNOutput(images[-1], ml, pyr, routing, pattern_logits, router_logits, images[:-1])


# the config fields a model may grow (or a network be grown) in: grow_from's added blocks are the identity
_BLOCK_COUNTS = ("enc_blocks", "dec_blocks", "middle_blocks", "expert_blocks", "expert_dec_blocks")


def grow_from(model: CLIPRPN, src: CLIPRPN, probe_size: int = 0) -> list[str]:
    """Initialise ``model`` from a smaller trained ``src`` that differs only in block counts.

    Every tensor of ``src`` must exist in ``model`` with the same shape; the tensors ``model`` has
    beyond it must belong to extra NAFNet blocks, which start as the identity (their residual
    scales ``beta``/``gamma`` are zero), so the grown model computes exactly what ``src`` computed
    and training only adds capacity. ``model`` may also make every expert a whole network where ``src``
    shares one (expert_scope "bottleneck" -> "network"): expert e's network then starts as a copy of ``src``'s
    network with its expert e, again computing what ``src`` computed under top-1 routing. Returns the names of
    the new tensors (the added blocks'). ``probe_size`` > 0 checks that identity on a random probe image of that
    side, for every expert."""
    own, sd = model.state_dict(), src.state_dict()
    if model.config.expert_scope == "network" and src.config.expert_scope == "bottleneck":
        sd = {**shared_to_network_experts(sd, range(model.config.num_experts)), **_perception_state(sd)}
    extra_src = sorted(set(sd) - set(own))
    wrong = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if extra_src or wrong:
        raise ValueError("cannot grow: the new config is not a superset of the old one "
                         f"(tensors only in the old model: {extra_src[:3]}; different shapes: {wrong[:3]}). "
                         f"Only block counts ({', '.join(_BLOCK_COUNTS)}) may grow, and expert_scope may go from "
                         "bottleneck to network")
    new = sorted(set(own) - set(sd))
    blocks = {name for name, m in model.named_modules() if isinstance(m, Block)}
    for k in new:
        if k.rsplit(".", 1)[0] not in blocks and k.rsplit(".", 2)[0] not in blocks:
            raise ValueError(f"cannot grow: new tensor {k} is not part of an added block")
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Block) and f"{name}.beta" in new:
                m.beta.zero_()
                m.gamma.zero_()
    if probe_size:
        g = torch.Generator().manual_seed(0)
        dev = next(model.parameters()).device  # the model may already be on a GPU; src is moved there for the probe
        x = torch.rand(1, 3, probe_size, probe_size, generator=g).to(dev)
        src.to(dev)
        model_mode, src_mode = model.training, src.training
        model.eval(), src.eval()
        d = 0.0
        with torch.no_grad():
            for e in range(model.config.num_experts):
                r = torch.zeros(1, model.config.num_experts, device=dev)
                r[0, e] = 1.0
                d = max(d, (model(x, routing=r, passes=1).image - src(x, routing=r, passes=1).image).abs().max().item())
            if model.config.handover_network and src.config.handover_network:
                d = max(d, (model.restore(x, HANDOVER, passes=1)[0] - src.restore(x, HANDOVER, passes=1)[0]).abs().max().item())
        model.train(model_mode), src.train(src_mode)
        if d > 1e-5:
            raise RuntimeError(f"grown model differs from its source by {d:.2e} on a probe image")
    return new


PERCEPTION_MODULES = ("pattern_head", "router")  # the top-level modules of perception (the rest restores)


def shared_to_network_experts(state: dict, experts) -> dict:
    """The expert networks of a bottleneck-scope state dict as network-scope tensors, for the expert indices in
    ``experts``: expert e's network gets a copy of every shared tensor and, as its one expert, expert e's tensors.
    Perception (pattern head, router) is left out: callers take it from the model they name for it."""
    wanted = {str(e) for e in experts}
    out = {}
    for k, v in state.items():
        top = k.split(".", 1)[0]
        if top in PERCEPTION_MODULES:
            continue
        if top == "experts":
            _, e, rest = k.split(".", 2)
            if e in wanted:
                out[f"experts.{e}.experts.0.{rest}"] = v
        else:
            for e in sorted(wanted, key=int):
                out[f"experts.{e}.{k}"] = v.clone()
    return out


def _perception_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in PERCEPTION_MODULES}


def _check_shared_source(source: CLIPRPN, cfg: CLIPRPNConfig, what: str) -> None:
    if source.config.expert_scope != "bottleneck" or not source.config.same_weights(cfg):
        raise ValueError(f"{what} is not a shared-network model (expert_scope 'bottleneck') of the same config: "
                         "assemble from checkpoints trained with the same widths, blocks and experts")


def _covering_block_counts(configs) -> dict:
    """The block counts of the smallest config every one of ``configs`` can grow to: the largest count of each field
    (per level for ``enc_blocks``/``dec_blocks``); empty when they have different numbers of levels."""
    out = {}
    for name in _BLOCK_COUNTS:
        values = [getattr(c, name) for c in configs]
        if isinstance(values[0], tuple):
            if len({len(v) for v in values}) > 1:  # a different number of levels: not a growth
                return {}
            out[name] = tuple(max(level) for level in zip(*values))
        else:
            out[name] = max(values)
    return out


def _config_difference(a, b) -> str:
    diff = [f"{f.name} {getattr(a, f.name)!r} against {getattr(b, f.name)!r}" for f in fields(a)
            if getattr(a, f.name) != getattr(b, f.name) and f.name not in _BLOCK_COUNTS + INFERENCE_FIELDS]
    return "; ".join(diff) or "block counts"


def _grown_to(model: CLIPRPN, counts: dict) -> CLIPRPN:
    grown = CLIPRPN(replace(model.config, **counts))
    grow_from(grown, model)
    return grown


def replace_network_experts(model: CLIPRPN, sources: dict) -> CLIPRPN:
    """A copy of the network-scope ``model`` in which expert e's network is ``sources[e]``'s shared network with its
    expert e (each source a bottleneck-scope model, e.g. a longer-trained light specialist); the other experts'
    networks and perception stay ``model``'s. Sources and ``model`` may differ in block counts (a light network given
    a deeper bottleneck, a base whose heavy network was grown): the result has, for each count, the largest of them,
    and whatever is smaller is grown to it first (:func:`grow_from`: identity blocks, skipped at inference, so every
    network computes what it computed)."""
    cfg = model.config
    if cfg.expert_scope != "network":
        raise ValueError("replace_network_experts needs a model whose experts are whole networks (expert_scope "
                         "'network'); build one from shared-network checkpoints with network_experts_from")
    for e in sources:
        if not 0 <= e < cfg.num_experts:
            raise ValueError(f"expert {e} is out of range: the model has {cfg.num_experts} experts")
    shared = cfg.one_network()
    differ = [s.config for s in sources.values() if s.config.expert_scope == "bottleneck"
              and not s.config.same_weights(shared)]
    if differ:
        counts = _covering_block_counts([cfg, *differ])
        target = replace(shared, **counts) if counts else None
        other = [c for c in differ if target is None or not replace(c, **counts).same_weights(target)]
        if other:
            raise ValueError("a source's config is neither the model's nor a grown or shrunk version of it: it differs "
                             f"in more than block counts ({_config_difference(other[0], shared)}). Only block counts "
                             f"({', '.join(_BLOCK_COUNTS)}) may differ")
        if target != shared:
            model = _grown_to(model, counts)  # perception, and how it views an image, stay the model's
            cfg, shared = model.config, target
        sources = {e: s if s.config.expert_scope != "bottleneck" or s.config.same_weights(shared)
                   else _grown_to(s, counts) for e, s in sources.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for e, s in sources.items():
        _check_shared_source(s, shared, f"the source for expert {e}")
        state.update(shared_to_network_experts(s.state_dict(), [e]))  # perception stays the model's
    out = CLIPRPN(cfg)
    out.load_state_dict(state)
    return out


def shared_network_of(model: CLIPRPN, expert: int | str) -> CLIPRPN:
    """Expert ``expert``'s network of the network-scope ``model`` as a shared-network (bottleneck-scope) model, the
    inverse of :func:`replace_network_experts` for that expert: its shared layers are that network's, its expert
    ``expert`` is that network's expert, and each other expert j gets network j's expert block (so the file is
    complete; a run that trains one expert alone never uses them). Perception is ``model``'s. Used to train one
    shipped expert network further: ``replace_network_experts`` puts the result back. ``expert`` = ``HANDOVER``:
    the handover network, written in the heavy-streaks slot (``HANDOVER_SLOT``; :func:`with_handover_network` takes
    it back from there)."""
    cfg = model.config
    if cfg.expert_scope != "network":
        raise ValueError("shared_network_of needs a model whose experts are whole networks (expert_scope 'network')")
    if expert == HANDOVER:
        if not cfg.handover_network:
            raise ValueError("the model has no handover network (config.handover_network is False)")
        mine, slot = "handover.", HANDOVER_SLOT
    elif isinstance(expert, int) and 0 <= expert < cfg.num_experts:
        mine, slot = f"experts.{expert}.", expert
    else:
        raise ValueError(f"expert {expert} is out of range: the model has {cfg.num_experts} experts")
    state = {}
    for k, v in model.state_dict().items():
        top = k.split(".", 1)[0]
        if top in PERCEPTION_MODULES:
            state[k] = v.clone()
            continue
        if top == "experts":
            _, e, rest = k.split(".", 2)
            if rest.startswith("experts.0.") and int(e) != slot:
                state[f"experts.{e}.{rest[len('experts.0.'):]}"] = v.clone()
        if k.startswith(mine):
            rest = k[len(mine):]
            if rest.startswith("experts.0."):
                state[f"experts.{slot}.{rest[len('experts.0.'):]}"] = v.clone()
            else:
                state[rest] = v.clone()
    out = CLIPRPN(cfg.one_network(verify_light_mask=0.0, verify_heavy_mask=(0.0, 0.0), verify_light_ramp=0.0))
    out.load_state_dict(state)
    return out


def with_handover_network(model: CLIPRPN, source: CLIPRPN | None = None) -> CLIPRPN:
    """A copy of the network-scope ``model`` with a handover network (``config.handover_network``): ``source``'s
    network with its heavy-streaks expert (a shared-network model of the model's shape, e.g. one
    :func:`shared_network_of` wrote with ``HANDOVER``), or, without ``source``, a copy of the model's own
    heavy-streaks network, which takes the handovers of a model without one (the restorations are then unchanged).
    Every other tensor is ``model``'s."""
    cfg = model.config
    if cfg.expert_scope != "network":
        raise ValueError("a handover network needs a model whose experts are whole networks (expert_scope 'network')")
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("handover.")}
    if source is not None:
        _check_shared_source(source, cfg.one_network(), "the handover network's source")
    # the heavy-streaks network's tensors, of the model itself or of the source (as a network-scope expert)
    heavy = state if source is None else shared_to_network_experts(source.state_dict(), [HANDOVER_SLOT])
    mine = f"experts.{HANDOVER_SLOT}."
    handover = {f"handover.{k[len(mine):]}": v.clone() for k, v in heavy.items() if k.startswith(mine)}
    state.update(handover)
    out = CLIPRPN(replace(cfg, handover_network=True))
    out.load_state_dict(state)
    return out


def network_experts_from(sources: list, perception: CLIPRPN | None = None) -> CLIPRPN:
    """A network-scope model whose expert e is ``sources[e]``'s network with its expert e (each source a
    bottleneck-scope model of one config, e.g. a light-rain specialist for expert 0 and the general model for
    the others); perception (pattern head, router) from ``perception`` (default ``sources[0]``)."""
    perception = perception or sources[0]
    cfg = perception.config
    if len(sources) != cfg.num_experts:
        raise ValueError(f"need one source per expert ({cfg.num_experts}), got {len(sources)}")
    for i, s in enumerate(sources):
        _check_shared_source(s, cfg, f"source {i}")
    model = CLIPRPN(replace(cfg, expert_scope="network"))
    state = {}
    for e, s in enumerate(sources):
        state.update(shared_to_network_experts(s.state_dict(), [e]))
    state.update(_perception_state(perception.state_dict()))
    model.load_state_dict(state)
    return model
