"""Speed, memory, size and FLOPs of a CLIP-RPN model (default: the shipped one).

  python -m benchmarks.speed [--checkpoint CKPT] [--threads 2]

Prints: seconds per megapixel (1-MP image, whole pipeline: perception, then restoration by the light-streaks
network, where the router sends most rainy photos (see default_path); default options, so
the working size (the image restored at a shorter side of 321 px, inference.WORK_SIDE) and on the CPU the automatic
CPU tiling; median and fastest of 5 after a warm-up), the same at full size (``work_side = 0``: the networks' own
cost per pixel, what every figure before the working size measured), at full size untiled, and at full size with the
expert check where it runs (both streak experts compared); peak RSS of a separate process deraining an 8-MP image
with the default options and at full size (automatic tiling); parameters and FLOPs per pixel of the model and of
each expert (and of the handover network, in a model with one); with --per-expert, each expert's full-size figure
(every image routed to it; the handover network's forced, as `--expert handover` forces it); with --flops-only,
only the parameters and FLOPs (no timing: quick, and the same on any machine).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch

from cliprpn_core import Derainer, DerainOptions, load_model
from cliprpn_core.arch import HANDOVER
from cliprpn_core.patterns import EXPERTS

from .common import DEFAULT_CHECKPOINT, ROOT


FULL = DerainOptions(work_side=0)  # restored at full size
TIMED_EXPERT = "light_streaks"  # the network the default-path figures restore with (see default_path)


def default_path(d: Derainer, x: torch.Tensor, options: DerainOptions | None = None):
    """The default path of a photo the router sends to the light-streaks network, the one it picks for most rainy
    photos (97 of the 100 Rain100L images): perception as the default path runs it (its answer unused), then
    restoration by that network. Left to perception, a random image goes wherever noise looks like rain to the pattern
    head (the veil network, the cheapest once identity blocks are skipped): a path rainy photos seldom take."""
    d.perceive(x)
    return d.derain(x, replace(options or DerainOptions(), expert=EXPERTS.index(TIMED_EXPERT)))


def derain_checked(d: Derainer, x: torch.Tensor):
    """Derain ``x`` at full size as an image the expert check compares two experts for (both streak experts ranked
    first)."""
    return d.derain(x, DerainOptions(check=True, work_side=0), routing=torch.zeros(1, 4),
                    ranking=torch.tensor([[2.0, 1.0, 0.0, 0.0]]))


def timed(fn, repeats: int) -> tuple[float, float]:
    """-> (median, fastest) wall time of ``repeats`` calls. On a shared machine the fastest run is the least
    disturbed by other processes; the median is what a user sees on average."""
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def peak_rss_child(ck, threads, h, w, tile=None, work_side=None):
    code = f"""
import resource, torch
torch.set_num_threads({threads})
from cliprpn_core import Derainer, DerainOptions, load_model
from benchmarks.speed import default_path
d = Derainer(load_model({str(ck)!r}))
x = torch.rand(1, 3, {h}, {w})
r = default_path(d, x, DerainOptions(tile={tile}{'' if work_side is None else f', work_side={work_side}'}))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    t = time.perf_counter()  # run in the repository root: `-c` imports cliprpn_core from there
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1]) / 1024 ** 2, time.perf_counter() - t  # KiB -> GiB


def per_network_times(d: Derainer, x: torch.Tensor, repeats: int) -> dict:
    """Each expert's network forced at full size on ``x``, and the handover network (forced, as ``--expert handover``
    forces it) in a model with one -> {name: [median, fastest] seconds per megapixel}, after a warm-up each."""
    mp = x.shape[-2] * x.shape[-1] / 1e6
    names = list(enumerate(EXPERTS[:d.model.config.num_experts]))
    if d.model.config.handover_network:
        names.append((HANDOVER, HANDOVER))
    per = {}
    for e, name in names:
        forced = replace(FULL, expert=e)
        d.derain(x, forced)
        med, best = timed(lambda forced=forced: d.derain(x, forced), repeats)
        per[name] = [round(med / mp, 3), round(best / mp, 3)]
    return per


def per_network_flops(model, xs: torch.Tensor) -> tuple[list[int], int | None]:
    """FLOPs per pixel of each expert on ``xs`` (a whole network, or its bottleneck part in a shared-network model),
    and of the handover network (None without one). Identity blocks are skipped, as at inference."""
    px = xs.shape[-2] * xs.shape[-1]
    per = []
    with torch.no_grad():
        if model.config.expert_scope == "network":  # each expert is a whole network
            for e in model.experts:
                per.append(round(flops_of(lambda e=e: e._restore_once(xs, torch.ones(1, 1))) / px))
        else:
            feats = model.encode(xs)
            b = feats[-1]
            for e in model.experts:
                per.append(round(flops_of(lambda e=e: e(b, model.ups[-1], feats[-2])) / px))
        handover = None
        if model.config.handover_network:
            handover = round(flops_of(lambda: model.handover._restore_once(xs, torch.ones(1, 1))) / px)
    return per, handover


