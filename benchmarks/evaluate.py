"""Rain100L / heavy-set evaluation of CLIP-RPN checkpoints, by the protocol of method.md:
outputs written as 8-bit PNG at the input size, then Y-PSNR / SSIM read back from the files.

  python -m benchmarks.evaluate CKPT [CKPT...] [--sets rain100l heavy_test] [--experts | --expert NAME] [--self-ensemble]
                                [--check [--check-ratio T]] [--top-k K] [--passes N] [--json out.json]

--experts also forces every image through each single expert (routing vs best single expert) and reports the
per-image oracle: the best expert for each image chosen by its ground truth (an upper bound for top-1 routing,
not a method: it needs the clean image), how often each expert is that best one, and how often routing picked it;
--expert NAME runs only that one expert for every image, in place of the routed runs (a network trained without
routing, evaluated as it is used; `--expert handover`: the model's handover network, which restores the images the
light verification hands over, forced on every image);
--self-ensemble also runs the routed model with the flip self-ensemble (the Derain node's option);
--check also runs it with the expert check (the two best-ranked experts, the runner-up kept where the model's
mask estimator finds clearly less rain in its output; the Derain node's expert_check option); both together
also run the two combined.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from cliprpn_core.arch import HANDOVER
from cliprpn_core.checkpoint import load_model
from cliprpn_core.inference import CHECK_RATIO, Derainer, DerainOptions
from cliprpn_core.patterns import EXPERTS

from .common import DATA, derain_set


def run(derainer, set_dir, options: DerainOptions):
    """One set derained with ``options``, scored by the protocol (common.derain_set)."""
    ev, chosen, secs = derain_set(derainer, set_dir, options)
    m = ev["mean"]
    per = {r["name"]: round(r["psnr"], 3) for r in ev["images"]}
    # rain_left: a diagnostic (metrics.rain_left), the share of the rain the outputs still carry
    return {"psnr": round(m["psnr"], 3), "ssim": round(m["ssim"], 4), "rain_left": round(m["rain_left"], 3),
            "routing": dict(Counter(chosen.values())), "seconds": round(secs, 1), "per_image_psnr": per,
            "per_image_expert": chosen}


def oracle(res_set: dict) -> dict:
    """Per-image best single expert from the forced runs of one set (its ``forced_<expert>`` entries):
    mean PSNR of the per-image best (each per-image figure by the protocol), how often each expert is
    the best, and on how many images the routed run chose that expert."""
    forced = {k[len("forced_"):]: v["per_image_psnr"] for k, v in res_set.items() if k.startswith("forced_")}
    if not forced:
        raise ValueError("oracle needs the forced-expert runs (--experts)")
    names = sorted(next(iter(forced.values())))
    best = {n: max(forced, key=lambda e: forced[e][n]) for n in names}
    out = {"psnr": round(sum(forced[best[n]][n] for n in names) / len(names), 3),
           "best_expert": dict(Counter(best.values()))}
    chosen = res_set.get("routed", {}).get("per_image_expert")
    if chosen:
        out["routed_chose_best"] = sum(chosen.get(Path(n).stem) == best[n] for n in names)
    return out


def short(r):
    return {k: v for k, v in r.items() if not k.startswith("per_image")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--sets", nargs="+", default=["rain100l", "heavy_test"])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--experts", action="store_true")
    ap.add_argument("--expert", choices=[*EXPERTS, HANDOVER],
                    help="only: every image through this one expert (e.g. a network trained without routing, as it "
                         "is used), or handover: the model's handover network; in place of the routed runs")
    ap.add_argument("--self-ensemble", action="store_true", help="also: routed + flip self-ensemble (4 runs per image)")
    ap.add_argument("--top-k", type=int, default=1, help="experts per image for the routed runs")
    ap.add_argument("--passes", type=int, default=0, help="restoration passes (0: each model's own setting)")
    ap.add_argument("--check", action="store_true", help="also: routed with the expert check")
    ap.add_argument("--check-ratio", type=float, default=CHECK_RATIO, help="the expert check's residual-rain ratio")
    ap.add_argument("--no-verify", action="store_true",
                    help="routed runs without the model's verification of light and heavy routing "
                         "(config.verify_light_mask, config.verify_heavy_routing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.expert and (a.experts or a.check or a.self_ensemble):
        ap.error("--expert replaces the routed runs: it does not go with --experts, --check or --self-ensemble")
    torch.set_num_threads(a.threads)
    results = {}
    routed = DerainOptions(top_k=a.top_k, passes=a.passes or None, verify=not a.no_verify)
    checked = replace(routed, check=True, check_ratio=a.check_ratio)
    for ck in a.checkpoints:
        d = Derainer(load_model(ck))
        print(f"{ck}: {routed.passes or d.model.config.passes} restoration pass(es)", flush=True)
        res = {}
        for s in a.sets:
            if a.expert:
                key = f"forced_{a.expert}"
                e = HANDOVER if a.expert == HANDOVER else EXPERTS.index(a.expert)
                res[s] = {key: run(d, Path(a.data) / s, DerainOptions(expert=e, passes=routed.passes))}
                print(f"{ck} {s} forced {a.expert}: {short(res[s][key])}", flush=True)
                continue
            res[s] = {"routed": run(d, Path(a.data) / s, routed)}
            print(f"{ck} {s} routed: {short(res[s]['routed'])}", flush=True)
            if a.self_ensemble:
                res[s]["routed_self_ensemble"] = run(d, Path(a.data) / s, replace(routed, self_ensemble=True))
                print(f"{ck} {s} routed + self-ensemble: {short(res[s]['routed_self_ensemble'])}", flush=True)
            if a.check:
                res[s]["routed_check"] = run(d, Path(a.data) / s, checked)
                print(f"{ck} {s} routed + expert check (ratio {a.check_ratio:g}): {short(res[s]['routed_check'])}",
                      flush=True)
                if a.self_ensemble:
                    res[s]["routed_check_self_ensemble"] = run(d, Path(a.data) / s,
                                                               replace(checked, self_ensemble=True))
                    print(f"{ck} {s} routed + expert check + self-ensemble: "
                          f"{short(res[s]['routed_check_self_ensemble'])}", flush=True)
            if a.experts:
                for e in range(d.model.config.num_experts):
                    forced = DerainOptions(expert=e, passes=routed.passes)
                    res[s][f"forced_{EXPERTS[e]}"] = run(d, Path(a.data) / s, forced)
                    print(f"{ck} {s} forced {EXPERTS[e]}: {short(res[s][f'forced_{EXPERTS[e]}'])}", flush=True)
                res[s]["oracle_expert"] = oracle(res[s])
                print(f"{ck} {s} per-image best expert (oracle, chosen by ground truth): {res[s]['oracle_expert']}",
                      flush=True)
        results[ck] = res
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
