import pytest
import torch

from cliprpn_core import Derainer
from cliprpn_core.inference import DerainOptions, check_images, tile_grid


@pytest.fixture
def derainer(tiny_model):
    return Derainer(tiny_model, device="cpu", dtype="fp32")


@pytest.mark.parametrize("hw", [(8, 8), (17, 23), (33, 9), (40, 64)])
def test_any_size_keeps_size(derainer, hw):
    x = torch.rand(2, 3, *hw)
    r = derainer.derain(x)
    assert r.images.shape == x.shape and r.masks.shape == (2, 1, *hw)
    assert 0 <= r.images.min() and r.images.max() <= 1
    assert 0 <= r.masks.min() and r.masks.max() <= 1


def test_tiled_matches_untiled(derainer):
    torch.manual_seed(1)
    x = torch.rand(1, 3, 120, 150)
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    full = derainer.derain(x, routing=r)
    tiled = derainer.derain(x, DerainOptions(tile=80, overlap=48), routing=r)
    assert (full.images - tiled.images).abs().max() < 1e-3
    assert (full.masks - tiled.masks).abs().max() < 1e-3


def test_cpu_tile_side_keeps_the_widest_activation_under_the_budget():
    from cliprpn_core import CLIPRPNConfig
    from cliprpn_core.inference import CPU_TILE_BYTES, cpu_tile_side
    cfg = CLIPRPNConfig()  # the shipped widths: 24 channels, 48 in its widest full-resolution activation
    side = cpu_tile_side(cfg)
    assert side % cfg.pad_multiple == 0
    assert side ** 2 * 48 * 4 <= CPU_TILE_BYTES < (side + cfg.pad_multiple) ** 2 * 48 * 4
    assert cpu_tile_side(cfg, itemsize=2) > side  # half-precision activations: a larger tile


def test_cpu_auto_tiling_only_for_large_images_and_matches_whole(tiny_model, monkeypatch):
    from cliprpn_core import inference
    monkeypatch.setattr(inference, "CPU_TILE_BYTES", 48 * 48 * 16 * 4)  # a 48-px tile for the tiny model
    d = Derainer(tiny_model, device="cpu", dtype="fp32")
    assert d.cpu_tile == 48
    assert d.auto_tile(None, 64, 64) is None  # under twice the tile's area: whole
    assert d.auto_tile(None, 96, 96) == 48
    assert d.auto_tile(0, 96, 96) is None and d.auto_tile(80, 96, 96) == 80  # an explicit choice is kept
    torch.manual_seed(2)
    x = torch.rand(1, 3, 96, 112)
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    calls = []
    auto = d.derain(x, routing=r, progress=lambda i, n: calls.append(n))
    whole = d.derain(x, DerainOptions(tile=0), routing=r)
    assert calls[-1] > 1  # it did tile
    assert (auto.images - whole.images).abs().max() < 1e-3


def test_no_cpu_tiling_where_freed_memory_is_reused(tiny_model, monkeypatch):
    import threading

    from cliprpn_core import cpu_memory, inference
    monkeypatch.setattr(inference, "CPU_TILE_BYTES", 48 * 48 * 16 * 4)
    d = Derainer(tiny_model, device="cpu", dtype="fp32")
    monkeypatch.setattr(cpu_memory, "_applied", True)  # as in a CLI process
    assert d.auto_tile(None, 96, 96) is None  # its main thread runs whole images
    seen = []
    t = threading.Thread(target=lambda: seen.append(d.auto_tile(None, 96, 96)))
    t.start()
    t.join()
    assert seen == [48]  # another thread (ComfyUI's worker) still tiles


@pytest.mark.parametrize("env, want", [({}, True), ({"CLIPRPN_KEEP_MALLOC": "1"}, False),
                                       ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False)])