def size_and_flops(model) -> dict:
    """Parameters and FLOPs per pixel of the model, of its pattern head, of each expert and of the handover network
    (where the model has one), counted on a 256-px image (the pattern head on what it is shown of a 1-MP image)."""
    res = {"parameters": sum(p.numel() for p in model.parameters())}
    res["parameters_pattern_head"] = sum(p.numel() for p in model.pattern_head.parameters())
    res["parameters_per_expert"] = [sum(p.numel() for p in e.parameters()) for e in model.experts]
    s = 256
    xs = torch.rand(1, 3, s, s)
    one = torch.zeros(1, model.config.num_experts)
    one[0, 0] = 1
    with torch.no_grad():
        res["flops_per_pixel_restore_top1"] = round(flops_of(lambda: model.restore(xs, one)) / s / s)
        # what the head is shown of a 1-MP image: one 256-px copy, or (config.head_view) up to 16 crops
        res["flops_per_pixel_pattern_head_at_1MP"] = round(
            flops_of(lambda: model.perceive(torch.rand(1, 3, 1024, 1024))) / 1024 / 1024)
        res["flops_per_pixel_per_expert"], handover = per_network_flops(model, xs)
        if handover is not None:
            res["flops_per_pixel_handover"] = handover
            res["parameters_handover"] = sum(p.numel() for p in model.handover.parameters())
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure after a warm-up (median and fastest)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--cuda", action="store_true", help="also time fp32/fp16/bf16 on the GPU")
    ap.add_argument("--per-expert", action="store_true",
                    help="also time each expert at full size, every image routed to it (the networks may differ in depth)")
    ap.add_argument("--flops-only", action="store_true",
                    help="print only the parameters and FLOPs per pixel (no timing, no memory): quick, and the same on "
                         "any machine")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint)
    res = {"checkpoint": a.checkpoint, "threads": a.threads, "torch": torch.__version__}
    if a.flops_only:
        print(json.dumps({**res, **size_and_flops(model)}, indent=2))
        return
    d = Derainer(model)

    x = torch.rand(1, 3, 1024, 1024)
    res["timed_expert"] = TIMED_EXPERT
    default_path(d, x)
    mp = 1024 * 1024 / 1e6
    med, best = timed(lambda: default_path(d, x), a.repeats)
    res["seconds_per_megapixel_1MP"] = round(med / mp, 3)
    res["seconds_per_megapixel_1MP_best"] = round(best / mp, 3)
    default_path(d, x, FULL)
    med, best = timed(lambda: default_path(d, x, FULL), a.repeats)
    res["seconds_per_megapixel_1MP_full_size"] = round(med / mp, 3)
    res["seconds_per_megapixel_1MP_full_size_best"] = round(best / mp, 3)
    res["auto_tile_1MP"] = d.auto_tile(None, 1024, 1024)
    untiled = DerainOptions(tile=0, work_side=0)
    default_path(d, x, untiled)
    med, best = timed(lambda: default_path(d, x, untiled), a.repeats)
    res["seconds_per_megapixel_1MP_untiled"] = round(med / mp, 3)
    res["seconds_per_megapixel_1MP_untiled_best"] = round(best / mp, 3)
    # the expert check where it runs (both streak experts ranked first): two restorations, two residual masks
    med, best = timed(lambda: derain_checked(d, x), a.repeats)
    res["seconds_per_megapixel_1MP_expert_check"] = round(med / mp, 3)
    res["seconds_per_megapixel_1MP_expert_check_best"] = round(best / mp, 3)

    if a.per_expert:
        res["seconds_per_megapixel_1MP_full_size_per_expert_median_best"] = per_network_times(d, x, a.repeats)

    res.update(size_and_flops(model))
    if not a.skip_memory:
        gib, secs = peak_rss_child(a.checkpoint, a.threads, 2448, 3264)
        res["auto_tile_8MP"] = d.auto_tile(None, 2448, 3264)
        res["peak_rss_GiB_8MP"] = round(gib, 3)
        res["seconds_8MP_incl_startup"] = round(secs, 1)
        gib, secs = peak_rss_child(a.checkpoint, a.threads, 2448, 3264, work_side=0)
        res["peak_rss_GiB_8MP_full_size"] = round(gib, 3)
        res["seconds_8MP_full_size_incl_startup"] = round(secs, 1)
    if a.cuda:
        res["cuda"] = cuda_figures(model)
    print(json.dumps(res, indent=2))


def cuda_figures(model):
    """GPU, every image restored at full size (``work_side = 0``): ms per megapixel (1 MP, batch 1 and batch 8 of
    512², median of 5 after warm-up, synchronised),
    max difference of fp16/bf16 outputs from fp32, and peak GPU memory for an 8-MP image (the Derainer's automatic tiling)."""
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(0)}
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    xb = torch.rand(8, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    ref = None
    for dt in ("fp32", "fp16", "bf16"):
        d = Derainer(copy.deepcopy(model), device=dev, dtype=dt)  # Derainer casts the model in place
        y = default_path(d, x, FULL).images
        for _ in range(2):
            default_path(d, x, FULL)
        row = {}
        for name, inp in (("1MP", x), ("8x512", xb)):
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t = time.perf_counter()
                default_path(d, inp, FULL)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            row[f"ms_per_MP_{name}"] = round(1000 * statistics.median(times) / (inp[0].numel() / 3 * inp.shape[0] / 1e6), 1)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            derain_checked(d, x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        row["ms_per_MP_1MP_expert_check"] = round(1000 * statistics.median(times) / (x[0].numel() / 3 / 1e6), 1)
        if ref is None:
            ref = y.float()
        else:
            row["max_abs_diff_vs_fp32"] = round(float((y.float() - ref).abs().max()), 4)
            row["mean_abs_diff_vs_fp32"] = round(float((y.float() - ref).abs().mean()), 5)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            default_path(d, torch.rand(1, 3, 2448, 3264), FULL)
            torch.cuda.synchronize()
            row["peak_GiB_8MP"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        except torch.cuda.OutOfMemoryError as e:
            row["peak_GiB_8MP"] = f"out of memory: {e}"[:200]
        del d
        torch.cuda.empty_cache()
        out[dt] = row
    return out


if __name__ == "__main__":
    main()
