"""Build a model whose experts are whole networks (expert_scope "network") from shared-network checkpoints:
expert e's network comes from the checkpoint given for it (its shared layers and its expert e), every other expert's
from --base, perception (pattern head, router) from --base. --base may itself be a whole-network-expert model (the
shipped one): then only the experts given are replaced, and a given network with more blocks (a grown config, e.g. a
deeper bottleneck) grows the base's other networks with identity blocks to match; one with fewer (trained before the
base's other networks were grown) is grown to the base's block counts the same way.

  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors \
      --expert light_streaks=runs/stage13_light/model.safetensors -o runs/assembled.safetensors
  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --head-view 128 -o runs/view.safetensors
  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --verify-heavy-mask 0.1 0.2 -o F
  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --verify-heavy-routing on -o F

--handover heavy_streaks gives the output a handover network (config.handover_network: the network the light
verification's handovers go to) that is a copy of the base's heavy-streaks network as it is before any --expert is
applied; --handover CKPT takes it from a shared-network checkpoint's heavy-streaks network instead. So the heavy
network can be replaced while the handovers keep the one they had:

  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --handover heavy_streaks \
      --expert heavy_streaks=runs/heavy_network.safetensors -o F

--extract NAME does the inverse: it writes expert NAME's network of a whole-network-expert --base as a shared-network
model (its perception included), the form training starts from (``init``) and --expert takes back (NAME = handover:
the handover network, written in the heavy-streaks slot, the form --handover CKPT takes back):

  python scripts/assemble_experts.py --base models/clip_rpn_default.safetensors --extract light_streaks \
      -o runs/light_network.safetensors
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliprpn_core.arch import (HANDOVER, network_experts_from, replace_network_experts,  # noqa: E402
                               shared_network_of, with_handover_network)
from cliprpn_core.checkpoint import file_sha256, load_model, save_model  # noqa: E402
import torch  # noqa: E402
from cliprpn_core.patterns import EXPERTS  # noqa: E402


def _expert_index(name: str, n: int) -> int:
    """Expert name or index -> index, or -1 if it is neither."""
    e = int(name) if name.isdigit() else (EXPERTS.index(name) if name in EXPERTS else -1)
    return e if 0 <= e < n else -1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="checkpoint giving perception and the other experts (shared-network or whole-network experts)")
    ap.add_argument("--expert", action="append", default=[], metavar="NAME=CKPT",
                    help=f"expert name ({', '.join(EXPERTS)}) or index = the checkpoint its network comes from")
    ap.add_argument("--head-view", type=int, default=None, metavar="N",
                    help="set the output's config.head_view (what the pattern head sees: 0 = the whole image resized, "
                         "N = crops of N px, their probabilities averaged); default: the base's. Weights are unchanged")
    ap.add_argument("--verify-light-mask", type=float, default=None, metavar="X",
                    help="set the output's config.verify_light_mask (an image routed to the light-streaks network whose "
                         "mean rain mask from that network is below X goes to the heavy-streaks network; 0 = off); "
                         "default: the base's. Weights are unchanged")
    ap.add_argument("--verify-heavy-mask", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="set the output's config.verify_heavy_mask (an image the light verification hands over is "
                         "restored by the light network where the heavy network's mean rain mask is at most LO, by the "
                         "heavy network where it is at least HI, by both, weighted, between; 0 0 = off: handed over "
                         "wholly); default: the base's. Weights are unchanged")
    ap.add_argument("--verify-light-ramp", type=float, default=None, metavar="B",
                    help="set the output's config.verify_light_ramp (above verify_light_mask: the handover's share "
                         "falls linearly from 1 at verify_light_mask to 0 at B, so a light mask near the threshold "
                         "moves the restoration a little instead of switching networks; 0 = off); default: the base's. "
                         "Weights are unchanged")
    ap.add_argument("--verify-heavy-routing", choices=("on", "off"), default=None,
                    help="set the output's config.verify_heavy_routing (on: an image perception routes to the "
                         "heavy-streaks network alone whose heavy mask is below verify_heavy_mask's HI is restored by "
                         "the light network too and the two mixed as a confirmed handover is; needs verify_heavy_mask); "
                         "default: the base's. Weights are unchanged")
    ap.add_argument("--handover", metavar="heavy_streaks|CKPT",
                    help="give the output a handover network (the network the light verification's handovers go to): "
                         "heavy_streaks = a copy of the base's heavy-streaks network before any --expert, CKPT = that "
                         "checkpoint's heavy-streaks network; default: the base's (none, or its own)")
    ap.add_argument("--extract", metavar="NAME",
                    help="write expert NAME's network of a whole-network-expert --base as a shared-network model "
                         "(to train it further); takes no --expert, --head-view or --verify-* option")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    # Growing a network's companions adds identity blocks whose other weights are drawn at random (they are
    # skipped at inference until trained); a fixed seed makes the same command write the same tensors.
    torch.manual_seed(0)
    base = load_model(a.base)
    if a.extract is not None:
        if (a.expert or a.head_view is not None or a.verify_light_mask is not None or a.verify_heavy_mask is not None
                or a.verify_light_ramp is not None or a.verify_heavy_routing is not None or a.handover is not None):
            ap.error("--extract takes no --expert, --handover, --head-view or --verify-* option")
        e = HANDOVER if a.extract == HANDOVER else _expert_index(a.extract, base.config.num_experts)
        if e == -1:
            ap.error(f"unknown expert {a.extract!r}: one of {', '.join(EXPERTS)}, {HANDOVER} or "
                     f"0..{base.config.num_experts - 1}")
        try:
            model = shared_network_of(base, e)
        except ValueError as err:
            ap.error(f"{a.base}: {err}")
        name = e if e == HANDOVER else EXPERTS[e]
        save_model(model, a.out, extra_meta={"extracted_from": f"{a.base} sha256:{file_sha256(a.base)[:16]} "
                                                                 f"expert {name}"})
        print(f"wrote {a.out}: {name}'s network of {a.base} as a shared-network model")
        return 0
    if a.handover is not None:
        try:
            base = with_handover_network(base, None if a.handover == "heavy_streaks" else load_model(a.handover))
        except ValueError as err:
            ap.error(f"--handover {a.handover}: {err}")
    paths = [a.base] * base.config.num_experts
    for spec in a.expert:
        name, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"--expert wants NAME=CKPT, got {spec!r}")
        e = _expert_index(name, base.config.num_experts)
        if e < 0:
            ap.error(f"unknown expert {name!r}: one of {', '.join(EXPERTS)} or 0..{base.config.num_experts - 1}")
        paths[e] = path
    loaded = {p: load_model(p) for p in set(paths) - {a.base}} | {a.base: base}  # each file read once
    digest = {p: file_sha256(p)[:16] for p in loaded}
    if base.config.expert_scope == "network":
        model = replace_network_experts(base, {e: loaded[p] for e, p in enumerate(paths) if p != a.base})
    else:
        model = network_experts_from([loaded[p] for p in paths], perception=base)
    given = {key: value for key, value in (
        ("head_view", a.head_view), ("verify_light_mask", a.verify_light_mask),
        ("verify_heavy_mask", None if a.verify_heavy_mask is None else tuple(a.verify_heavy_mask)),
        ("verify_light_ramp", a.verify_light_ramp),
        ("verify_heavy_routing", None if a.verify_heavy_routing is None else a.verify_heavy_routing == "on"))
        if value is not None}
    try:  # all at once: the ramp is checked against the threshold it is given with
        model.config = replace(model.config, **given)
    except ValueError as e:
        ap.error(str(e))
    kept = " (its own network)" if base.config.expert_scope == "network" else ""
    sources = {EXPERTS[e]: f"{p} sha256:{digest[p]}" + (kept if p == a.base else "") for e, p in enumerate(paths)}
    handover_from = None
    if a.handover == "heavy_streaks":
        handover_from = f"{a.base} sha256:{digest[a.base]} (its heavy_streaks network)"
    elif a.handover is not None:
        handover_from = f"{a.handover} sha256:{file_sha256(a.handover)[:16]}"
    if handover_from:
        sources[HANDOVER] = handover_from
    save_model(model, a.out, extra_meta={"assembled_from": sources})
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out}: {n / 1e6:.2f} M parameters; "
          + ", ".join(f"{EXPERTS[e]} <- {p}" for e, p in enumerate(paths))
          + (f"; {HANDOVER} <- {handover_from}" if handover_from else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
