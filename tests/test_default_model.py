"""The shipped default model, end to end through the command line, on five Rain100L images (the
development benchmark; skipped without ../shared/data): a guard against shipping a broken, wrong or
untrained weights file. The full figures come from benchmarks/evaluate.py (model card)."""
from pathlib import Path

import numpy as np
import pytest

from cliprpn_core import default_model_path
from cliprpn_core.cli import main
from cliprpn_core.metrics import evaluate_folders

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rain100l"
NAMES = [f"{i:03d}.png" for i in range(1, 6)]


@pytest.mark.skipif(not (DATA / "rain").is_dir(), reason="../shared/data not present")
def test_shipped_model_removes_most_rain_on_rain100l_images(tmp_path):
    for sub in ("rain", "gt"):
        (tmp_path / sub).mkdir()
        for n in NAMES:
            (tmp_path / sub / n).symlink_to(DATA / sub / n)
    assert main(["derain", str(tmp_path / "rain"), "-o", str(tmp_path / "out"), "--checkpoint",
                 str(default_model_path()), "--device", "cpu"]) == 0
    inp = evaluate_folders(tmp_path / "rain", tmp_path / "gt", progress=False)["mean"]
    out = evaluate_folders(tmp_path / "out", tmp_path / "gt", progress=False, rain_dir=tmp_path / "rain")
    assert inp["psnr"] == pytest.approx(29.17, abs=0.01)  # the five inputs
    # an early model scored 34.98 dB (+5.8) and rain_left 0.30 on these five images
    assert out["mean"]["psnr"] > inp["psnr"] + 5.0
    assert out["mean"]["rain_left"] < 0.45
    assert np.isfinite([r["psnr"] for r in out["images"]]).all()
