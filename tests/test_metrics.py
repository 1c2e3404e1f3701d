import numpy as np
import pytest

from cliprpn_core.metrics import evaluate_folders, psnr_y, rgb_to_y, ssim_y
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rain100l_present():
    return (DATA / "rain100l" / "rain").is_dir()


def test_rgb_to_y_matlab_values():
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], dtype=np.uint8)
    assert rgb_to_y(px).tolist() == [[16.0, 235.0, 81.0]]


def test_psnr_known_offset():
    a = np.full((32, 32, 3), 100, np.uint8)
    b = a.copy()
    b[..., 1] += 2  # G +2 -> Y + 2*128.553/255 = 1.008 -> rounds to +1 everywhere
    assert psnr_y(a, b) == pytest.approx(10 * np.log10(255 ** 2 / 1.0))
    assert psnr_y(a, a) == float("inf")


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert ssim_y(a, a) == pytest.approx(1.0)
    scores = [ssim_y(a, np.clip(a.astype(int) + rng.integers(-n, n + 1, a.shape), 0, 255).astype(np.uint8))
              for n in (5, 40, 120)]
    assert 1 > scores[0] > scores[1] > scores[2] > 0


def test_errors():
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_y(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="differ in size"):
        psnr_y(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8))


@pytest.mark.skipif(not rain100l_present(), reason="../shared/data not present")
def test_rain100l_input_vs_gt_reference():
    r = evaluate_folders(DATA / "rain100l" / "rain", DATA / "rain100l" / "gt", progress=False)
    assert len(r["images"]) == 100
    assert r["mean"]["psnr"] == pytest.approx(26.90, abs=0.005)
    assert r["mean"]["ssim"] == pytest.approx(0.838, abs=0.0005)


def test_rain_left_measures_the_share_of_rain_kept():
    from cliprpn_core.metrics import rain_left
    rng = np.random.default_rng(0)
    gt = rng.integers(40, 180, (48, 64, 3)).astype(np.uint8)
    streaks = np.zeros((48, 64, 1))
    streaks[:, ::6] = 60.0
    rain = (gt + streaks).clip(0, 255).astype(np.uint8)
    dimmed = (gt + 0.3 * streaks).round().clip(0, 255).astype(np.uint8)
    assert rain_left(gt, rain, gt) == 0.0
    assert rain_left(rain, rain, gt) == pytest.approx(1.0)
    assert rain_left(dimmed, rain, gt) == pytest.approx(0.3, abs=0.02)
    assert np.isnan(rain_left(gt, gt, gt))  # no rain to measure
    with pytest.raises(ValueError, match="differ in size"):
        rain_left(gt, rain[:10], gt)


def test_evaluate_folders_rain_left_mean_skips_rain_free_pairs(tmp_path):
    import warnings
    from PIL import Image
    rng = np.random.default_rng(1)
    gt = rng.integers(40, 180, (32, 32, 3)).astype(np.uint8)
    rainy = gt.copy()
    rainy[:, ::4] = 250
    for d in ("pred", "gt", "rain"):
        (tmp_path / d).mkdir()
    for name, rain, pred in (("a.png", rainy, rainy), ("b.png", gt, gt)):  # b: a rain-free pair
        Image.fromarray(gt).save(tmp_path / "gt" / name)
        Image.fromarray(rain).save(tmp_path / "rain" / name)
        Image.fromarray(pred).save(tmp_path / "pred" / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", progress=False, rain_dir=tmp_path / "rain")
        assert r["mean"]["rain_left"] == pytest.approx(1.0)  # a's; b has no rain to measure
        (tmp_path / "pred" / "a.png").unlink()
        (tmp_path / "gt" / "a.png").unlink()
        r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", progress=False, rain_dir=tmp_path / "rain")
    assert np.isnan(r["mean"]["rain_left"])
    assert np.isnan(r["images"][0]["rain_left"])
