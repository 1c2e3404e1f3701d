"""``python -m cliprpn_core.batch ...``: the same as ``cliprpn batch ...``."""
import sys

from .cli import main

sys.exit(main())
