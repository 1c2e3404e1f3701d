"""Routing by outcome (cliprpn_core.router_fit, scripts/fit_router.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliprpn_core import save_model
from cliprpn_core.arch import ExpertRouter
from cliprpn_core.checkpoint import load_model, read_metadata
from cliprpn_core.inference import Derainer, DerainOptions
from cliprpn_core.metrics import psnr_y
from cliprpn_core.patterns import PATTERN_DIM
from cliprpn_core.router_fit import Measured, fit, measure, router_logits, stats

ROOT = Path(__file__).resolve().parents[1]


def _measured(n=60, seed=0):
    """Pattern probabilities where one attribute decides which of two experts restores best (by 3 dB); the
    other two experts are always 8 dB worse."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, PATTERN_DIM, generator=g)
    best = (probs[:, 5] > 0.5).long()
    psnr = torch.full((n, 4), 22.0, dtype=torch.float64)
    psnr[:, :2] = 27.0
    psnr[torch.arange(n), best] = 30.0
    return Measured([f"p{i}" for i in range(n)], probs, psnr), best


def test_stats_counts_what_top1_routing_gets():
    psnr = torch.tensor([[30.0, 27.0], [20.0, 25.0], [31.0, 33.0]], dtype=torch.float64)
    s = stats(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), psnr)
    assert s["routed_psnr"] == pytest.approx((30 + 20 + 33) / 3, abs=1e-3)
    assert s["oracle_psnr"] == pytest.approx((30 + 25 + 33) / 3, abs=1e-3)
    assert s["lost_db"] == pytest.approx(5 / 3, abs=1e-3)
    assert s["chose_best"] == pytest.approx(2 / 3, abs=1e-3) and s["routing"] == [2, 1]


def test_fit_learns_which_expert_restores_best_and_only_moves_the_linear_correction():
    train, best = _measured()
    val, vbest = _measured(seed=1)
    router = ExpertRouter(4)
    prior = router.prior.clone()
    res = fit(router, train, steps=600, lr=0.05, pull=0.0)
    assert res["before"]["chose_best"] < 0.8  # the prior alone cannot know which attribute decides
    assert res["after"]["chose_best"] > 0.95 and res["after"]["lost_db"] < res["before"]["lost_db"]
    assert stats(router_logits(router, val.probs), val.psnr)["chose_best"] > 0.9  # and it holds on new pairs
    assert torch.equal(router.prior, prior)
    held = ExpertRouter(4)
    fit(held, train, steps=600, lr=0.05, pull=100.0)  # a strong pull keeps the router where it started
    assert held.linear.weight.abs().max() < 0.05


def test_fit_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature > 0"):
        fit(ExpertRouter(4), _measured()[0], temperature=0)


def test_measure_scores_every_expert_as_the_protocol_does(tiny_network_model):
    d = Derainer(tiny_network_model)
    g = torch.Generator().manual_seed(3)
    pairs = [(f"im{i}", torch.rand(1, 3, 24, 32, generator=g), (torch.rand(24, 32, 3, generator=g) * 255).to(
        torch.uint8).numpy()) for i in range(2)]
    m = measure(d, pairs)
    assert m.names == ["im0", "im1"] and m.psnr.shape == (2, 4) and m.probs.shape == (2, PATTERN_DIM)
    out = d.derain(pairs[1][1], DerainOptions(expert=2)).images[0]
    u8 = (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert m.psnr[1, 2].item() == pytest.approx(psnr_y(u8, pairs[1][2]), abs=1e-9)
    assert torch.allclose(m.probs[0], d.perceive(pairs[0][1])[0][0])
    with pytest.raises(ValueError, match="differ in size"):
        measure(d, [("bad", torch.rand(1, 3, 24, 32), np.zeros((20, 32, 3), np.uint8))])


def _pairs_dir(root: Path, n=6):
    rng = np.random.default_rng(0)
    for sub in ("rain", "gt"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        gt = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        rain = np.clip(gt.astype(int) + rng.integers(0, 60, (24, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(gt).save(root / "gt" / f"{i}.png")
        Image.fromarray(rain).save(root / "rain" / f"{i}.png")
    return root


def test_fit_router_script_writes_a_model_that_differs_only_in_the_router(tmp_path, tiny_network_model):
    ck = tmp_path / "net.safetensors"
    save_model(tiny_network_model, ck, extra_meta={"assembled_from": {"light_streaks": "x"}})
    pairs = _pairs_dir(tmp_path / "pairs")
    out, cache, rep = tmp_path / "fitted.safetensors", tmp_path / "m.json", tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "fit_router.py"), str(ck), "--pairs", str(pairs), "-o", str(out),
           "--measurements", str(cache), "--json", str(rep), "--holdout-every", "3", "--steps", "50", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "held-out pairs, after" in r.stdout
    report = json.loads(rep.read_text())
    assert report["fit_pairs"] == 4 and report["held_out"] == 2
    a, b = tiny_network_model.state_dict(), load_model(out).state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed <= {"router.linear.weight", "router.linear.bias"}
    meta = read_metadata(out)
    assert json.loads(meta["assembled_from"]) == {"light_streaks": "x"} and "fit_pairs" in json.loads(meta["router_fit"])
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # from the cache
    assert r2.returncode == 0 and "read 6 measured pairs" in r2.stdout
    save_model(tiny_network_model, tmp_path / "other.safetensors")  # another file: the cache does not fit it
    r3 = subprocess.run([*cmd[:2], str(tmp_path / "other.safetensors"), *cmd[3:]], capture_output=True, text=True,
                        timeout=300)
    assert r3.returncode != 0 and "measured on another checkpoint" in r3.stderr
    r4 = subprocess.run([*cmd[:5], "-o", str(ck)], capture_output=True, text=True, timeout=300)
    assert r4.returncode == 2 and "must not be the input checkpoint" in r4.stderr
