import pytest
import torch

from cliprpn_core.data import orientation_class
from cliprpn_core.patterns import ATTRIBUTE_NAMES, EXPERTS
from cliprpn_core.synthesis import STYLES, line_kernels, streak_layer, synthesize


def _clean(b=4, s=64):
    torch.manual_seed(0)
    return torch.rand(b, 3, s, s) * 0.5 + 0.2


@pytest.mark.parametrize("style", STYLES)
def test_seeded_and_deterministic(style):
    c = _clean()
    a = synthesize(c, torch.Generator().manual_seed(3), style=style)
    b = synthesize(c, torch.Generator().manual_seed(3), style=style)
    assert torch.equal(a.rainy, b.rainy) and torch.equal(a.labels, b.labels)
    d = synthesize(c, torch.Generator().manual_seed(4), style=style)
    assert not torch.equal(a.rainy, d.rainy)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("regime", range(len(EXPERTS)))
def test_regimes_shapes_ranges_labels(regime, style):
    c = _clean()
    s = synthesize(c, torch.Generator().manual_seed(0), regime=[regime] * 4, style=style)
    assert s.rainy.shape == c.shape and s.mask.shape == (4, 1, 64, 64)
    assert 0 <= s.rainy.min() and s.rainy.max() <= 1 and 0 <= s.mask.min() and s.mask.max() <= 1
    assert s.labels.shape == (4, len(ATTRIBUTE_NAMES))
    assert (s.expert == regime).all()
    assert (s.rainy - c).abs().mean() > 0.003  # rain was added
    if regime == 2:
        assert (s.labels[:, 3] == 2).all()  # raindrops form
    if regime == 3:
        assert (s.labels[:, 3] == 3).all()


def test_heavy_is_heavier_than_light():
    c = _clean(8)
    g = torch.Generator().manual_seed(0)
    light = synthesize(c, g, regime=[0] * 8)
    heavy = synthesize(c, g, regime=[1] * 8)
    assert (heavy.rainy - c).mean() > 2 * (light.rainy - c).mean()


def test_line_kernel_geometry():
    k = line_kernels([21], [0.0], [0.5], size=25)[0, 0]
    assert k.sum().item() == pytest.approx(1.0, abs=1e-5)
    cols = k.sum(0)
    assert cols.argmax() == 12 and cols[12] > 2 * cols[11] and cols[11] == pytest.approx(cols[13])  # vertical, centred
    assert int((k.sum(1) > 0).sum()) == 21  # 21 px long


@pytest.mark.parametrize("angle,label", [(-25.0, 1), (0.0, 0), (25.0, 2)])
def test_orientation_labels_agree_with_structure_tensor(angle, label):
    g = torch.Generator().manual_seed(0)
    full = lambda v: torch.full((2,), float(v))  # noqa: E731
    s = streak_layer(2, 96, 96, full(0.005), full(30), full(angle), full(0.5), full(0.8), g, "cpu")
    assert orientation_class(s).tolist() == [label, label]


def test_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        synthesize(torch.rand(1, 1, 32, 32), torch.Generator())


def test_tapered_kernel_fades_at_the_ends():
    flat = line_kernels([31], [0.0], [0.5], size=35)[0, 0]
    hann = line_kernels([31], [0.0], [0.5], size=35, taper=[1.0])[0, 0]
    assert hann.sum().item() == pytest.approx(1.0, abs=1e-5)
    rows_f, rows_h = flat.sum(1), hann.sum(1)
    mid, end = 17, 17 - 14
    assert rows_f[end] == pytest.approx(rows_f[mid].item(), rel=1e-4)  # flat profile: even along the streak
    assert rows_h[mid] > 10 * rows_h[end]  # Hann profile: bright middle, faint ends
    half = line_kernels([31], [0.0], [0.5], size=35, taper=[0.5])[0, 0].sum(1)
    assert rows_h[end] < half[end] < rows_f[end]


def test_light_rain_matches_the_calibration_band():
    """Light synthetic streaks were calibrated to the Rain200L training layers (mean of rain - clean
    ~0.02, about 14 % of pixels above 0.05): a regression guard, wide enough for other seeds."""
    c = torch.full((8, 3, 128, 128), 0.3)
    s = synthesize(c, torch.Generator().manual_seed(0), regime=[0] * 8, style="calibrated")
    d = (s.rainy - c).mean(1)
    assert 0.008 < d.mean() < 0.045
    assert 0.04 < (d > 0.05).float().mean() < 0.3
    classic = (synthesize(c, torch.Generator().manual_seed(0), regime=[0] * 8).rainy - c).mean(1)
    assert classic.mean() > d.mean()  # the classic style is brighter
    with pytest.raises(ValueError, match="unknown synthesis style"):
        synthesize(c, torch.Generator(), style="photoshop")


