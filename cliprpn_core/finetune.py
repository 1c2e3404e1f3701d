"""Fine-tune on in-memory rainy/clean pairs (what the Loss-scheduled Fine-tune node runs): random crops of the
pairs, routed by the model's own perception, through the optimisation step the Trainer uses
(``train.TrainStep``: AdamW, cosine learning rate, non-finite check, clipping)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import losses as L
from . import plotting
from .arch import HANDOVER, pattern_probs
from .inference import HEAVY, WORK_SIDE, Derainer, DerainOptions, check_work_side, resize, split_channels, work_size
from .train import TrainStep, cosine_lr

MIN_SIDE = 16  # smallest pair side a fine-tune takes
GRAD_CLIP = 1.0
FINAL_LR = 0.1  # the learning rate decays to this share of its start


@dataclass
class FinetuneResult:
    model: torch.nn.Module
    history: dict[str, list[float]]


def rgb_only(x_bchw: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] with C in 1..4 -> [B,3,H,W] (gray expanded, alpha dropped)."""
    c = x_bchw.shape[1]
    if c not in (1, 2, 3, 4):
        raise ValueError(f"image has {c} channels; CLIP-RPN takes 1-4 channels. Convert it to RGB first")
    return split_channels(x_bchw)[0]


def check_pairs(rainy: torch.Tensor, clean: torch.Tensor):
    """Rainy/clean [B,3,H,W] batches a fine-tune can take (ValueError saying what is wrong otherwise)."""
    if rainy.shape[0] != clean.shape[0]:
        raise ValueError(f"rainy batch has {rainy.shape[0]} images but clean has {clean.shape[0]}; "
                         "give one clean image per rainy image")
    if rainy.shape[-2:] != clean.shape[-2:]:
        raise ValueError(f"rainy images are {rainy.shape[-1]}x{rainy.shape[-2]} but clean are "
                         f"{clean.shape[-1]}x{clean.shape[-2]}; pairs must be the same size")
    for what, t in (("rainy", rainy), ("clean", clean)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{what} images contain NaN or Inf values")
        if min(t.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"{what} images are {t.shape[-1]}x{t.shape[-2]}; fine-tuning needs at least "
                             f"{MIN_SIDE}x{MIN_SIDE}")


def pseudo_rain_mask(rainy: torch.Tensor, clean: torch.Tensor, thresh: float = 0.04) -> torch.Tensor:
    """Where the rain layer visibly changes the pixel (the target the mask estimator learns)."""
    return ((rainy - clean).abs().amax(1, keepdim=True) > thresh).float()


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy with ordinary (non-inference) float32 tensors, on the CPU."""
    net = type(model)(model.config)
    net.load_state_dict({k: v.detach().clone().float().cpu() for k, v in model.state_dict().items()})
    return net


def loss_curve(history: dict[str, list[float]], title: str) -> torch.Tensor:
    """The losses per step as a line chart [1,3,H,W] (0..1)."""
    return torch.from_numpy(plotting.to_array(plotting.line_chart(history, title=title)))[None].movedim(-1, 1)


def finetune(model: torch.nn.Module, *args, **kw) -> FinetuneResult:
    """Fine-tune a copy of ``model`` (see ``_finetune``). Hosts such as ComfyUI run under
    ``torch.inference_mode``; training needs autograd, and tensors made in inference mode
    (the loaded weights, the input images) are cloned into ordinary tensors first."""
    with torch.inference_mode(False), torch.enable_grad():
        return _finetune(model, *args, **kw)


def _finetune(model: torch.nn.Module, rainy: torch.Tensor, clean: torch.Tensor, steps: int, lr: float,
              schedule: str = "charbonnier", patch: int = 128, batch_size: int = 4, seed: int = 0,
              device="cpu", mask_weight: float = 0.1, on_step: Callable[[int, int], None] | None = None,
              perceive: Callable[[torch.Tensor], torch.Tensor] | None = None,
              preview: Callable[[Callable], None] | None = None, work_side: int = WORK_SIDE) -> FinetuneResult:
    """Fine-tune a deep copy of ``model`` on in-memory pairs ([B,C,H,W] 0..1, C in 1..4, same sizes).

    Each pair is routed as the derainer routes it (:func:`pair_routing`: the model's own perception, or
    ``perceive(rainy) -> probs``, e.g. CLIP, top-1, then the model's light verification), so the networks that will
    restore such rain are the ones trained: a pair the light network hands over trains the network that takes the
    handover (the handover network where the model has one), and one shared by the handover's confirmation trains
    both networks through their weighted sum. The pattern head and router stay as they are (pairs carry no pattern labels). The loss is the
    ``schedule`` preset (losses.PRESETS) plus ``mask_weight`` times the mask loss against where the pair
    differs; the learning rate decays from ``lr`` to FINAL_LR of it along a cosine, gradients are
    clipped to GRAD_CLIP. ``on_step(done, total)`` is called after each step (progress and Cancel: an
    exception raised there aborts without touching ``model``). ``preview``, when given, is called before
    each ``on_step`` with ``image(max_side=None)`` -> the loss curve so far [1,3,H,W] (drawn only when
    called). Pairs whose shorter side is above ``work_side`` are brought to it first (both images alike): the
    derainer restores such images at that working size (inference.WORK_SIDE), so the fine-tune learns their rain at
    the scale it will be removed at; 0 keeps them at full size."""
    if schedule not in L.PRESETS:
        raise ValueError(f"unknown loss schedule {schedule!r}; use one of {', '.join(L.PRESETS)}")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be > 0, got {lr}")
    rainy, clean = rgb_only(rainy).float().clone(), rgb_only(clean).float().clone()
    check_pairs(rainy, clean)
    size = work_size(*rainy.shape[-2:], check_work_side(work_side))
    if size is not None:
        rainy, clean = resize(rainy, size), resize(clean, size)
    device = torch.device(device)
    net = fresh_copy(model).to(device)
    with torch.no_grad():
        probs = perceive(rainy).float().cpu() if perceive is not None else None
        routing, handover = pair_routing(net, rainy, probs, device)
    net = net.train().requires_grad_(True).to(memory_format=torch.contiguous_format)
    net.pattern_head.requires_grad_(False)
    net.router.requires_grad_(False)
    sched = L.build_schedule(L.PRESETS[schedule]).to(device)
    terms_fn = {k: L.LOSSES[k]().to(device) for k in sched.names}
    mask_loss = L.MaskLoss().to(device)
    params = [p for p in net.parameters() if p.requires_grad] + list(sched.parameters())
    optim = TrainStep(params, lr, lambda step: cosine_lr(step, steps, lr, FINAL_LR * lr), GRAD_CLIP)
    gen = torch.Generator().manual_seed(int(seed))

    h, w = rainy.shape[-2:]
    ph, pw = min(patch, h), min(patch, w)
    m = model.config.pad_multiple
    ph, pw = max(m, ph // m * m), max(m, pw // m * m)
    history: dict[str, list[float]] = {"total": []}
    for step in range(steps):
        optim.set_lr(step)
        xr, xc, idx = _crops(rainy, clean, batch_size, ph, pw, gen)
        xr, xc = xr.to(device), xc.to(device)
        img, mlog = _restore_routed(net, xr, routing[idx].to(device), handover[idx].to(device))
        img = img.float()
        terms = {k: fn(img, xc) for k, fn in terms_fn.items()}
        total = sched(terms, step, steps)
        if mask_weight:
            total = total + mask_weight * mask_loss(mlog.float(), pseudo_rain_mask(xr, xc))
        optim(total, lambda total=total, step=step: f"fine-tune loss became {float(total)} at step {step + 1}; "
                                                    "lower the learning rate")
        vals = {k: float(v.detach()) for k, v in terms.items()}
        sched.observe(vals)
        history["total"].append(float(total.detach()))
        for k, v in vals.items():
            history.setdefault(k, []).append(v)
        if preview is not None:
            preview(lambda max_side=None: loss_curve(history, f"fine-tune loss ({schedule})"))
        if on_step is not None:
            on_step(step + 1, steps)
    net.eval().requires_grad_(False)
    return FinetuneResult(net, history)


def pair_routing(net: torch.nn.Module, rainy: torch.Tensor, probs: torch.Tensor | None, device) -> tuple:
    """Where the derainer sends each pair [B,3,H,W] (at the size it will restore it) -> (routing [B,E], the handover
    network's weight [B]). Perception (the model's, or the given pattern ``probs``) picks the expert, top-1, and the
    model's light verification (``config.verify_light_mask``, with its confirmation) may hand a light-routed pair
    over: to the heavy-streaks network (its routing row says so), or to the handover network of a model with one
    (its weight moves from the row's heavy-streaks column to the second value). A model that verifies runs one
    default derain of the pairs, as the Derain node would (the verification needs the light network's restoration
    pass); any other is only perceived and routed. ``net`` is left in eval mode."""
    cfg = net.config
    if not (cfg.expert_scope == "network" and cfg.verify_light_mask > 0):  # never verified: perception decides
        net.eval()
        if probs is None:
            probs = pattern_probs(net.perceive(rainy.to(device))).cpu()
        routing = F.one_hot(net.router(probs.to(device)).argmax(-1), cfg.num_experts).float().cpu()
        return routing, torch.zeros(routing.shape[0])
    d = Derainer(net, device=device, dtype="fp32")
    r = d.derain(rainy, DerainOptions(), pattern=probs)
    routing = r.routing.float().cpu().clone()
    handover = torch.zeros(routing.shape[0])
    if cfg.handover_network and r.light_mask is not None:
        # a light-routed pair the verification gave (all or part of) away: its routing row's heavy-streaks weight
        handed = torch.isfinite(r.light_mask) & (routing[:, HEAVY] > 0)
        handover = torch.where(handed, routing[:, HEAVY], handover)
        routing[handed, HEAVY] = 0.0
    return routing, handover


def _restore_routed(net, x, routing, handover):
    """-> (images, mask logits) of crops ``x`` restored as :func:`pair_routing` routed their pairs: the routed experts'
    weighted outputs plus the handover network's output by its weight (each network runs only on its crops)."""
    if not bool((handover > 0).any()):
        img, mlog, _ = net.restore(x, routing)
        return img, mlog
    img = mlog = None
    for idx, run, w in (((routing.sum(1) > 0).nonzero().flatten(), lambda xs, i: net.restore(xs, routing[i]), None),
                        ((handover > 0).nonzero().flatten(), lambda xs, i: net.restore(xs, HANDOVER), handover)):
        if idx.numel() == 0:
            continue
        a, ma, _ = run(x[idx], idx)
        if w is not None:  # the routed experts' outputs are weighted inside restore; the handover network's here
            a, ma = w[idx].view(-1, 1, 1, 1) * a, w[idx].view(-1, 1, 1, 1) * ma
        if img is None:
            img, mlog = a.new_zeros((x.shape[0], *a.shape[1:])), ma.new_zeros((x.shape[0], *ma.shape[1:]))
        img, mlog = img.index_add(0, idx, a), mlog.index_add(0, idx, ma)
    return img, mlog


def _crops(rainy, clean, batch_size, ph, pw, gen):
    """Random ``ph`` x ``pw`` crops of random pairs, each mirrored left-right at random -> (rainy, clean, pair
    indices)."""
    b, _, h, w = rainy.shape
    idx = torch.randint(0, b, (min(batch_size, max(b, 1)),), generator=gen)
    ys = torch.randint(0, h - ph + 1, (len(idx),), generator=gen)
    xs = torch.randint(0, w - pw + 1, (len(idx),), generator=gen)
    flip = torch.rand(len(idx), generator=gen) < 0.5
    crops_r, crops_c = [], []
    for i, y, x, f in zip(idx.tolist(), ys.tolist(), xs.tolist(), flip.tolist()):
        r, c = rainy[i, :, y:y + ph, x:x + pw], clean[i, :, y:y + ph, x:x + pw]
        if f:
            r, c = r.flip(-1), c.flip(-1)
        crops_r.append(r)
        crops_c.append(c)
    return torch.stack(crops_r), torch.stack(crops_c), idx
