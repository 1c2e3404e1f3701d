"""`python -m cliprpn_core.train_cli CONFIG.toml key=value ...` (same as `cliprpn train`)."""
import sys

from .cpu_memory import reuse_freed_memory
from .train import TrainConfig, train

if __name__ == "__main__":
    reuse_freed_memory()  # its own process: keep freed memory for reuse (about 13 % more steps per second on CPU)
    args = sys.argv[1:]
    path = args[0] if args and not "=" in args[0] else None
    train(TrainConfig.from_toml(path, [a for a in args if a != path]))
