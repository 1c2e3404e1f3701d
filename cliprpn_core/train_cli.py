"""`python -m cliprpn_core.train_cli CONFIG.toml key=value ...` (same as `cliprpn train`)."""
import sys

from .train import TrainConfig, train

if __name__ == "__main__":
    args = sys.argv[1:]
    path = args[0] if args and not "=" in args[0] else None
    train(TrainConfig.from_toml(path, [a for a in args if a != path]))
