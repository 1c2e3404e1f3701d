"""Inits of stage 34, the unrouted control at the current shapes (experiments/stage34_*.toml; reading in their headers).

One network, the shipped light network, is the start of all three arms. ``--extract light_streaks`` gives it as a
shared-network model whose expert 0 is the light network's bottleneck; its expert 1 holds the heavy network's own
bottleneck. The heavy arm trains expert 1, so this writes a second init with expert 0's bottleneck copied into expert 1.
Both arms then start from the same weights.

  python experiments/stage34_init.py [--base runs/stage18_shipped.safetensors]
  -> runs/stage34_init_light.safetensors, runs/stage34_init_heavy.safetensors
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cliprpn_core.checkpoint import load_model, save_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/stage18_shipped.safetensors")
    a = ap.parse_args()
    light, heavy = ROOT / "runs/stage34_init_light.safetensors", ROOT / "runs/stage34_init_heavy.safetensors"
    subprocess.run([sys.executable, str(ROOT / "scripts/assemble_experts.py"), "--base", a.base, "--extract",
                    "light_streaks", "-o", str(light)], check=True)
    model = load_model(light)
    sd = model.state_dict()
    copied = 0
    for k in list(sd):
        if k.startswith("experts.1."):
            sd[k] = sd["experts.0." + k[len("experts.1."):]].clone()
            copied += 1
    model.load_state_dict(sd)  # strict: every tensor of the model, no stray key
    save_model(model, heavy)
    print(f"{light}\n{heavy} ({copied} tensors of expert 1 copied from expert 0)")


if __name__ == "__main__":
    main()
