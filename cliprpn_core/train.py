"""Trainer: AdamW, warm-up + cosine LR, gradient clipping, EMA, resume, atomic checkpoints,
JSONL log, loss-curve PNG, progress bar, DistributedDataParallel under torchrun.

Config: a TOML file plus ``key=value`` overrides (dotted keys). Training state (model, EMA,
optimizer, schedule, RNG) is itself a safetensors file: resuming never unpickles.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .arch import CLIPRPN
from .checkpoint import CheckpointError, load_state_checked, read_metadata, save_model
from .config import CLIPRPNConfig
from .imageio import atomic_write_bytes
from .losses import LOSSES, PRESETS, LoadBalanceLoss, MaskLoss, MaskScaleLoss, build_schedule
from .patterns import NUM_CLASSES


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    model: dict = field(default_factory=dict)  # CLIPRPNConfig fields (empty with init: init's own config)
    init: str = ""  # start from these model weights (safetensors) instead of random
    grow: bool = False  # init may have fewer blocks than `model`: the added blocks start as the identity
    grown_lr_scale: float = 1.0  # with grow: the added blocks learn at lr times this (they start from zero gates)
    # blocks that are the identity in init (both residual scales zero) stay frozen, so the run keeps each network's
    # inference cost (they are skipped there); blocks that grow adds still train
    keep_identity: bool = False
    trainable: list = field(default_factory=list)  # parameter-name prefixes to train (empty: all)
    misroute_fraction: float = 0.0  # share of samples routed by the model's own router, not their label
    route_all_to: int = -1  # >= 0: every sample goes through this one expert (the unrouted control; no misrouting)
    clean_dirs: list = field(default_factory=list)  # synthetic rain over these
    pair_dirs: list = field(default_factory=list)  # real rain/gt pairs
    pair_fraction: float = 0.1  # share of each batch from pair_dirs
    pair_light_share: float = -1.0  # share of the pair draws that are light-rain pairs (< 0: every pair alike)
    pair_vflip: bool = False  # also flip half of the pair crops upside down (streaks stay streaks; more views)
    layer_dirs: list = field(default_factory=list)  # real rain layers of these pairs over clean_dirs
    layer_fraction: float = 0.0  # share of each batch from layer_dirs
    layer_rotation: float = 15.0  # real layers are turned by up to this many degrees
    layer_gain: list = field(default_factory=lambda: [0.7, 1.3])  # real layers are scaled by a factor in this range
    layer_light_share: float = 0.5  # share of real-layer draws that are light-rain layers (the rest heavy)
    layer_scale: list = field(default_factory=lambda: [0.8, 1.2])  # real layers are zoomed by a factor in this range
    layer_mix: float = 0.0  # share of real-layer draws that get a second layer of the same kind added
    norain_fraction: float = 0.0  # share of each batch that is rain-free clean crops (target = input)
    regime_probs: list = field(default_factory=lambda: [0.5, 0.25, 0.1, 0.15])
    synth_style: str = "classic"  # synthesis.STYLES: classic (the shipped model's), calibrated or downpour
    loss: dict = field(default_factory=lambda: dict(PRESETS["mix"]))  # or preset name in loss_preset
    loss_preset: str = ""
    mask_weight: float = 0.1
    # a model file (the same expert scope): each sample's mean rain mask is held to that model's on the same input
    # (losses.MaskScaleLoss, at this weight; 0: off). For a network whose mask scale something downstream was fitted
    # to, such as the light verification's threshold
    mask_anchor: str = ""
    mask_anchor_weight: float = 0.0
    pattern_weight: float = 0.05
    router_weight: float = 0.05
    balance_weight: float = 0.0
    pass_aux_weight: float = 0.5  # model.passes > 1: weight of the earlier passes' image losses (their mean)
    steps: int = 2000
    batch_size: int = 8
    patch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 0.5
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA), none, bf16, fp16
    log_every: int = 25
    ckpt_every: int = 500
    snapshot_every: int = 0  # also keep the EMA weights of every N-th step as model_step{N}.safetensors
    max_minutes: float = 0.0  # stop (checkpointed) after this long; resume continues
    budget_minutes: float = 0.0  # size `steps` so the whole run takes about this long (measured rate)
    channels_last: bool = True
    threads: int = 0  # torch CPU threads (0: leave the default)

    @classmethod
    def from_toml(cls, path=None, overrides=()):
        d = {}
        if path:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        for ov in overrides:
            if "=" not in ov:
                raise ValueError(f"override {ov!r} must look like key=value")
            k, v = ov.split("=", 1)
            try:
                val = json.loads(v)
            except ValueError:
                val = v
            cur = d
            parts = k.split(".")
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            cur[parts[-1]] = val
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown training options {sorted(bad)}; known: {sorted(known)}")
        _check_types(d)
        cfg = cls(**d)
        if cfg.loss_preset:
            if cfg.loss_preset not in PRESETS:
                raise ValueError(f"unknown loss preset {cfg.loss_preset!r}; known: {sorted(PRESETS)}")
            cfg.loss = dict(PRESETS[cfg.loss_preset])
        return cfg


_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "a table"}


def _check_types(d: dict) -> None:
    """Each option has its default's type (an int is a float too); ValueError naming the option otherwise."""
    defaults = TrainConfig()
    for k, v in d.items():
        want = type(getattr(defaults, k))
        ok = (isinstance(v, bool) if want is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
              isinstance(v, int) and not isinstance(v, bool) if want is int else isinstance(v, want))
        if not ok:
            raise ValueError(f"training option {k} must be {_TYPE_NAMES.get(want, want.__name__)}, got {v!r}")


