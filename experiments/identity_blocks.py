"""Remove blocks from a network without changing its shape: the named blocks' residual scales (beta, gamma) are
zeroed, which makes each the identity, skipped at inference (and in training while a run keeps their scales frozen:
leave them out of its `trainable` list). Writes a new file; the source is not touched.

  python experiments/identity_blocks.py NET.safetensors -o OUT.safetensors --blocks middle.11 experts.0.body.11 ...

Prints the trainable prefixes a run needs to keep them removed (--trainable, default the restoring modules, with
each module that holds a removed block listed by its parts without the removed ones).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cliprpn_core.arch import Block  # noqa: E402
from cliprpn_core.checkpoint import load_model, save_model  # noqa: E402


def trainable_without(model, prefixes, removed) -> list[str]:
    """The run's trainable ``prefixes`` less the removed blocks: a prefix holding a removed block is replaced by its
    children (and its own parameters), down to the removed blocks, which are left out."""
    removed = set(removed)

    def cover(module, prefix):
        if prefix in removed:
            return []
        if not any(r.startswith(prefix + ".") for r in removed):
            return [prefix]
        out = [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)]
        for n, child in module.named_children():
            out += cover(child, f"{prefix}.{n}")
        return out

    return [q for pre in prefixes for q in cover(model.get_submodule(pre), pre)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("net")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--blocks", nargs="+", required=True)
    ap.add_argument("--trainable", nargs="+", default=["intro", "encoders", "downs", "middle", "mask_estimator", "mgca",
                                                        "ups", "decoders", "experts", "outro"],
                    help="the run's trainable prefixes, from which the removed blocks are taken out")
    a = ap.parse_args(argv)
    model = load_model(a.net)
    blocks = dict(model.named_modules())
    for name in a.blocks:
        if not isinstance(blocks.get(name), Block):
            raise SystemExit(f"{name} is not a block of {a.net}")
    with torch.no_grad():
        for name in a.blocks:
            blocks[name].beta.zero_()
            blocks[name].gamma.zero_()
    extra = {"removed_blocks": " ".join(a.blocks), "removed_from": str(a.net)}
    save_model(model, a.out, extra_meta=extra)
    print(f"wrote {a.out}: {len(a.blocks)} blocks made the identity")
    print("trainable = " + str(trainable_without(model, a.trainable, a.blocks)).replace("'", '"'))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