def test_rotate_center_turns_streaks_and_keeps_the_centre():
    from cliprpn_core.data import rotate_center
    g = torch.Generator().manual_seed(0)
    full = lambda v: torch.full((2,), float(v))  # noqa: E731
    s = streak_layer(2, 184, 184, full(0.005), full(30), full(0.0), full(0.5), full(0.8), g, "cpu")
    same = rotate_center(s, torch.zeros(2), 128)
    assert same.shape == (2, 1, 128, 128)
    assert torch.allclose(same, s[..., 28:156, 28:156], atol=1e-4)
    assert orientation_class(rotate_center(s, torch.tensor([20.0, -20.0]), 128)).tolist() == [2, 1]


def test_noise_streaks_follow_threshold_and_angle():
    from cliprpn_core.synthesis import noise_streak_layer
    full = lambda v: torch.full((2,), float(v))  # noqa: E731

    def layer(thr, angle, seed=0):
        g = torch.Generator().manual_seed(seed)
        return noise_streak_layer(2, 96, 96, full(thr), full(1.5), full(40), full(angle), full(0.6), full(0.8), g, "cpu")

    sparse, dense = layer(1.6, 0.0), layer(0.6, 0.0)
    assert 0 <= sparse.min() and dense.max() <= 0.8 + 1e-6
    cov = lambda s: (s > 0.05).float().mean().item()  # noqa: E731
    assert cov(dense) > 2 * cov(sparse) > 0
    # a unit-variance field: coverage ~ the Gaussian tail above the threshold (+ a little of the ramp)
    assert 0.2 < cov(dense) < 0.35 and 0.03 < cov(sparse) < 0.08
    assert torch.equal(layer(1.0, 0.0, seed=3), layer(1.0, 0.0, seed=3))
    for angle, label in [(-25.0, 1), (0.0, 0), (25.0, 2)]:
        assert orientation_class(layer(1.0, angle)).tolist() == [label, label]


def test_downpour_renders_heavy_images_only_and_labels_them_dense_heavy_wide():
    c = _clean(6)
    regime = [0, 1, 2, 3, 1, 0]
    classic = synthesize(c, torch.Generator().manual_seed(2), regime=regime)
    dp = synthesize(c, torch.Generator().manual_seed(2), regime=regime, style="downpour")
    other = [0, 2, 3, 5]
    assert torch.equal(dp.rainy[other], classic.rainy[other])  # the classic draws come first, unchanged
    assert torch.equal(dp.labels[other], classic.labels[other])
    heavy = [1, 4]
    assert not torch.allclose(dp.rainy[heavy], classic.rainy[heavy])
    assert dp.labels[heavy][:, [0, 2, 3]].tolist() == [[2, 2, 1]] * 2  # dense, heavy, wide streaks
    assert (dp.expert[heavy] == 1).all()


def test_mixed_style_renders_some_heavy_images_as_downpours_and_keeps_the_rest_classic():
    c = _clean(16)
    regime = [1] * 12 + [0, 2, 3, 0]
    classic = synthesize(c, torch.Generator().manual_seed(5), regime=regime)
    mixed = synthesize(c, torch.Generator().manual_seed(5), regime=regime, style="mixed")
    same = [i for i in range(16) if torch.equal(mixed.rainy[i], classic.rainy[i])]
    assert set(range(12, 16)) <= set(same)  # light, drops, veil: the classic draws, unchanged
    poured = [i for i in range(12) if i not in same]
    assert 0 < len(poured) < 12  # about half of the heavy images (12 draws at 1/2: both kinds all but surely)
    assert mixed.labels[poured][:, [0, 2, 3]].tolist() == [[2, 2, 1]] * len(poured)
    again = synthesize(c, torch.Generator().manual_seed(5), regime=regime, style="mixed")
    assert torch.equal(again.rainy, mixed.rainy)  # seeded: the same draw every time


def test_downpour_has_defocused_streaks_and_an_uneven_veil():
    from cliprpn_core.synthesis import downpour
    c = torch.full((4, 3, 128, 128), 0.2)
    rainy, S, t0, _ = downpour(c, torch.Generator().manual_seed(0))
    assert rainy.shape == c.shape and S.shape == (4, 1, 128, 128)
    assert ((t0 >= 0.65) & (t0 <= 0.95)).all()
    d = (rainy - c).mean(1)  # a flat dark background: rain and veil lighten it
    assert (d.mean((1, 2)) > 0.02).all()

    # the transmission map varies smoothly over the image: a few cells of noise, no pixel noise
    from cliprpn_core.synthesis import _smooth_field
    f = _smooth_field(4, 128, 128, torch.Generator().manual_seed(0), "cpu")
    assert f.abs().max() <= 1 and (f.flatten(1).std(1) > 0.1).all()
    assert (f[..., 1:, :] - f[..., :-1, :]).abs().max() < 0.1  # smooth between neighbours