def cosine_lr(step: int, steps: int, lr: float, min_lr: float = 0.0, warmup_steps: int = 0) -> float:
    """Learning rate at ``step`` (0-based) of ``steps``: a linear warm-up to ``lr`` over ``warmup_steps``, then
    a cosine decay to ``min_lr`` at ``steps`` (held there after)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def lr_at(step, cfg: TrainConfig):
    return cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)


class TrainStep:
    """The optimisation step every training loop here shares (:class:`Trainer`, ``finetune.finetune``): AdamW
    over ``params``, the learning rate ``lr_at(step)`` set before each step, then per step a non-finite loss
    check, backward, gradient-norm clipping of ``clip_params`` (default: ``params``) to ``grad_clip`` and
    the update. ``opt`` is the optimizer (its state is what a training state saves)."""

    def __init__(self, params, lr: float, lr_at: Callable[[int], float], grad_clip: float, clip_params=None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
        params = list(params)  # tensors, or parameter groups (dicts) that may carry an ``lr_scale``
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
        self.lr_at = lr_at
        self.grad_clip = grad_clip
        own = [p for g in self.opt.param_groups for p in g["params"]]
        self.clip_params = own if clip_params is None else list(clip_params)

    def set_lr(self, step: int) -> None:
        """Every parameter group at ``lr_at(step)`` times its ``lr_scale`` (1 unless the group says)."""
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step) * g.get("lr_scale", 1.0)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def __call__(self, loss: torch.Tensor, error: Callable[[], str]) -> torch.Tensor:
        """One update from ``loss``; FloatingPointError(``error()``) instead when the loss is not finite (nothing
        is changed then). -> the gradient norm before clipping."""
        if not torch.isfinite(loss):
            raise FloatingPointError(error())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.clip_params, self.grad_clip)
        self.opt.step()
        return gn


def _dist():
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg = cfg
        self.world, self.rank, local = _dist()
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
        if cfg.device == "auto":
            dev = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        else:
            dev = cfg.device
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # shapes vary per step (expert subsets, synthesis kernels): autotuning would re-run constantly
            torch.backends.cudnn.benchmark = False
        amp = cfg.amp if cfg.amp != "auto" else ("bf16" if self.device.type == "cuda" else "none")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.init and not cfg.model:  # continue a model as it is (its experts' scope, passes, block counts)
            from .checkpoint import read_config
            self.model_cfg = read_config(cfg.init)
        else:
            self.model_cfg = CLIPRPNConfig.from_dict(cfg.model)
        self.model = CLIPRPN(self.model_cfg).to(self.device)
        grown: set[str] = set()  # tensors of the blocks grow added
        if cfg.grown_lr_scale <= 0:
            raise ValueError(f"grown_lr_scale must be > 0, got {cfg.grown_lr_scale}")
        if cfg.init:
            from .checkpoint import load_model
            init = load_model(cfg.init)
            if cfg.grow and not init.config.same_weights(self.model_cfg):
                from .arch import grow_from
                try:
                    grown = set(grow_from(self.model, init, probe_size=4 * self.model_cfg.pad_multiple))
                except ValueError as e:
                    raise CheckpointError(f"init checkpoint {cfg.init}: {e}") from e
            elif not init.config.same_weights(self.model_cfg):
                raise CheckpointError(f"init checkpoint {cfg.init} has a different model config than this run "
                                      "(set grow = true to add blocks to it)")
            else:
                self.model.load_state_dict(init.state_dict())
        if cfg.trainable:
            def under(name, pre):
                return name == pre or name.startswith(pre + ".")
            names = [n for n, _ in self.model.named_parameters()]
            for pre in cfg.trainable:
                if not any(under(n, pre) for n in names):
                    raise ValueError(f"trainable prefix {pre!r} matches no parameter; top-level modules: "
                                     f"{sorted({n.split('.')[0] for n in names})}")
            for n, p in self.model.named_parameters():
                p.requires_grad_(any(under(n, pre) for pre in cfg.trainable))
        self.identity_kept: list[str] = []  # the blocks keep_identity froze
        if cfg.keep_identity:
            if not cfg.init:
                raise ValueError("keep_identity needs init: it keeps the blocks that are the identity in init frozen")
            from .arch import Block
            kept = [name for name, m in self.model.named_modules() if isinstance(m, Block)
                    and f"{name}.beta" not in grown and m.is_identity()]
            for name in kept:
                self.model.get_submodule(name).requires_grad_(False)
            self.identity_kept = kept
        if not -1 <= cfg.route_all_to < self.model.config.num_experts:
            raise ValueError(f"route_all_to must be -1 (routing on) or an expert index 0..{self.model.config.num_experts - 1}, "
                             f"got {cfg.route_all_to}")
        if not 0.0 <= cfg.misroute_fraction <= 1.0:
            raise ValueError(f"misroute_fraction must be in [0, 1], got {cfg.misroute_fraction}")
        # perception is trained (and run) only while any of it is trainable; when nothing else is, the restoration
        # networks are not run at all (a small fraction of the compute)
        perceives = [n.startswith(("pattern_head.", "router.")) for n, p in self.model.named_parameters()
                     if p.requires_grad]
        self.train_perception = any(perceives)
        self.perception_only = self.train_perception and all(perceives)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.schedule = build_schedule(cfg.loss).to(self.device)
        self.losses = {k: LOSSES[k]().to(self.device) for k in self.schedule.names}
        self.mask_loss = MaskLoss().to(self.device)
        self.anchor = None
        if cfg.mask_anchor_weight < 0:
            raise ValueError(f"mask_anchor_weight must be >= 0, got {cfg.mask_anchor_weight}")
        if cfg.mask_anchor_weight > 0:
            if not cfg.mask_anchor:
                raise ValueError("mask_anchor_weight > 0 needs mask_anchor (the model file whose masks are the anchor)")
            from .checkpoint import load_model
            anchor = load_model(cfg.mask_anchor)
            if anchor.config.expert_scope != self.model_cfg.expert_scope:
                raise CheckpointError(f"mask_anchor {cfg.mask_anchor} has expert scope {anchor.config.expert_scope!r}, "
                                      f"this run {self.model_cfg.expert_scope!r}; anchor to a model of the same scope")
            self.anchor = anchor.to(self.device).eval().requires_grad_(False)
            self.mask_scale = MaskScaleLoss().to(self.device)
        self.balance = LoadBalanceLoss()
        params = [p for n, p in self.model.named_parameters() if p.requires_grad and n not in grown]
        params += list(self.schedule.parameters())
        new = [p for n, p in self.model.named_parameters() if p.requires_grad and n in grown]
        if new:  # the added blocks in a group of their own, at grown_lr_scale times the learning rate
            params = [{"params": params}, {"params": new, "lr_scale": cfg.grown_lr_scale}]
        # the loss schedule's own weights (uncertainty) are trained but not clipped
        self.optim = TrainStep(params, cfg.lr, lambda step: lr_at(step, self.cfg), cfg.grad_clip,
                               clip_params=self.model.parameters(), weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.opt = self.optim.opt
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.out = Path(cfg.out_dir)
        self.progress = progress and self.rank == 0
        self._stop = False
        self._elapsed_before = 0.0
        self._measured = False
        self._t_start = time.time()
        self.source = self._build_source()

    # -- data --------------------------------------------------------------------------------
    def _build_source(self):
        from .data import MixtureSource, PairedSource, SyntheticSource
        srcs, w = [], []
        if self.cfg.clean_dirs:
            srcs.append(SyntheticSource(self.cfg.clean_dirs, min_side=self.cfg.patch_size,
                                        regime_probs=tuple(self.cfg.regime_probs), style=self.cfg.synth_style))
            w.append(1.0 - (self.cfg.pair_fraction if self.cfg.pair_dirs else 0.0))
        if self.cfg.pair_dirs:
            srcs.append(PairedSource(self.cfg.pair_dirs, min_side=self.cfg.patch_size,
                                     light_share=None if self.cfg.pair_light_share < 0 else self.cfg.pair_light_share,
                                     vflip=self.cfg.pair_vflip))
            w.append(self.cfg.pair_fraction if self.cfg.clean_dirs else 1.0)
        if self.cfg.layer_dirs and self.cfg.layer_fraction > 0:
            from .data import RainLayerSource
            if not self.cfg.clean_dirs:
                raise ValueError("layer_dirs needs clean_dirs (the backgrounds the layers are put on)")
            srcs.append(RainLayerSource(self.cfg.layer_dirs, self.cfg.clean_dirs, min_side=self.cfg.patch_size,
                                        max_rotation=self.cfg.layer_rotation, gain=self.cfg.layer_gain,
                                        light_share=self.cfg.layer_light_share, scale=self.cfg.layer_scale,
                                        mix=self.cfg.layer_mix))
            w[0] -= self.cfg.layer_fraction
            w.append(self.cfg.layer_fraction)
        if self.cfg.norain_fraction > 0:
            from .data import NoRainSource
            if not self.cfg.clean_dirs:
                raise ValueError("norain_fraction needs clean_dirs (the rain-free photos)")
            srcs.append(NoRainSource(srcs[0]))
            w[0] -= self.cfg.norain_fraction
            w.append(self.cfg.norain_fraction)
        if not srcs:
            raise ValueError("no training data: set clean_dirs and/or pair_dirs")
        if any(x < 0 for x in w):
            raise ValueError(f"pair_fraction + layer_fraction + norain_fraction leave a negative share for "
                             f"synthetic rain: {w}; lower them")
        return srcs[0] if len(srcs) == 1 else MixtureSource(srcs, w)

    # -- one step ----------------------------------------------------------------------------
    def compute_losses(self, batch):
        m = self.net
        rainy, clean = batch.rainy, batch.clean
        if self.cfg.channels_last:
            rainy = rainy.contiguous(memory_format=torch.channels_last)
        if self.perception_only:
            return self._perception_losses(rainy, batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            expert = batch.expert if self.cfg.route_all_to < 0 else torch.full_like(batch.expert, self.cfg.route_all_to)
            routing = F.one_hot(expert, self.model.config.num_experts).float()  # synthetic labels route
            pick = None
            if self.cfg.misroute_fraction > 0 and self.cfg.route_all_to < 0:
                # train as the model is used: some samples go where the model's own router sends them,
                # so an expert also learns to do no harm on rain it is sent by mistake (decided inside
                # the forward, from the same pattern-head pass that perception's losses use)
                pick = torch.rand(batch.expert.shape[0], generator=self.gen) < self.cfg.misroute_fraction
            out = m(rainy, routing=routing, with_pattern=self.train_perception, own_routing=pick)
            img, mlog, pyr, plog, rlog = out.image, out.mask_logits, out.mask_pyramid, out.pattern_logits, out.router_logits
        img = img.float()
        terms = {k: fn(img, clean) for k, fn in self.losses.items()}
        if out.pass_images and self.cfg.pass_aux_weight:
            # deep supervision: every pass should already be a good restoration on its own
            w = self.cfg.pass_aux_weight / len(out.pass_images)
            terms = {k: terms[k] + w * sum(fn(p.float(), clean) for p in out.pass_images)
                     for k, fn in self.losses.items()}
        total = self.schedule(terms, self.step, self.cfg.steps)
        ml = self.mask_loss(mlog.float(), batch.mask)
        for p in pyr:
            ml = ml + 0.25 * self.mask_loss(p.float(), F.adaptive_avg_pool2d(batch.mask, p.shape[-2:]))
        if self.train_perception:
            perception, ce, rce, bal = self._perception_terms(plog, rlog, batch)
            total = total + perception
        else:
            ce = rce = bal = torch.zeros((), device=img.device)
        total = total + self.cfg.mask_weight * ml
        logs = {k: float(v.detach()) for k, v in terms.items()}
        if self.anchor is not None:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                 enabled=self.amp_dtype is not None):
                ref = self.anchor.estimate_mask(rainy, routing)
            h, w = mlog.shape[-2:]
            anchored = self.mask_scale(mlog.float(), ref[..., :h, :w].float())
            total = total + self.cfg.mask_anchor_weight * anchored
            logs["mask_anchor"] = float(anchored.detach())
        logs.update(mask=float(ml.detach()), pattern_ce=float(ce.detach()), router_ce=float(rce.detach()),
                    balance=float(bal.detach()), total=float(total.detach()))
        return total, terms, logs

    def _perception_terms(self, plog, rlog, batch):
        """Perception's losses from pattern and router logits: (their weighted sum, pattern cross-entropy, router
        cross-entropy, balance term)."""
        ce = sum(F.cross_entropy(c.float(), batch.labels[:, i])
                 for i, c in enumerate(plog.split(list(NUM_CLASSES), -1)))
        rlog = rlog.float()
        rce = F.cross_entropy(rlog, batch.expert)
        bal = self.balance(rlog, batch.expert)
        total = self.cfg.pattern_weight * ce + self.cfg.router_weight * rce
        if self.cfg.balance_weight:
            total = total + self.cfg.balance_weight * bal
        return total, ce, rce, bal

    def _perception_losses(self, rainy, batch):
        """The losses when only the pattern head and the router train: their cross-entropies (and the balance term)
        from a perception-only forward; no restoration runs, so there are no image terms for the schedule."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.net(rainy, routing=F.one_hot(batch.expert, self.model.config.num_experts).float(),
                           with_pattern=True, restore=False)
        total, ce, rce, bal = self._perception_terms(out.pattern_logits, out.router_logits, batch)
        logs = dict(pattern_ce=float(ce.detach()), router_ce=float(rce.detach()), balance=float(bal.detach()),
                    total=float(total.detach()))
        return total, {}, logs

    def train_step(self):
        self.optim.set_lr(self.step)
        batch = self.source.batch(self.cfg.batch_size, self.cfg.patch_size, self.gen, self.device)
        total, terms, logs = self.compute_losses(batch)
        gn = self.optim(total, lambda: f"non-finite loss at step {self.step}: {logs}; lower lr or check the data")
        if terms:
            self.schedule.observe({k: float(v.detach()) for k, v in terms.items()})
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm.detach(), 1 - d)
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)
        self.step += 1
        logs.update(step=self.step, lr=self.optim.lr, grad_norm=float(gn),
                    weights=self.schedule.current_weights(self.step, self.cfg.steps))
        return logs

    # -- state -------------------------------------------------------------------------------
    @property
    def state_path(self):
        return self.out / "state.safetensors"

    def save_state(self):
        if self.rank != 0:
            return
        t = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        t.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()})
        t.update({f"sched.{k}": v.detach().cpu().contiguous() for k, v in self.schedule.state_dict().items()})
        osd = self.opt.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                t[f"opt.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        t["rng.cpu"] = torch.get_rng_state()
        t["rng.gen"] = self.gen.get_state()
        meta = {"format": "clip-rpn-train-state", "step": str(self.step), "steps": str(self.cfg.steps),
                "elapsed": str(self._elapsed_before + time.time() - self._t_start),
                "measured": "1" if self._measured else "0", "train_config": json.dumps(asdict(self.cfg)),
                "model_config": self.model_cfg.to_json(), "opt_groups": json.dumps(osd["param_groups"]),
                "schedule_state": json.dumps(self.schedule.state())}
        atomic_write_bytes(self.state_path, lambda tmp: save_file(t, tmp, metadata=meta))
        self._save_ema(self.out / "model.safetensors")

    def _save_ema(self, path):
        save_model(self.ema, path, {"trained_steps": self.step, "train_config": asdict(self.cfg)})

    def load_state(self):
        meta = read_metadata(self.state_path)
        if meta.get("format") != "clip-rpn-train-state":
            raise CheckpointError(f"{self.state_path} is not a CLIP-RPN training state")
        if CLIPRPNConfig.from_json(meta["model_config"]) != self.model_cfg:
            raise CheckpointError(f"{self.state_path} was written for a different model config; use another out_dir")
        t = load_file(str(self.state_path))
        pick = lambda p: {k[len(p):]: v for k, v in t.items() if k.startswith(p)}  # noqa: E731
        load_state_checked(self.model, pick("model."), str(self.state_path))
        load_state_checked(self.ema, pick("ema."), str(self.state_path))
        self.schedule.load_state_dict(pick("sched."))
        groups = json.loads(meta["opt_groups"])
        state = {}
        for k, v in pick("opt.").items():
            pid, name = k.split(".", 1)
            state.setdefault(int(pid), {})[name] = v.to(self.device) if name != "step" else v
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(t["rng.cpu"])
        self.gen.set_state(t["rng.gen"])
        self.schedule.load_state(json.loads(meta["schedule_state"]))
        self.step = int(meta["step"])
        if self.cfg.budget_minutes:  # a budgeted run keeps the length it measured
            self.cfg.steps = int(meta.get("steps", self.cfg.steps))
            self._elapsed_before = float(meta.get("elapsed", 0.0))
            self._measured = meta.get("measured") == "1"

    # -- loop --------------------------------------------------------------------------------
    def _on_signal(self, *_):
        self._stop = True

    def fit(self):
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists():
            self.load_state()
        log_path = self.out / "log.jsonl"
        old = {}
        if self.rank == 0:
            (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._on_signal)
        if cfg.budget_minutes and not self._measured:
            cfg.steps = 10 ** 9  # set from the measured rate after a few steps
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step",
                   dynamic_ncols=True)
        t0 = self._t_start = time.time()
        acc, n = {}, 0
        self._calib_from, self._calib_at = self.step + 20, self.step + 120
        try:
            while self.step < cfg.steps and not self._stop:
                logs = self.train_step()
                if cfg.budget_minutes and not self._measured and self.step == self._calib_at:
                    rate = (self.step - self._calib_from) / (time.time() - self._calib_t)
                    left = cfg.budget_minutes * 60 - (time.time() - t0) - self._elapsed_before
                    cfg.steps = max(self.step + 1, int(self.step + rate * left))
                    self._measured = True
                    bar.total = cfg.steps
                    bar.refresh()
                if cfg.budget_minutes and not self._measured and self.step == self._calib_from:
                    self._calib_t = time.time()
                for k, v in logs.items():
                    if isinstance(v, float):
                        acc[k] = acc.get(k, 0.0) + v
                n += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    rec = {k: v / n for k, v in acc.items()}
                    rec.update(step=self.step, lr=logs["lr"], weights=logs["weights"], time=time.time() - t0)
                    acc, n = {}, 0
                    bar.set_postfix(loss=f"{rec['total']:.4f}")
                    if self.rank == 0:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                if self.step % cfg.ckpt_every == 0:
                    self.save_state()
                    self.plot()
                if cfg.snapshot_every and self.step % cfg.snapshot_every == 0 and self.rank == 0:
                    self._save_ema(self.out / f"model_step{self.step}.safetensors")
                if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
                    break
                if self.world > 1:
                    flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
                    torch.distributed.all_reduce(flag)
                    self._stop = bool(flag.item())
        finally:
            self.interrupted = self._stop and self.step < cfg.steps
            bar.close()
            self.save_state()
            self.plot()
            for sig, h in old.items():
                signal.signal(sig, h)
        return self.out / "model.safetensors"

    def plot(self):
        if self.rank != 0:
            return
        path = self.out / "log.jsonl"
        if not path.exists():
            return
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        keys = [k for k in ("total", "charbonnier", "l1", "ssim", "edge", "fft", "mask", "pattern_ce") if k in recs[-1]]
        from .plotting import line_chart
        im = line_chart({k: [r.get(k) for r in recs] for k in keys}, title=f"{self.out.name}: loss per log interval")
        atomic_write_bytes(self.out / "loss_curve.png", lambda tmp: im.save(tmp, format="PNG"))


def train(cfg: TrainConfig, progress=True, on_trainer=None):
    """Train to ``cfg.out_dir`` and return the model path. ``on_trainer(trainer)`` is called after
    ``fit`` (also after Ctrl-C, which ``fit`` turns into a saved, resumable stop: ``trainer.interrupted``)."""
    trainer = None
    try:
        trainer = Trainer(cfg, progress=progress)
        path = trainer.fit()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # rank 0 writes the final files alone: the other ranks wait for it here instead of tearing their side of
            # the process group down under it (a torchrun worker once aborted at exit after all steps had finished)
            torch.distributed.barrier()
        if on_trainer is not None:
            on_trainer(trainer)
        return path
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if trainer is not None and trainer.net is not trainer.model:
                # the DDP wrapper's reducer holds the process group: free it while the group is still alive, not at
                # interpreter exit after the group is gone
                trainer.net = trainer.model
                import gc
                gc.collect()
            torch.distributed.destroy_process_group()
