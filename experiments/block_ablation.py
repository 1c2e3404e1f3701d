"""What each block of one expert network gives: the network's Y-PSNR on training pairs with that block made the
identity (its residual scales beta and gamma zeroed, as an identity block that inference skips), against the whole
network. Used to choose which blocks a network can lose when it must get faster (the least missed first). Reads
training pairs only (default: every tenth pair of RainTrainL), never a test set.

  python experiments/block_ablation.py NET.safetensors --expert light_streaks [--pairs ../shared/data/rain100l_train]
      [--every 10] [--modules middle experts.0.body] [--threads 2]

NET is a shared-network file (a network being trained, e.g. runs/stageNN/model.safetensors); --expert names the
expert its routing is forced to.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cliprpn_core.arch import EXPERTS, Block  # noqa: E402
from cliprpn_core.checkpoint import load_model  # noqa: E402
from cliprpn_core.data import pair_files  # noqa: E402
from cliprpn_core.imageio import read_image, to_uint8  # noqa: E402
from cliprpn_core.inference import Derainer, DerainOptions  # noqa: E402
from cliprpn_core.metrics import psnr_y  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("net")
    ap.add_argument("--expert", default="light_streaks", choices=EXPERTS)
    ap.add_argument("--pairs", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "rain100l_train"))
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--modules", nargs="+", default=None,
                    help="module prefixes whose blocks are ablated (default: middle and the expert's body)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    e = EXPERTS.index(a.expert)
    model = load_model(a.net)
    if model.config.expert_scope != "bottleneck":
        raise SystemExit(f"{a.net} is not a shared-network file (expert_scope 'bottleneck'): extract the network first "
                         "(scripts/assemble_experts.py --extract)")
    prefixes = a.modules or ["middle", f"experts.{e}.body"]
    try:
        pairs = pair_files(a.pairs)[::a.every]
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    xs = [read_image(r)[None] for r, _ in pairs]
    gts = [to_uint8(read_image(g)) for _, g in pairs]
    d = Derainer(model)
    opts = DerainOptions(expert=e, verify=False, work_side=0)

    def score() -> float:
        with torch.no_grad():
            return sum(psnr_y(to_uint8(d.derain(x, opts).images[0]), g) for x, g in zip(xs, gts)) / len(xs)

    base = score()
    print(f"{a.net}: {len(xs)} pairs, whole network {base:.3f} dB", flush=True)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Block)
              and any(n == p or n.startswith(p + ".") for p in prefixes)]
    rows = []
    for name, m in blocks:
        if m.is_identity():
            print(f"{name}: already the identity", flush=True)
            continue
        kept = m.beta.detach().clone(), m.gamma.detach().clone()
        with torch.no_grad():
            m.beta.zero_()
            m.gamma.zero_()
        s = score()
        with torch.no_grad():
            m.beta.copy_(kept[0])
            m.gamma.copy_(kept[1])
        rows.append((base - s, name))
        print(f"{name}: {s:.3f} dB without it ({base - s:+.3f} lost)", flush=True)
    print("least missed first:")
    for lost, name in sorted(rows):
        print(f"  {name}  {lost:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