def test_reuse_freed_memory_in_a_process_of_its_own(env, want):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cliprpn_core.cpu_memory import _glibc
    if want and _glibc() is None:
        pytest.skip("not glibc: the thresholds are left alone")
    keep = {k: v for k, v in os.environ.items() if k not in ("CLIPRPN_KEEP_MALLOC", "MALLOC_MMAP_THRESHOLD_",
                                                            "MALLOC_TRIM_THRESHOLD_")}
    code = "from cliprpn_core import cpu_memory as m; print(m.reuse_freed_memory(), m.applied())"
    out = subprocess.run([sys.executable, "-c", code], env={**keep, **env}, capture_output=True, text=True,
                         check=True, cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.split() == [str(want), str(want)]


def test_tile_grid_aligned_and_covering():
    t, ov, grid = tile_grid(112, 160, 50, 20, 16)
    assert t == 48 and ov == 32
    assert all(y % 16 == 0 and x % 16 == 0 for y, x in grid)
    cover = torch.zeros(112, 160)
    for y, x in grid:
        cover[y:y + t, x:x + t] = 1
    assert cover.all()


def test_progress_called_per_tile(derainer):
    calls = []
    derainer.derain(torch.rand(2, 3, 64, 64), DerainOptions(tile=32, overlap=8),
                    progress=lambda d, n: calls.append((d, n)))
    assert calls[-1][0] == calls[-1][1] == len(calls)
    assert len(calls) == 2 * 9


def test_per_image_routing_within_batch(derainer):
    x = torch.rand(3, 3, 24, 24)
    batch = derainer.derain(x)
    singles = [derainer.derain(x[i:i + 1]) for i in range(3)]
    for i, s in enumerate(singles):
        torch.testing.assert_close(batch.routing[i], s.routing[0])
        torch.testing.assert_close(batch.images[i], s.images[0], atol=1e-5, rtol=1e-5)
    assert batch.perceived_by == "pattern-head"


def test_gray_and_rgba(derainer):
    g = torch.rand(1, 1, 20, 20)
    assert derainer.derain(g).images.shape == (1, 1, 20, 20)
    rgba = torch.rand(1, 4, 20, 20)
    out = derainer.derain(rgba).images
    assert out.shape == (1, 4, 20, 20)
    assert torch.equal(out[:, 3], rgba[:, 3])  # alpha passes through untouched


def test_deterministic_on_cpu(derainer):
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(derainer.derain(x).images, derainer.derain(x).images)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precisions_close_to_fp32(tiny_model, dtype):
    import copy
    x = torch.rand(1, 3, 32, 32)
    r = torch.tensor([[1.0, 0, 0, 0]])
    ref = Derainer(copy.deepcopy(tiny_model), dtype="fp32").derain(x, routing=r).images
    try:
        out = Derainer(copy.deepcopy(tiny_model), dtype=dtype).derain(x, routing=r).images
    except RuntimeError as e:  # some CPU builds lack fp16 kernels
        pytest.skip(f"{dtype} not supported on this CPU build: {e}")
    assert (out - ref).abs().max() < 0.05


def test_override_and_external_mask(derainer):
    x = torch.rand(2, 3, 16, 16)
    r = derainer.derain(x, DerainOptions(expert=2))
    assert r.routing[:, 2].tolist() == [1.0, 1.0]
    m = torch.zeros(2, 16, 16)
    r2 = derainer.derain(x, mask=m)
    assert r2.images.shape == x.shape


@pytest.mark.parametrize("bad,msg", [
    (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
    (torch.rand(1, 3, 1, 1), "at least 8x8"),
    (torch.rand(1, 5, 16, 16), "5 channels"),
    (torch.rand(16, 16), r"\[B,C,H,W\]"),
    (torch.rand(0, 3, 16, 16), "empty"),
])
def test_bad_inputs_clear_errors(derainer, bad, msg):
    with pytest.raises(ValueError, match=msg):
        derainer.derain(bad)


def test_wrong_routing_shape(derainer):
    with pytest.raises(ValueError, match="one row per image"):
        derainer.derain(torch.rand(2, 3, 16, 16), routing=torch.ones(3, 4) / 4)


def test_check_images_accepts_chw():
    assert check_images(torch.rand(3, 10, 10)).shape == (1, 3, 10, 10)


def test_self_ensemble_averages_the_flipped_passes(derainer):
    torch.manual_seed(2)
    x = torch.rand(1, 3, 37, 52)  # odd size: padding must not shift the flipped passes
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    calls = []
    ens = derainer.derain(x, DerainOptions(self_ensemble=True), routing=r,
                          progress=lambda d, n: calls.append((d, n)))
    assert calls[-1] == (4, 4)
    manual = 0
    for dims in ((), (-1,), (-2,), (-2, -1)):
        xi = x.flip(dims) if dims else x
        yi = derainer.derain(xi, routing=r).images
        manual = manual + (yi.flip(dims) if dims else yi) / 4
    torch.testing.assert_close(ens.images, manual.clamp(0, 1), atol=1e-5, rtol=1e-5)
    plain = derainer.derain(x, routing=r)
    assert not torch.allclose(ens.images, plain.images)
    assert ens.images.shape == x.shape and ens.masks.shape == (1, 1, 37, 52)
    tiled = derainer.derain(x, DerainOptions(self_ensemble=True, tile=32, overlap=16), routing=r)
    assert (tiled.images - ens.images).abs().max() < 2e-3


def test_passes_option_and_model_setting(tiny_model):
    from cliprpn_core import CLIPRPN, tiny_config
    x = torch.rand(2, 3, 21, 30)
    d1 = Derainer(tiny_model, device="cpu", dtype="fp32")
    m2 = CLIPRPN(tiny_config(passes=2))
    m2.load_state_dict(tiny_model.state_dict())
    d2 = Derainer(m2, device="cpu", dtype="fp32")
    a = d1.derain(x, DerainOptions(passes=2))
    b = d2.derain(x)  # the model's own setting
    torch.testing.assert_close(a.images, b.images)
    torch.testing.assert_close(d2.derain(x, DerainOptions(passes=1)).images, d1.derain(x).images)
    assert not torch.allclose(a.images, d1.derain(x).images)
    torch.testing.assert_close(a.masks, d1.derain(x).masks)  # the first pass's mask
    with pytest.raises(ValueError, match="passes must be 1..8"):
        d1.derain(x, DerainOptions(passes=9))


# -- expert check -----------------------------------------------------------------------------

def test_check_choice_keeps_the_first_unless_clearly_less_rain():
    from cliprpn_core.inference import check_choice
    assert check_choice([0.02, 0.015], 0.6) == 0  # 0.75 of the first's rain: not enough
    assert check_choice([0.02, 0.011], 0.6) == 1  # 0.55: the runner-up
    assert check_choice([0.0, 0.0], 0.6) == 0
    assert check_choice([0.02], 0.6) == 0
    assert check_choice([0.02, 0.011, 0.006], 0.6) == 2  # each later one against the one kept so far


def test_check_candidates_from_ranking_or_weights():
    from cliprpn_core.inference import check_candidates
    routing = torch.tensor([[1.0, 0, 0, 0], [0, 0.3, 0.7, 0], [0.4, 0.6, 0, 0]])
    assert check_candidates(routing, among=None) == [[0], [2, 1], [1, 0]]  # top-1 alone: nothing to compare
    assert check_candidates(routing) == [[0], [2], [1, 0]]  # only the streak experts are compared
    ranking = torch.tensor([[3.0, 2.5, -1, 0], [0, 1, 2, 3], [1, 1, 0, 0]])
    assert check_candidates(routing, ranking, among=None) == [[0, 1], [3, 2], [0, 1]]
    assert check_candidates(routing, ranking) == [[0, 1], [3], [0, 1]]
    with pytest.raises(ValueError, match="ranking has shape"):
        check_candidates(routing, ranking[:2])


def test_check_output_is_the_chosen_single_expert(derainer, monkeypatch):
    torch.manual_seed(3)
    x = torch.rand(2, 3, 40, 56)
    ranking = torch.tensor([[2.0, 1.0, 0, 0], [1.0, 2.0, 0, 0]])
    seen = []
    real = derainer.residual_rain
    monkeypatch.setattr(derainer, "residual_rain", lambda img, *a: seen.append(real(img, *a)) or seen[-1])
    never = derainer.derain(x, DerainOptions(check=True, check_ratio=1e-9), ranking=ranking,
                            routing=torch.zeros(2, 4))
    assert len(seen) == 4 and all(float(s) > 0 for s in seen)  # two candidates per image were measured
    always = derainer.derain(x, DerainOptions(check=True, check_ratio=1e9), ranking=ranking,
                             routing=torch.zeros(2, 4))
    assert never.routing.argmax(1).tolist() == [0, 1] and always.routing.argmax(1).tolist() == [1, 0]
    one_row = derainer.derain(x, DerainOptions(check=True, check_ratio=1e9), ranking=ranking[:1],
                              routing=torch.zeros(1, 4))
    assert one_row.routing.argmax(1).tolist() == [1, 1]  # one ranking row serves the whole batch
    unchecked = derainer.derain(x, DerainOptions(check=True, check_ratio=1e9),
                                ranking=torch.tensor([[0, 0, 2.0, 1.0]] * 2), routing=torch.zeros(2, 4))
    assert len(seen) == 12 and unchecked.routing.argmax(1).tolist() == [2, 2]  # veil/drops: not checked
    for r, experts in ((never, [0, 1]), (always, [1, 0])):
        assert torch.equal(r.routing, torch.nn.functional.one_hot(torch.tensor(experts), 4).float())
        for i, e in enumerate(experts):
            single = derainer.derain(x[i:i + 1], DerainOptions(expert=e))
            assert torch.allclose(r.images[i:i + 1], single.images, atol=1e-6)
            assert torch.allclose(r.masks[i:i + 1], single.masks, atol=1e-6)


def test_check_follows_the_router_and_respects_override(derainer):
    torch.manual_seed(4)
    with torch.no_grad():  # the two streak experts ranked first, either way round
        derainer.model.router.linear.bias.copy_(torch.tensor([6.0, 6.0, -6.0, -6.0]))
    x = torch.rand(1, 3, 32, 32)
    probs, _ = derainer.perceive(x)
    logits = derainer.model.router.logits(probs)
    top2 = logits[0].argsort(descending=True)[:2].tolist()
    assert derainer.derain(x, DerainOptions(check=True, check_ratio=1e-9)).routing.argmax(1).item() == top2[0]
    assert derainer.derain(x, DerainOptions(check=True, check_ratio=1e9)).routing.argmax(1).item() == top2[1]
    manual = derainer.derain(x, DerainOptions(expert=2, check=True, check_ratio=1e9))  # a manual choice is not checked
    assert manual.routing.argmax(1).item() == 2
    with pytest.raises(ValueError, match="check_ratio"):
        derainer.derain(x, DerainOptions(check=True, check_ratio=0))


def test_check_with_self_ensemble_tiles_and_progress(derainer):
    torch.manual_seed(5)
    x = torch.rand(1, 3, 96, 112)
    calls = []
    r = derainer.derain(x, DerainOptions(check=True, check_ratio=1e9, self_ensemble=True, tile=64, overlap=16),
                        progress=lambda i, n: calls.append((i, n)))
    e = int(r.routing.argmax())
    ref = derainer.derain(x, DerainOptions(expert=e, self_ensemble=True, tile=64, overlap=16))
    assert torch.allclose(r.images, ref.images, atol=1e-6)
    total = calls[-1][1]
    assert all(n == total for _, n in calls) and calls[-1][0] == total  # one bar, ends full


# -- light routing verified by the light network's own mask --------------------------------------------------------

LIGHT_ROW = torch.tensor([[1.0, 0.0, 0.0, 0.0]])


@pytest.fixture
def verifying(tiny_network_model):
    """A whole-network-expert model whose heavy-streaks network differs from its light one, and its light network's
    mean rain mask on the test image (what the verification compares with config.verify_light_mask)."""
    m = tiny_network_model
    torch.manual_seed(11)
    with torch.no_grad():
        for p in m.experts[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = Derainer(m, device="cpu", dtype="fp32")
    x = torch.rand(2, 3, 40, 56)
    light = d.derain(x, DerainOptions(expert=0))
    return d, x, light, [float(light.masks[i].mean()) for i in range(2)]


def _set_config(d, **over):
    from dataclasses import replace
    d.model.config = replace(d.model.config, **over)


def _set_verify(d, value):
    _set_config(d, verify_light_mask=value)


def test_light_mask_floor_measures_what_the_verification_decides_on(verifying):
    """experiments/light_mask_floor.py, which shows where a light network's masks sit against the threshold, computes
    the very value the verification compares (DerainResult.light_mask), image by image."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "experiments" / "light_mask_floor.py"
    spec = importlib.util.spec_from_file_location("light_mask_floor", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    d, x, _, means = verifying
    _set_verify(d, 0.999)  # every image verified (and handed over): its light mask is recorded
    r = d.derain(x, routing=LIGHT_ROW.expand(2, -1), ranking=torch.tensor([[2.0, 1.0, 0.0, 0.0]]))
    got = tool.light_mask_means(d, x)
    assert got == pytest.approx(r.light_mask.tolist(), abs=1e-6) and got == pytest.approx(means, abs=1e-6)
    assert tool.floor3(0.0486) == 0.048 and tool.floor3(0.03) == 0.03


def test_verify_hands_an_image_with_too_little_light_rain_to_the_heavy_network(verifying):
    d, x, light, means = verifying
    heavy = d.derain(x, DerainOptions(expert=1))
    assert (light.images - heavy.images).abs().max() > 1e-3  # the two networks differ here
    ranking = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # as an Expert Router node without an override passes it
    lo, hi = sorted(means)
    _set_verify(d, (lo + hi) / 2)  # the image with the smaller light mask goes over, the other stays
    r = d.derain(x, routing=LIGHT_ROW.expand(2, -1), ranking=ranking)
    moved = [i for i in range(2) if means[i] < (lo + hi) / 2]
    assert len(moved) == 1
    assert torch.allclose(r.light_mask, torch.tensor(means), atol=1e-6)  # the value each decision was made on
    for i in range(2):
        want = heavy if i in moved else light
        assert r.routing[i].argmax().item() == (1 if i in moved else 0) and r.routing[i].sum() == 1
        assert torch.allclose(r.images[i], want.images[i], atol=1e-6)
        assert torch.allclose(r.masks[i], want.masks[i], atol=1e-6)
    # perceived and routed inside derain (the router made to pick the light network): verified the same way
    with torch.no_grad():
        d.model.router.linear.bias.copy_(torch.tensor([9.0, -9.0, -9.0, -9.0]))
    _set_verify(d, hi + 1e-3)  # both images go over
    both = d.derain(x)
    assert both.routing.argmax(1).tolist() == [1, 1] and torch.allclose(both.images, heavy.images, atol=1e-6)
    _set_verify(d, lo - 1e-3)  # both stay
    assert d.derain(x).routing.argmax(1).tolist() == [0, 0]


def test_verify_with_self_ensemble_tiles_and_one_progress_bar(verifying):
    d, x, light, means = verifying
    _set_verify(d, max(means) + 1e-3)
    calls = []
    opt = DerainOptions(self_ensemble=True, tile=32, overlap=8)
    r = d.derain(x[:1], opt, routing=LIGHT_ROW, ranking=LIGHT_ROW, progress=lambda i, n: calls.append((i, n)))
    ref = d.derain(x[:1], DerainOptions(expert=1, self_ensemble=True, tile=32, overlap=8))
    assert r.routing.argmax(1).tolist() == [1] and torch.allclose(r.images, ref.images, atol=1e-6)
    total = calls[-1][1]
    assert calls[-1][0] == total and all(i <= total for i, _ in calls)  # the bar ends full, never past it


def test_verify_leaves_manual_given_and_checked_routing_alone_and_can_be_turned_off(verifying, tiny_model):
    d, x, light, means = verifying
    _set_verify(d, max(means) + 1e-3)  # every light-routed image would go over if verified
    assert d.derain(x, DerainOptions(expert=0)).routing.argmax(1).tolist() == [0, 0]  # a manual expert
    assert d.derain(x, routing=LIGHT_ROW).routing.argmax(1).tolist() == [0, 0]  # routing given without a ranking
    off = d.derain(x, DerainOptions(verify=False), routing=LIGHT_ROW, ranking=LIGHT_ROW)
    assert off.routing.argmax(1).tolist() == [0, 0] and torch.allclose(off.images, light.images, atol=1e-6)
    assert torch.isnan(off.light_mask).all()  # not verified: no light-mask figure
    # the expert check decides by its own measure, not this one
    checked = d.derain(x, DerainOptions(check=True, check_ratio=1e-9), routing=torch.zeros(2, 4),
                       ranking=torch.tensor([[2.0, 1.0, 0.0, 0.0]]))
    assert checked.routing.argmax(1).tolist() == [0, 0]
    # a shared-network model has no light network of its own to ask: never verified
    shared = Derainer(tiny_model, device="cpu", dtype="fp32")
    _set_verify(shared, 0.99)
    assert shared.derain(x, routing=LIGHT_ROW, ranking=LIGHT_ROW).routing.argmax(1).tolist() == [0, 0]


def test_verify_light_mask_is_stored_checked_and_not_part_of_the_weights(tmp_path, tiny_network_model):
    from dataclasses import replace

    from cliprpn_core import CLIPRPNConfig, load_model, save_model
    from cliprpn_core.arch import shared_network_of
    with pytest.raises(ValueError, match="verify_light_mask"):
        CLIPRPNConfig(verify_light_mask=1.5)
    with pytest.raises(ValueError, match="verify_light_mask"):
        CLIPRPNConfig(verify_light_mask=-0.1)
    m = tiny_network_model
    cfg = replace(m.config, verify_light_mask=0.03)
    assert cfg.same_weights(m.config) and m.config.same_weights(cfg)
    m.config = cfg
    save_model(m, tmp_path / "v.safetensors")
    assert load_model(tmp_path / "v.safetensors").config.verify_light_mask == 0.03
    # one network taken out to train on its own carries no verification (it has no other network to hand over to)
    assert shared_network_of(m, 0).config.verify_light_mask == 0.0


def _set_confirm(d, lo, hi):
    _set_config(d, verify_heavy_mask=(lo, hi))


def test_handover_weight_is_a_ramp_between_lo_and_hi():
    from cliprpn_core.inference import handover_weight
    assert handover_weight(0.05, 0.1, 0.2) == 0.0 and handover_weight(0.1, 0.1, 0.2) == 0.0
    assert handover_weight(0.2, 0.1, 0.2) == 1.0 and handover_weight(0.5, 0.1, 0.2) == 1.0
    assert abs(handover_weight(0.125, 0.1, 0.2) - 0.25) < 1e-9
    assert handover_weight(0.15, 0.15, 0.15) == 1.0 and handover_weight(0.1499, 0.15, 0.15) == 0.0  # a step


def test_handover_confirmed_by_the_heavy_networks_mask(verifying):
    """With verify_heavy_mask (lo, hi) an image the light verification hands over is restored by the light network
    where the heavy network's own mean mask is at most lo, by the heavy network at hi and above, and by both,
    weighted, between; the result says which and on what figure."""
    from dataclasses import replace
    d, x, light, means = verifying
    heavy = d.derain(x, DerainOptions(expert=1))
    hm = [float(heavy.masks[i].mean()) for i in range(2)]
    _set_verify(d, max(means) + 1e-3)  # both images are handed over
    row = dict(routing=LIGHT_ROW.expand(2, -1), ranking=LIGHT_ROW)
    _set_confirm(d, max(hm) + 1e-3, max(hm) + 2e-3)  # neither finds heavy rain: both keep the light network
    r = d.derain(x, **row)
    assert r.routing.argmax(1).tolist() == [0, 0] and torch.allclose(r.images, light.images, atol=1e-6)
    assert torch.allclose(r.heavy_mask, torch.tensor(hm), atol=1e-6)  # the figure each decision was made on
    _set_confirm(d, min(hm) - 2e-3, min(hm) - 1e-3)  # both find it: handed over wholly
    r = d.derain(x, **row)
    assert r.routing.argmax(1).tolist() == [1, 1] and torch.allclose(r.images, heavy.images, atol=1e-6)
    i = hm.index(max(hm))
    lo, hi = max(hm) - 0.75 * 1e-2, max(hm) + 0.25 * 1e-2  # the heavy network's share is 0.75 for image i
    _set_confirm(d, lo, hi)
    r = d.derain(x[i:i + 1], routing=LIGHT_ROW, ranking=LIGHT_ROW)
    assert torch.allclose(r.routing[0, :2], torch.tensor([0.25, 0.75]), atol=1e-5) and r.routing[0, 2:].eq(0).all()
    want = 0.25 * light.images[i] + 0.75 * heavy.images[i]
    assert torch.allclose(r.images[0], want, atol=1e-5)
    assert torch.allclose(r.masks[0], 0.25 * light.masks[i] + 0.75 * heavy.masks[i], atol=1e-5)
    # with the self-ensemble each flip is restored by both networks and weighted the same way; one progress bar
    calls = []
    opt = DerainOptions(self_ensemble=True, tile=32, overlap=8)
    hm_tiled = float(d.derain(x[i:i + 1], DerainOptions(expert=1, tile=32, overlap=8)).masks.mean())
    _set_confirm(d, hm_tiled - 0.75 * 1e-2, hm_tiled + 0.25 * 1e-2)  # tiles change the mask a little
    r = d.derain(x[i:i + 1], opt, routing=LIGHT_ROW, ranking=LIGHT_ROW, progress=lambda k, n: calls.append((k, n)))
    se = [d.derain(x[i:i + 1], replace(opt, expert=e)) for e in (0, 1)]
    assert abs(float(r.routing[0, 1]) - 0.75) < 1e-4
    assert torch.allclose(r.images, 0.25 * se[0].images + 0.75 * se[1].images, atol=1e-5)
    assert calls[-1][0] == calls[-1][1] and all(k <= calls[-1][1] for k, _ in calls)
    # turned off with the verification; off by default (older files): handed over wholly, no heavy-mask figure
    off = d.derain(x, DerainOptions(verify=False), **row)
    assert off.routing.argmax(1).tolist() == [0, 0] and torch.isnan(off.heavy_mask).all()
    _set_confirm(d, 0.0, 0.0)
    r = d.derain(x, **row)
    assert r.routing.argmax(1).tolist() == [1, 1] and torch.isnan(r.heavy_mask).all()


def test_a_handover_network_takes_the_handovers_and_the_heavy_network_the_rest(verifying):
    """With config.handover_network the light verification's handovers (whole, shared, every flip of the self-
    ensemble) are restored by the handover network, and only they: an image routed or forced to heavy_streaks gets
    the heavy-streaks network. A handover network copied from the heavy one changes no result."""
    from dataclasses import replace

    from cliprpn_core.arch import with_handover_network
    d, x, light, means = verifying
    heavy = d.derain(x, DerainOptions(expert=1))
    heavy_se = d.derain(x, DerainOptions(expert=1, self_ensemble=True, tile=32, overlap=8))
    hm = [float(heavy.masks[i].mean()) for i in range(2)]
    h = Derainer(with_handover_network(d.model), device="cpu", dtype="fp32")
    _set_verify(h, max(means) + 1e-3)  # both images are handed over
    row = dict(routing=LIGHT_ROW.expand(2, -1), ranking=LIGHT_ROW)
    assert torch.equal(h.derain(x, **row).images, heavy.images)  # a copy of the heavy network: nothing changes
    with torch.no_grad():  # the heavy-streaks network changed: routed and forced heavy images see it, handovers not
        for p in h.model.experts[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    new_heavy = h.derain(x, DerainOptions(expert=1))
    assert (new_heavy.images - heavy.images).abs().max() > 1e-3
    r = h.derain(x, **row)  # handed over wholly (no confirmation set)
    assert r.routing.argmax(1).tolist() == [1, 1] and torch.allclose(r.images, heavy.images, atol=1e-6)
    r = h.derain(x, DerainOptions(self_ensemble=True, tile=32, overlap=8), **row)  # every flip
    assert torch.allclose(r.images, heavy_se.images, atol=1e-6)
    _set_confirm(h, min(hm) - 2e-3, min(hm) - 1e-3)  # confirmed by the handover network's mask
    r = h.derain(x, **row)
    assert torch.allclose(r.images, heavy.images, atol=1e-6) and torch.allclose(r.heavy_mask, torch.tensor(hm), atol=1e-6)
    i = hm.index(max(hm))
    _set_confirm(h, max(hm) - 0.75 * 1e-2, max(hm) + 0.25 * 1e-2)  # shared 0.25 light, 0.75 handover
    r = h.derain(x[i:i + 1], routing=LIGHT_ROW, ranking=LIGHT_ROW)
    assert torch.allclose(r.images[0], 0.25 * light.images[i] + 0.75 * heavy.images[i], atol=1e-5)
    # an image perception routes to the heavy network is that network's
    routed = h.derain(x, routing=torch.eye(4)[1:2].expand(2, -1), ranking=torch.eye(4)[1:2])
    assert torch.allclose(routed.images, new_heavy.images, atol=1e-6)
    # forced by name: every image to the handover network (never verified, whatever the routing given), the routing
    # row saying heavy streaks; in a model without one, the heavy-streaks network
    from cliprpn_core.arch import HANDOVER
    forced = h.derain(x, DerainOptions(expert=HANDOVER), routing=LIGHT_ROW.expand(2, -1), ranking=LIGHT_ROW)
    assert forced.handover and forced.routing.argmax(1).tolist() == [1, 1] and torch.isnan(forced.light_mask).all()
    assert torch.allclose(forced.images, heavy.images, atol=1e-6)
    forced_se = h.derain(x, DerainOptions(expert=HANDOVER, self_ensemble=True, tile=32, overlap=8))
    assert torch.allclose(forced_se.images, heavy_se.images, atol=1e-6)
    assert torch.equal(d.derain(x, DerainOptions(expert=HANDOVER)).images, heavy.images)
    assert not new_heavy.handover
    with pytest.raises(ValueError, match="expert must be an expert's index or 'handover'"):
        h.derain(x, DerainOptions(expert="heavy"))
    assert replace(h.model.config, handover_network=False).same_weights(h.model.config) is False


def test_verify_heavy_mask_is_stored_checked_and_not_part_of_the_weights(tmp_path, tiny_network_model):
    from dataclasses import replace

    from cliprpn_core import CLIPRPNConfig, load_model, save_model
    from cliprpn_core.arch import shared_network_of
    for bad in ((0.2, 0.1), (-0.1, 0.2), (0.1, 1.0), (0.1,)):
        with pytest.raises(ValueError, match="verify_heavy_mask"):
            CLIPRPNConfig(verify_heavy_mask=bad)
    assert CLIPRPNConfig(verify_heavy_mask=[0.1, 0.2]).verify_heavy_mask == (0.1, 0.2)  # a list, as JSON gives it
    m = tiny_network_model
    cfg = replace(m.config, verify_light_mask=0.03, verify_heavy_mask=(0.1, 0.2))
    assert cfg.same_weights(m.config) and m.config.same_weights(cfg)
    m.config = cfg
    save_model(m, tmp_path / "v.safetensors")
    assert load_model(tmp_path / "v.safetensors").config.verify_heavy_mask == (0.1, 0.2)
    assert shared_network_of(m, 0).config.verify_heavy_mask == (0.0, 0.0)


HEAVY_ROW = torch.tensor([[0.0, 1.0, 0.0, 0.0]])


def test_verify_heavy_routing_gives_an_image_with_little_heavy_rain_to_the_light_network(verifying):
    """With config.verify_heavy_routing an image routed to the heavy-streaks network alone is restored by it, and
    where that network's mean mask is below verify_heavy_mask's hi the light network restores it too, the two mixed
    with the heavy share of a confirmed handover (0 at lo, 1 at hi); the result gives the figure and the routing row
    the shares. Turned off with the verification, never applied to manual, ranking-less or checked routing, and off
    in a model that does not set it."""
    from dataclasses import replace
    d, x, light, means = verifying
    heavy = d.derain(x, DerainOptions(expert=1))
    hm = [float(heavy.masks[i].mean()) for i in range(2)]
    row = dict(routing=HEAVY_ROW.expand(2, -1), ranking=HEAVY_ROW)
    _set_config(d, verify_heavy_mask=(max(hm) + 1e-3, max(hm) + 2e-3))  # neither finds heavy rain, not yet on
    off = d.derain(x, **row)
    assert torch.allclose(off.images, heavy.images, atol=1e-6) and torch.isnan(off.heavy_mask).all()
    _set_config(d, verify_heavy_routing=True)
    r = d.derain(x, **row)  # both given to the light network
    assert r.routing.argmax(1).tolist() == [0, 0] and r.routing.sum(1).tolist() == [1.0, 1.0]
    assert torch.allclose(r.images, light.images, atol=1e-6) and torch.allclose(r.masks, light.masks, atol=1e-6)
    assert torch.allclose(r.heavy_mask, torch.tensor(hm), atol=1e-6)  # the figure each decision was made on
    assert torch.isnan(r.light_mask).all()  # light routing was not verified
    _set_config(d, verify_heavy_mask=(min(hm) - 2e-3, min(hm) - 1e-3))  # both find heavy rain: kept
    r = d.derain(x, **row)
    assert r.routing.argmax(1).tolist() == [1, 1] and torch.allclose(r.images, heavy.images, atol=1e-6)
    assert torch.allclose(r.heavy_mask, torch.tensor(hm), atol=1e-6)
    i = hm.index(max(hm))
    _set_config(d, verify_heavy_mask=(hm[i] - 0.75 * 1e-2, hm[i] + 0.25 * 1e-2))  # heavy share 0.75 for image i
    r = d.derain(x[i:i + 1], routing=HEAVY_ROW, ranking=HEAVY_ROW)
    assert torch.allclose(r.routing[0, :2], torch.tensor([0.25, 0.75]), atol=1e-5) and r.routing[0, 2:].eq(0).all()
    assert torch.allclose(r.images[0], 0.25 * light.images[i] + 0.75 * heavy.images[i], atol=1e-5)
    assert torch.allclose(r.masks[0], 0.25 * light.masks[i] + 0.75 * heavy.masks[i], atol=1e-5)
    # the self-ensemble: each flip restored by both networks, weighted the same way; one progress bar that ends full
    opt = DerainOptions(self_ensemble=True, tile=32, overlap=8)
    hm_tiled = float(d.derain(x[i:i + 1], DerainOptions(expert=1, tile=32, overlap=8)).masks.mean())
    _set_config(d, verify_heavy_mask=(hm_tiled - 0.75 * 1e-2, hm_tiled + 0.25 * 1e-2))
    calls = []
    r = d.derain(x[i:i + 1], opt, routing=HEAVY_ROW, ranking=HEAVY_ROW, progress=lambda k, n: calls.append((k, n)))
    se = [d.derain(x[i:i + 1], replace(opt, expert=e)) for e in (0, 1)]
    assert abs(float(r.routing[0, 1]) - 0.75) < 1e-4
    assert torch.allclose(r.images, 0.25 * se[0].images + 0.75 * se[1].images, atol=1e-5)
    assert calls[-1][0] == calls[-1][1] and all(k <= calls[-1][1] for k, _ in calls)
    # perceived and routed inside derain (the router made to pick the heavy network): verified the same way
    _set_config(d, verify_heavy_mask=(max(hm) + 1e-3, max(hm) + 2e-3))
    with torch.no_grad():
        d.model.router.linear.bias.copy_(torch.tensor([-9.0, 9.0, -9.0, -9.0]))
    assert d.derain(x).routing.argmax(1).tolist() == [0, 0]
    # never: turned off per call, a manual expert, routing given without a ranking, the expert check
    for kw in (dict(options=DerainOptions(verify=False), **row), dict(options=DerainOptions(expert=1)),
               dict(routing=HEAVY_ROW.expand(2, -1))):
        r = d.derain(x, **kw)
        assert r.routing.argmax(1).tolist() == [1, 1] and torch.isnan(r.heavy_mask).all(), kw
        assert torch.allclose(r.images, heavy.images, atol=1e-6)
    checked = d.derain(x, DerainOptions(check=True, check_ratio=1e-9), routing=torch.zeros(2, 4),
                       ranking=torch.tensor([[1.0, 2.0, 0.0, 0.0]]))
    assert checked.routing.argmax(1).tolist() == [1, 1] and torch.isnan(checked.heavy_mask).all()


def test_verify_heavy_routing_mixes_with_the_heavy_network_not_the_handover_network(verifying):
    """In a model with a handover network, heavy routing verified shares an image between the light network and
    the heavy-streaks network (the one perception routed it to), never the handover network."""
    from cliprpn_core.arch import with_handover_network
    d, x, light, means = verifying
    h = Derainer(with_handover_network(d.model), device="cpu", dtype="fp32")
    with torch.no_grad():  # the heavy-streaks network changed: the handover network keeps the old one
        for p in h.model.experts[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    heavy = h.derain(x, DerainOptions(expert=1))
    hm = float(heavy.masks[0].mean())
    _set_config(h, verify_heavy_mask=(hm - 0.5 * 1e-2, hm + 0.5 * 1e-2), verify_heavy_routing=True)
    r = h.derain(x[:1], routing=HEAVY_ROW, ranking=HEAVY_ROW)
    assert float(r.routing[0, 1]) == pytest.approx(0.5, abs=1e-4)
    assert torch.allclose(r.images[0], 0.5 * light.images[0] + 0.5 * heavy.images[0], atol=1e-5)


def test_verify_heavy_routing_is_stored_checked_and_not_part_of_the_weights(tmp_path, tiny_network_model, tiny_model):
    from dataclasses import replace

    from cliprpn_core import CLIPRPNConfig, load_model, save_model
    from cliprpn_core.arch import shared_network_of
    with pytest.raises(ValueError, match="verify_heavy_routing needs"):  # no heavy mask to confirm it by
        replace(tiny_network_model.config, verify_heavy_routing=True)
    with pytest.raises(ValueError, match="verify_heavy_routing needs"):  # a shared-network model
        replace(tiny_model.config, verify_heavy_mask=(0.1, 0.2), verify_heavy_routing=True)
    assert CLIPRPNConfig().verify_heavy_routing is False  # off in older files
    m = tiny_network_model
    cfg = replace(m.config, verify_heavy_mask=(0.1, 0.2), verify_heavy_routing=True)
    assert cfg.same_weights(m.config) and m.config.same_weights(cfg)
    m.config = cfg
    save_model(m, tmp_path / "v.safetensors")
    assert load_model(tmp_path / "v.safetensors").config.verify_heavy_routing is True
    assert shared_network_of(m, 0).config.verify_heavy_routing is False


def test_light_handover_share_is_a_step_or_a_ramp_above_the_threshold():
    from cliprpn_core.inference import light_handover_share as share
    assert share(0.0299, 0.03, 0.0) == 1.0 and share(0.03, 0.03, 0.0) == 0.0  # no ramp: the step of older files
    assert share(0.0299, 0.03, 0.04) == 1.0 and share(0.03, 0.03, 0.04) == 1.0  # continuous at the threshold
    assert share(0.0375, 0.03, 0.04) == pytest.approx(0.25) and share(0.04, 0.03, 0.04) == 0.0
    assert share(0.2, 0.03, 0.04) == 0.0


def test_verify_light_ramp_shares_an_image_near_the_threshold(verifying):
    """With verify_light_ramp an image routed to the light network whose light mask lies between verify_light_mask
    and the ramp's end is shared: the handover's share falls linearly with the light mask (times the heavy network's
    confirmation where verify_heavy_mask is set), so a small move of the light mask moves the restoration a little;
    at or above the ramp's end the image is kept as without it."""
    d, x, light, means = verifying
    heavy = d.derain(x, DerainOptions(expert=1))
    hm = [float(heavy.masks[i].mean()) for i in range(2)]
    row = dict(routing=LIGHT_ROW.expand(2, -1), ranking=LIGHT_ROW)
    i = 0
    a = means[i] - 0.25 * 1e-2  # image i's light mask sits a quarter of the way up a ramp of 0.01: share 0.75
    _set_config(d, verify_light_mask=a, verify_light_ramp=a + 1e-2, verify_heavy_mask=(0.0, 0.0))
    r = d.derain(x[i:i + 1], routing=LIGHT_ROW, ranking=LIGHT_ROW)
    assert torch.allclose(r.routing[0, :2], torch.tensor([0.25, 0.75]), atol=1e-4) and r.routing[0, 2:].eq(0).all()
    assert torch.allclose(r.images[0], 0.25 * light.images[i] + 0.75 * heavy.images[i], atol=1e-5)
    assert torch.isnan(r.heavy_mask).all()  # no confirmation set: no heavy-mask figure
    # the share moves with the light mask: a threshold a little higher gives a little more to the handover
    _set_config(d, verify_light_mask=a + 1e-3, verify_light_ramp=a + 1e-2 + 1e-3)
    r2 = d.derain(x[i:i + 1], routing=LIGHT_ROW, ranking=LIGHT_ROW)
    assert float(r2.routing[0, 1]) == pytest.approx(0.85, abs=1e-4)
    # times the heavy network's confirmation: half of it here
    _set_config(d, verify_light_mask=a, verify_light_ramp=a + 1e-2, verify_heavy_mask=(hm[i] - 1e-2, hm[i] + 1e-2))
    r = d.derain(x[i:i + 1], routing=LIGHT_ROW, ranking=LIGHT_ROW)
    assert float(r.routing[0, 1]) == pytest.approx(0.75 * 0.5, abs=1e-4)
    assert float(r.heavy_mask[0]) == pytest.approx(hm[i], abs=1e-6)
    # at or above the ramp's end: kept, as without the ramp (and not verified further)
    _set_config(d, verify_light_mask=min(means) - 2e-3, verify_light_ramp=min(means) - 1e-3)
    r = d.derain(x, **row)
    assert r.routing.argmax(1).tolist() == [0, 0] and torch.allclose(r.images, light.images, atol=1e-6)
    assert torch.isnan(r.heavy_mask).all()
    # turned off with the verification
    _set_config(d, verify_light_mask=a, verify_light_ramp=a + 1e-2)
    off = d.derain(x[i:i + 1], DerainOptions(verify=False), routing=LIGHT_ROW, ranking=LIGHT_ROW)
    assert off.routing.argmax(1).tolist() == [0] and torch.allclose(off.images[0], light.images[i], atol=1e-6)


def test_verify_light_ramp_is_stored_checked_and_not_part_of_the_weights(tmp_path, tiny_network_model):
    from dataclasses import replace

    from cliprpn_core import CLIPRPNConfig, load_model, save_model
    from cliprpn_core.arch import shared_network_of
    for bad in (dict(verify_light_ramp=0.04), dict(verify_light_mask=0.03, verify_light_ramp=0.03),
                dict(verify_light_mask=0.03, verify_light_ramp=0.02), dict(verify_light_mask=0.03, verify_light_ramp=1.0)):
        with pytest.raises(ValueError, match="verify_light_ramp"):
            CLIPRPNConfig(**bad)
    m = tiny_network_model
    cfg = replace(m.config, verify_light_mask=0.03, verify_light_ramp=0.04)
    assert cfg.same_weights(m.config) and m.config.same_weights(cfg)
    m.config = cfg
    save_model(m, tmp_path / "v.safetensors")
    assert load_model(tmp_path / "v.safetensors").config.verify_light_ramp == 0.04
    assert shared_network_of(m, 0).config.verify_light_ramp == 0.0


# -- options and the dtype policy -------------------------------------------------------------------------------

def test_derain_options_carry_every_setting(derainer):
    from cliprpn_core.inference import CHECK_RATIO, DEFAULT_OVERLAP
    from cliprpn_core.inference import WORK_SIDE
    opt = DerainOptions()
    assert (opt.top_k, opt.expert, opt.tile, opt.overlap, opt.passes, opt.check, opt.check_ratio, opt.work_side,
            opt.verify) == (1, None, None, DEFAULT_OVERLAP, None, False, CHECK_RATIO, WORK_SIDE, True)
    x = torch.rand(1, 3, 40, 48)
    a = derainer.derain(x, DerainOptions(expert=1, tile=32, overlap=8))
    assert a.routing[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(TypeError):  # settings travel in DerainOptions only
        derainer.derain(x, tile=32)
    with pytest.raises(ValueError, match="passes must be"):
        DerainOptions(passes=0).checked()
    assert DerainOptions(passes=2).checked().passes == 2
    with pytest.raises(ValueError, match="passes must be"):  # checked before any work
        derainer.derain(torch.rand(1, 3, 2, 2), DerainOptions(passes=9))


def test_one_dtype_policy():
    from cliprpn_core.inference import resolve_dtype
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cpu, lambda dt: True) == torch.float32  # never below fp32 on the CPU
    assert resolve_dtype("auto", cuda, lambda dt: True) == torch.bfloat16
    assert resolve_dtype("auto", cuda, lambda dt: dt == torch.float16) == torch.float16
    assert resolve_dtype("auto", cuda, lambda dt: False) == torch.float32
    assert resolve_dtype("auto", mps, lambda dt: True) == torch.float16  # no bf16 on MPS
    assert resolve_dtype("auto", mps) == torch.float32  # torch alone vouches for nothing below fp32 there
    assert resolve_dtype("fp16", cpu) == torch.float16 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="MPS"):
        resolve_dtype("bf16", mps)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8", cpu)


def test_work_size_brings_the_shorter_side_down_to_the_working_size():
    from cliprpn_core.inference import WORK_SIDE, check_work_side, work_size
    assert WORK_SIDE == 321  # the training photos' shorter side (481 x 321)
    assert work_size(321, 481, 321) is None and work_size(200, 5000, 321) is None  # not above it: full size
    assert work_size(642, 962, 321) == (321, 481) and work_size(3000, 4000, 321) == (321, 428)
    assert work_size(4000, 3000, 321) == (428, 321) and work_size(3000, 4000, 0) is None  # 0: full size
    for bad in (10, -1, 1.5, True, "321"):
        with pytest.raises(ValueError, match="work_side must be 0"):
            check_work_side(bad)
    with pytest.raises(ValueError, match="work_side must be 0"):  # checked before any work
        DerainOptions(work_side=20).checked()


def _fake_restore(derainer, monkeypatch, rain):
    """The restoration replaced by one that takes a uniform ``rain`` off the image; records the sizes it saw."""
    seen = []

    def restore(t, r, m, passes=None):
        seen.append(tuple(t.shape[-2:]))
        return (t[:, :3].float() - rain).clamp(0, 1), torch.full_like(t[:, :1].float(), 0.25)
    monkeypatch.setattr(derainer, "_restore", restore)
    return seen


def test_work_side_restores_at_the_working_size_and_keeps_the_full_size_detail(derainer, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 96, 150, generator=g) * 0.8 + 0.1  # fine full-size detail everywhere
    seen = _fake_restore(derainer, monkeypatch, 0.0)
    r = derainer.derain(x, DerainOptions(work_side=64))
    assert r.images.shape == x.shape and r.masks.shape == (2, 1, 96, 150)
    assert set(seen) == {(64, 100)}  # restored at the working size (150 x 64 / 96 = 100 wide)
    assert torch.equal(r.images, x)  # nothing removed at the working size: the full-size image comes back as it was
    assert torch.allclose(r.masks, torch.full_like(r.masks, 0.25))
    seen = _fake_restore(derainer, monkeypatch, 0.05)  # a uniform rain of 0.05 removed at the working size ...
    r = derainer.derain(x, DerainOptions(work_side=64))
    assert (r.images - (x - 0.05)).abs().max() < 1e-5  # ... is removed from the full-size image
    full = derainer.derain(x, DerainOptions(work_side=0))
    assert seen[-1] == (96, 152) and (full.images - (x - 0.05)).abs().max() < 1e-6  # 0: restored at full size


def test_work_side_leaves_images_at_or_below_it_alone_and_keeps_alpha(derainer):
    torch.manual_seed(3)
    x = torch.rand(1, 4, 64, 90)
    a, b = derainer.derain(x, DerainOptions(work_side=64)), derainer.derain(x, DerainOptions(work_side=0))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)  # not above the working size
    big = torch.rand(1, 4, 130, 170)
    r = derainer.derain(big, DerainOptions(work_side=64))
    assert r.images.shape == big.shape and torch.equal(r.images[:, 3], big[:, 3])  # alpha passes through
    gray = derainer.derain(torch.rand(2, 1, 130, 170), DerainOptions(work_side=64))
    assert gray.images.shape == (2, 1, 130, 170) and gray.routing.shape == (2, 4)
    m = derainer.estimate_mask(big, work_side=64)
    assert m.shape == (1, 1, 130, 170) and 0 <= m.min() and m.max() <= 1
    assert torch.equal(derainer.estimate_mask(x, work_side=64), derainer.estimate_mask(x, work_side=0))


def test_a_large_image_is_perceived_at_the_working_size_as_derain_perceives_it(derainer):
    from cliprpn_core.inference import resize
    torch.manual_seed(4)
    big = torch.rand(2, 3, 130, 170)
    small = resize(big, (64, 84))
    assert torch.equal(derainer.perceive(big, work_side=64)[0], derainer.perceive(small, work_side=64)[0])
    derained = derainer.derain(big, DerainOptions(work_side=64))
    assert torch.equal(derained.pattern, derainer.perceive(big, work_side=64)[0])
    assert not torch.equal(derainer.perceive(big, work_side=0)[0], derainer.perceive(small)[0])  # 0: the full image
