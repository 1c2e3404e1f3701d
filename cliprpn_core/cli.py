"""`cliprpn` command line (also `python -m cliprpn_core`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


# Exit codes of every command (also in `cliprpn --help`).
EXIT_OK = 0  # everything done (or skipped: already done)
EXIT_FAILED = 1  # nothing was done: the model, a checkpoint or every input failed
EXIT_USAGE = 2  # the command line is wrong (bad value, device not here, outputs that would collide)
EXIT_PARTIAL = 3  # some images done, some failed (each named on stderr and in the report)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: what finished is kept and reported; rerun to resume
EXIT_CODES = (f"exit codes: {EXIT_OK} all done, {EXIT_FAILED} nothing done (model or every input failed), "
              f"{EXIT_USAGE} bad command line (nothing done), {EXIT_PARTIAL} some images failed, "
              f"{EXIT_INTERRUPTED} interrupted (finished outputs kept; rerun to resume)")

SYNTH_STYLES = ("classic", "calibrated", "downpour", "mixed")  # synthesis.STYLES, without importing torch here
MAX_TILE = 16384
MIN_TILE = 128
MAX_OVERLAP = 512


def int_in(lo: int, hi: int | None = None, zero_ok: bool = False, what: str = "a whole number"):
    """argparse type: an int in lo..hi (or 0 when ``zero_ok``), else a one-line usage error."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if zero_ok and v == 0:
            return v
        if v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{v} is out of range: use {'0 or ' if zero_ok else ''}{rng}")
        return v
    return parse


