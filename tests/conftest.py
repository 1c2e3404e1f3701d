import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def tiny_model():
    from cliprpn_core import CLIPRPN, tiny_config
    torch.manual_seed(0)
    m = CLIPRPN(tiny_config())
    # random init leaves the residual gates at zero; open them so tests see real computation
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("beta", "gamma", "gate")):
                p.normal_(0, 0.5)
    return m.eval()


@pytest.fixture
def tiny_network_model(tiny_model):
    """``tiny_model`` with every expert a whole network of its own (grown from it: the same outputs at start)."""
    from dataclasses import replace

    from cliprpn_core import CLIPRPN
    from cliprpn_core.arch import grow_from
    m = CLIPRPN(replace(tiny_model.config, expert_scope="network"))
    assert grow_from(m, tiny_model, probe_size=16) == []  # copies of the shared network, one per expert: no new block
    return m.eval()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model):
    from cliprpn_core import save_model
    p = tmp_path / "tiny.safetensors"
    save_model(tiny_model, p)
    return p
