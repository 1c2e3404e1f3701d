"""`cliprpn` command line (also `python -m cliprpn_core`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_derainer(args):
    from .inference import load_derainer
    return load_derainer(args.checkpoint, args.clip, args.clip_arch, args.device, args.dtype)


def cmd_derain(args):
    import torch
    from tqdm import tqdm

    from .imageio import ImageReadError, list_images, read_image, save_image
    from .patterns import EXPERTS, describe
    if args.threads:
        torch.set_num_threads(args.threads)
    files = list_images(args.inputs)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    d, ck = _load_derainer(args)
    report, failed = [], 0
    bar = tqdm(files, desc="derain", unit="img", disable=args.quiet)
    for f in bar:
        try:
            img = read_image(f)
            r = d.derain(img, top_k=args.top_k, override=args.expert, tile=args.tile or None, overlap=args.overlap,
                         self_ensemble=args.self_ensemble, passes=args.passes or None, check=args.check)
        except (ImageReadError, ValueError) as e:
            failed += 1
            tqdm.write(f"skipped {f}: {e}", file=sys.stderr)
            report.append({"file": str(f), "status": "error", "error": str(e)})
            continue
        dst = out / (f.stem + ".png")
        save_image(r.images[0], dst)
        if args.save_mask:
            save_image(r.masks[0], out / (f.stem + "_mask.png"))
        w = r.routing[0]
        report.append({"file": str(f), "output": str(dst), "status": "ok", "seconds": round(r.seconds, 4),
                       "perceived_by": r.perceived_by, "pattern": describe(r.pattern[0]),
                       "pattern_probs": [round(float(p), 4) for p in r.pattern[0]],
                       "routing": {EXPERTS[i]: round(float(w[i]), 4) for i in range(len(w)) if w[i] > 0}})
    if args.report:
        Path(args.report).write_text(json.dumps({"checkpoint": str(ck), "images": report}, indent=2))
    ok = len(files) - failed
    print(f"{ok} derained into {out}, {failed} failed", file=sys.stderr)
    return 1 if failed and not ok else (2 if failed else 0)


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
    cfg = TrainConfig.from_toml(args.config, args.overrides)
    print(train(cfg))
    return 0


def cmd_synth(args):
    from .data import write_labelled_set
    write_labelled_set(args.clean, args.output, args.count, args.size, args.seed, args.style)
    print(f"{args.count} labelled pairs in {args.output}")
    return 0


def cmd_fetch_clip(args):
    from .perceiver import download_clip
    print(download_clip(args.choice, args.dest))
    return 0


def build_parser():
    from .inference import DEFAULT_OVERLAP
    p = argparse.ArgumentParser(prog="cliprpn", description="CLIP-RPN adaptive deraining")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("derain", help="derain image files or folders")
    d.add_argument("inputs", nargs="+", help="image files and/or folders")
    d.add_argument("-o", "--output", required=True, help="output folder (same file names, .png)")
    d.add_argument("--checkpoint", help="CLIP-RPN .safetensors (default: the shipped model)")
    d.add_argument("--clip", help="CLIP weights: <ARCH>__<TAG>.safetensors file or open_clip folder")
    d.add_argument("--clip-arch", help="open_clip architecture if the CLIP file name does not carry it")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    d.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    d.add_argument("--tile", type=int, default=0, help="tile size in pixels (0: automatic for large images)")
    d.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="tile overlap in pixels")
    d.add_argument("--self-ensemble", action="store_true",
                   help="average the image and its 3 flips (4 runs: a little cleaner, 4x slower)")
    d.add_argument("--check", action="store_true",
                   help="expert check: restore with the two best-ranked experts and keep the runner-up where the "
                        "model finds clearly less rain left in its output (about 3x slower)")
    d.add_argument("--top-k", type=int, default=1, help="experts per image")
    d.add_argument("--passes", type=int, default=0,
                   help="restoration passes (0: the model's own setting; each pass restores the previous output)")
    d.add_argument("--expert", type=int, default=None, help="force one expert (index) for every image")
    d.add_argument("--save-mask", action="store_true", help="also write NAME_mask.png")
    d.add_argument("--report", help="write per-image pattern, routing and seconds as JSON")
    d.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(fn=cmd_derain)
    e = sub.add_parser("eval", help="Y-PSNR/SSIM of predictions against ground truth (same names)")
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
    t = sub.add_parser("train", help="train from a TOML config with key=value overrides")
    t.add_argument("config", nargs="?")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(fn=cmd_train)
    s = sub.add_parser("synth", help="write a labelled synthetic rain set (rain/, gt/, mask/, labels.json)")
    s.add_argument("clean", nargs="+", help="folders of clean photos")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("-n", "--count", type=int, default=100)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--style", default="classic", choices=["classic", "calibrated"],
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
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