def expert_arg(text):
    """argparse type for --expert: an expert's index or name (``1``, ``heavy_streaks``), or ``handover`` (the network
    the light verification hands its images to)."""
    from .arch import HANDOVER
    from .patterns import EXPERTS
    if text == HANDOVER:
        return HANDOVER
    if text in EXPERTS:
        return EXPERTS.index(text)
    try:
        return int_in(0, len(EXPERTS) - 1, what="an expert's index or name")(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(
            f"{err}; experts: " + ", ".join(f"{i} {n}" for i, n in enumerate(EXPERTS)) + f", or {HANDOVER}") from None


def check_tiling(tile: int, overlap: int) -> None:
    """With a tile, the overlap must leave a stride of at least half a tile (else most work is redone)."""
    if tile and 2 * overlap >= tile:
        raise UsageError(f"--overlap {overlap} is too large for --tile {tile}: use an overlap below half the tile "
                         f"(at most {tile // 2 - 1}), or a larger tile")


class UsageError(ValueError):
    """A command-line value that argparse could not check on its own."""


def _load_derainer(args):
    from .inference import load_derainer
    return load_derainer(args.checkpoint, args.clip, args.clip_arch, args.device, args.dtype)


def _install_sigterm():
    """SIGTERM (`kill PID`) stops as cleanly as Ctrl-C. Returns a function restoring the old handler."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def _term(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, _term)
    return lambda: signal.signal(signal.SIGTERM, old)


def derain_options(args):
    """The derain flags as the Derainer's DerainOptions (0 for --tile and --passes: the defaults)."""
    from .inference import DerainOptions
    return DerainOptions(top_k=args.top_k, expert=args.expert, tile=args.tile or None, overlap=args.overlap,
                         self_ensemble=args.self_ensemble, passes=args.passes or None, check=args.check,
                         work_side=args.work_side, verify=not args.no_verify)


def _derain_settings(args, ck) -> dict:
    """What decides an output's pixels: a rerun with other settings redoes the images."""
    try:
        st = os.stat(ck)
        ck_id = [os.path.abspath(ck), st.st_size, st.st_mtime_ns]
    except OSError:
        ck_id = [str(ck)]
    return {"checkpoint": ck_id, "clip": args.clip, "clip_arch": args.clip_arch, "dtype": args.dtype,
            "top_k": args.top_k, "expert": args.expert, "tile": args.tile, "overlap": args.overlap,
            "self_ensemble": args.self_ensemble, "passes": args.passes, "check": args.check,
            "save_mask": args.save_mask, "work_side": args.work_side, "verify": not args.no_verify}


def cmd_derain(args):
    from .imageio import ImageReadError, read_image_info, save_image
    from .inference import light_handover_share, resolve_device
    from .patterns import EXPERTS, describe
    from .runfiles import ResumeLog, check_output_dir, clean_partials, collect_inputs, plan_outputs
    import torch
    from tqdm import tqdm

    check_tiling(args.tile, args.overlap)
    resolve_device(args.device)  # DeviceError (a usage error) before anything is written
    out = Path(args.output)
    entries = collect_inputs(args.inputs)
    if args.in_place and out.is_dir():  # the derained PNGs of an earlier in-place run are not new inputs
        earlier = ResumeLog(out, {})
        entries = [(p, problem) for p, problem in entries if not earlier.output_of_another_input(p)]
    good = [p for p, problem in entries if not problem]
    name = (lambda f: f.name) if args.keep_ext else (lambda f: f.stem)
    outputs = [[out / (name(f) + ".png")] + ([out / (name(f) + "_mask.png")] if args.save_mask else []) for f in good]
    extra = {"--report": Path(args.report)} if args.report else {}
    plan_outputs(args.inputs, good, outputs, out, in_place=args.in_place, extra=extra)
    if good:
        check_output_dir(out)
        n = clean_partials(out)
        if n:
            print(f"removed {n} partial file(s) an interrupted run left in {out}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    report, failed, skipped = [], 0, 0
    for p, problem in entries:
        if problem:
            failed += 1
            print(f"skipped {p}: {problem}", file=sys.stderr)
            report.append({"file": str(p), "status": "error", "error": problem})
    ck = args.checkpoint
    todo = list(zip(good, outputs))
    interrupted = False
    restore_term = _install_sigterm()
    try:
        if todo:
            d, ck = _load_derainer(args)
            e = d.model.config.num_experts
            if isinstance(args.expert, int) and not 0 <= args.expert < e:
                raise UsageError(f"--expert {args.expert} is out of range: this model has {e} experts (0..{e - 1}: "
                                 + ", ".join(EXPERTS[:e]) + ")")
            if args.top_k > e:
                raise UsageError(f"--top-k {args.top_k} is more than this model's {e} experts")
            options = derain_options(args)
            log = ResumeLog(out, _derain_settings(args, ck))
            if not args.overwrite:
                keep = [(f, dsts) for f, dsts in todo if not log.done(f, dsts)]
                for f, dsts in todo:
                    if (f, dsts) not in keep:
                        skipped += 1
                        report.append({"file": str(f), "output": str(dsts[0]), "status": "skipped",
                                       "reason": "output complete and unchanged (use --overwrite to redo)"})
                todo = keep
        bar = tqdm(total=len(todo), desc="derain", unit="img", disable=args.quiet or not todo)
        for f, dsts in todo:
            try:
                img, info = read_image_info(f)
                r = d.derain(img, options, progress=_tile_progress(bar, f))
            except (ImageReadError, ValueError) as e:
                failed += 1
                tqdm.write(f"skipped {f}: {e}", file=sys.stderr)
                report.append({"file": str(f), "status": "error", "error": str(e)})
                bar.update(1)
                continue
            save_image(r.images[0], dsts[0], icc_profile=info["icc_profile"])
            if args.save_mask:
                save_image(r.masks[0], dsts[1])
            log.record(f, dsts)
            w = r.routing[0]
            entry = {"file": str(f), "output": str(dsts[0]), "status": "ok", "seconds": round(r.seconds, 4),
                     "perceived_by": r.perceived_by, "pattern": describe(r.pattern[0]),
                     "pattern_probs": [round(float(p), 4) for p in r.pattern[0]],
                     "routing": {EXPERTS[i]: round(float(w[i]), 4) for i in range(len(w)) if w[i] > 0}}
            if r.handover:  # --expert handover: the routing row says heavy streaks
                entry["restored_by"] = ("the handover network" if d.model.config.handover_network else
                                        "the heavy-streaks network (this model has no handover network)")
            if r.light_mask is not None and not torch.isnan(r.light_mask[0]):  # light routing was verified
                lm = float(r.light_mask[0])
                entry["light_mask"] = round(lm, 4)
                wl, wh = float(w[EXPERTS.index("light_streaks")]), float(w[EXPERTS.index("heavy_streaks")])
                cfg = d.model.config
                handed = (f"its light mask {lm:.4f} is below the model's verify_light_mask" if lm < cfg.verify_light_mask
                          else f"its light mask {lm:.4f} is on the model's verify_light_ramp (a handover share of "
                               f"{light_handover_share(lm, cfg.verify_light_mask, cfg.verify_light_ramp):.2f})")
                # the network that takes a handover: the model's handover network where it has one
                own = cfg.handover_network
                to = "the handover network" if own else "the heavy-streaks network"
                if r.heavy_mask is not None and not torch.isnan(r.heavy_mask[0]):  # the handover was confirmed
                    hm = float(r.heavy_mask[0])
                    entry["heavy_mask"] = round(hm, 4)
                    confirmed = (f"{'the handover' if own else 'the heavy'} network's mask {hm:.4f} against the "
                                 "model's verify_heavy_mask")
                    entry["verified"] = (f"kept by the light-streaks network: {handed}, but {confirmed} finds no "
                                         f"heavy rain" if wh == 0 else
                                         f"handed to {to}: {handed}, and {confirmed} finds "
                                         f"heavy rain" if wl == 0 else
                                         f"shared: {handed}; {confirmed} gives {to} {wh:.2f} of it")
                else:
                    entry["verified"] = ("kept by the light-streaks network" if wh == 0 else
                                         f"handed to {to}: {handed}" if wl == 0 else
                                         f"shared: {handed}; {to} takes {wh:.2f} of it")
            elif r.heavy_mask is not None and not torch.isnan(r.heavy_mask[0]):  # heavy routing was verified
                hm = float(r.heavy_mask[0])
                entry["heavy_mask"] = round(hm, 4)
                wh = float(w[EXPERTS.index("heavy_streaks")])
                seen = f"the heavy network's mask {hm:.4f} against the model's verify_heavy_mask"
                entry["verified"] = (f"kept by the heavy-streaks network: {seen} finds heavy rain" if wh == 1 else
                                     f"given to the light-streaks network: {seen} finds no heavy rain" if wh == 0 else
                                     f"shared: {seen} gives the heavy-streaks network {wh:.2f} of it")
            report.append(entry)
            bar.update(1)
        bar.close()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        restore_term()
        finished = {r["file"] for r in report}
        left = [str(f) for f, _ in todo if str(f) not in finished]
        for f in left:
            report.append({"file": f, "status": "interrupted" if interrupted else "not-run"})
        if args.report and (good or report):
            from .imageio import atomic_write_bytes
            text = json.dumps({"checkpoint": str(ck) if ck else None, "interrupted": interrupted,
                               "images": report}, indent=2)
            atomic_write_bytes(args.report, lambda tmp: Path(tmp).write_text(text))
    ok = sum(r["status"] == "ok" for r in report)
    print(f"{ok} derained into {out}, {skipped} skipped (already done), {failed} failed"
          + (f", {len(left)} left: interrupted, rerun the same command to resume" if interrupted else ""),
          file=sys.stderr)
    if interrupted:
        return EXIT_INTERRUPTED
    if failed:
        return EXIT_PARTIAL if ok + skipped else EXIT_FAILED
    return EXIT_OK


def _tile_progress(bar, f):
    """Per-tile progress of one large image on the bar's postfix (a 20-MP photo is many tiles)."""
    def step(i, n):
        if n > 1 and not bar.disable:
            bar.set_postfix_str(f"{f.name}: tile {i}/{n}")
    return step


def cmd_eval(args):
    from .metrics import evaluate_folders
    r = evaluate_folders(args.pred, args.gt, progress=not args.quiet, rain_dir=args.rain)

    def left(row):
        return f" {row['rain_left']:6.3f}" if "rain_left" in row else ""
    if args.per_image:
        for row in r["images"]:
            print(f"{row['name']:<30} {row['psnr']:7.3f} {row['ssim']:.4f}{left(row)}")
    print(f"{'mean (' + str(len(r['images'])) + ' images)':<30} {r['mean']['psnr']:7.3f} {r['mean']['ssim']:.4f}"
          f"{left(r['mean'])}   [Y-PSNR dB / SSIM, protocol of method.md"
          + ("; rain left: share of the rain still in the outputs, a diagnostic]" if args.rain else "]"))
    if r["missing"]:
        print(f"missing predictions: {len(r['missing'])} (e.g. {r['missing'][:3]})", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def cmd_info(args):
    from .checkpoint import describe
    print(json.dumps(describe(args.checkpoint), indent=2))
    return 0


def cmd_train(args):
    from .train import TrainConfig, train
    if args.config and "=" in args.config and not Path(args.config).exists():  # `cliprpn train steps=10 ...`
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        cfg = TrainConfig.from_toml(args.config, args.overrides)
    except OSError as e:
        raise UsageError(f"config {args.config}: {e.strerror or e}") from e
    except ValueError as e:  # tomllib's syntax errors are ValueErrors too
        raise UsageError(f"{args.config or 'overrides'}: {e}") from e
    seen = {}
    path = train(cfg, on_trainer=lambda t: seen.update(t=t))
    t = seen["t"]
    if t.interrupted:
        print(f"interrupted at step {t.step} of {cfg.steps}: training state saved in {t.state_path}, the EMA weights "
              f"so far in {path}; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if t.step < cfg.steps:
        print(f"stopped at step {t.step} of {cfg.steps} (max_minutes); run the same command again to continue",
              file=sys.stderr)
    print(path)
    return EXIT_OK


def cmd_synth(args):
    import warnings

    from .data import write_labelled_set
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_labelled_set(args.clean, args.output, args.count, args.size, args.seed, args.style,
                           progress=not getattr(args, "quiet", False))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"{args.count} labelled pairs in {args.output}")
    return EXIT_OK


def cmd_fetch_clip(args):
    from .perceiver import download_clip
    print(download_clip(args.choice, args.dest))
    return 0


def build_parser():
    from .inference import DEFAULT_OVERLAP, MIN_WORK_SIDE, WORK_SIDE
    from .config import MAX_PASSES
    from .patterns import EXPERTS
    p = argparse.ArgumentParser(prog="cliprpn", description="CLIP-RPN adaptive deraining", epilog=EXIT_CODES)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("derain", help="derain image files or folders", epilog=EXIT_CODES,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Derain images into a folder of 8-bit PNGs (same names, .png). A rerun skips the "
                                   "outputs that are complete and unchanged and redoes the rest; Ctrl-C keeps what "
                                   "finished. EXIF orientation is applied; an ICC colour profile is carried over.")
    d.add_argument("inputs", nargs="+",
                   help="image files, folders (non-recursive), globs ('shots/*.jpg') and list files (.txt, one path a line)")
    d.add_argument("-o", "--output", required=True,
                   help="output folder (must not be an input folder, unless --in-place)")
    d.add_argument("--in-place", action="store_true",
                   help="allow -o to be an input folder: a derained PNG then replaces its own original")
    d.add_argument("--overwrite", action="store_true", help="redo images whose output is already complete")
    d.add_argument("--keep-ext", action="store_true",
                   help="name outputs NAME.EXT.png (a.jpg -> a.jpg.png) so a.jpg and a.png do not collide")
    d.add_argument("--checkpoint", help="CLIP-RPN .safetensors (default: the shipped model)")
    d.add_argument("--clip", help="CLIP weights: <ARCH>__<TAG>.safetensors file or open_clip folder")
    d.add_argument("--clip-arch", help="open_clip architecture if the CLIP file name does not carry it")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    d.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    d.add_argument("--tile", type=int_in(MIN_TILE, MAX_TILE, zero_ok=True), default=0,
                   help=f"tile size in pixels, 0 or {MIN_TILE}..{MAX_TILE} (0: automatic: the whole image, tiled "
                        "above 2 MP on a GPU and above about 0.3 MP on the CPU, where 384-px tiles run twice as fast)")
    d.add_argument("--overlap", type=int_in(0, MAX_OVERLAP), default=DEFAULT_OVERLAP,
                   help=f"tile overlap in pixels, 0..{MAX_OVERLAP} and below half the tile")
    d.add_argument("--work-side", type=int_in(MIN_WORK_SIDE, MAX_TILE, zero_ok=True), default=WORK_SIDE,
                   help=f"working size: an image whose shorter side is above this many pixels is restored at that "
                        f"shorter side and the rain removed there is taken off the full-size image (default "
                        f"{WORK_SIDE}, the training photos': rain drawn larger is removed far less well); 0: restore "
                        f"at full size. --tile applies to the working size")
    d.add_argument("--self-ensemble", action="store_true",
                   help="average the image and its 3 flips (4 runs: a little cleaner, 4x slower)")
    d.add_argument("--check", action="store_true",
                   help="expert check: restore with the two best-ranked experts and keep the runner-up where the "
                        "model finds clearly less rain left in its output (about 3x slower)")
    d.add_argument("--no-verify", action="store_true",
                   help="keep the light-streaks network for every image perception routes to it, also where that "
                        "network finds too little of the rain it knows (by default such an image, a downpour or rain "
                        "haze taken for light rain, goes to the heavy-streaks network: the model's "
                        "verify_light_mask), and the heavy-streaks network for every image routed to it (a model "
                        "with verify_heavy_routing gives an image in which that network finds little heavy rain to "
                        "the light network, or shares it)")
    d.add_argument("--top-k", type=int_in(1, len(EXPERTS)), default=1, help=f"experts per image, 1..{len(EXPERTS)}")
    d.add_argument("--passes", type=int_in(1, MAX_PASSES, zero_ok=True), default=0,
                   help=f"restoration passes, 0..{MAX_PASSES} (0: the model's own setting; each pass restores the "
                        "previous output)")
    d.add_argument("--expert", type=expert_arg, default=None,
                   help="force one expert for every image, by index or name: "
                   + ", ".join(f"{i} {n}" for i, n in enumerate(EXPERTS))
                   + ", or handover: the network the light verification hands photographed downpours and rain "
                     "haze to (the model's handover network; the heavy-streaks network in a model without one)")
    d.add_argument("--save-mask", action="store_true", help="also write NAME_mask.png")
    d.add_argument("--report", help="write per-image pattern, routing and seconds as JSON")
    d.add_argument("--threads", type=int_in(1, 1024, zero_ok=True), default=0, help="CPU threads (0: torch default)")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(fn=cmd_derain)
    e = sub.add_parser("eval", help="Y-PSNR/SSIM of predictions against ground truth (same names)", epilog=EXIT_CODES)
    e.add_argument("--pred", required=True)
    e.add_argument("--gt", required=True)
    e.add_argument("--rain", help="the rainy inputs (same names): also report the rain_left diagnostic")
    e.add_argument("--per-image", action="store_true")
    e.add_argument("--json")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(fn=cmd_eval)
    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("checkpoint")
    i.set_defaults(fn=cmd_info)
    t = sub.add_parser("train", help="train from a TOML config with key=value overrides", epilog=EXIT_CODES
                       + "; an interrupted run saves its state and resumes when the same command is run again")
    t.add_argument("config", nargs="?")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(fn=cmd_train)
    s = sub.add_parser("synth", help="write a labelled synthetic rain set (rain/, gt/, mask/, labels.json)",
                       epilog=EXIT_CODES, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("clean", nargs="+", help="folders of clean photos (unreadable files are skipped with a warning)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("-n", "--count", type=int_in(1, 10_000_000), default=100, help="pairs to write, >= 1")
    s.add_argument("--size", type=int_in(32, 4096), default=256, help="square crop side in pixels, 32..4096")
    s.add_argument("--seed", type=int_in(0), default=0)
    s.add_argument("--style", default="classic", choices=SYNTH_STYLES,
                   help="streak style (see cliprpn_core.synthesis.synthesize)")
    s.set_defaults(fn=cmd_synth)
    f = sub.add_parser("fetch-clip", help="download a supported CLIP model (online machines)")
    f.add_argument("choice", help="one of: 'ViT-B-32 LAION-2B', 'ViT-B-32 OpenAI', 'MobileCLIP2-S0'")
    f.add_argument("dest")
    f.set_defaults(fn=cmd_fetch_clip)
    from .batch import add_batch_parser
    add_batch_parser(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)  # a bad value exits 2 with argparse's one-line message
    if argv is None:  # a command of its own process (not a call from Python): keep freed memory for reuse
        from .cpu_memory import reuse_freed_memory
        reuse_freed_memory()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as e:  # UsageError, PlanError, DeviceError: the command line must change
        from .inference import DeviceError
        from .runfiles import PlanError
        if isinstance(e, (UsageError, PlanError, DeviceError)):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
