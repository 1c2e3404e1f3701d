"""The core's optional tile previews (Derainer.derain / estimate_mask ``preview=``), which the ComfyUI nodes
show on the running node: each tile's call sees the image as it stands (restored tiles in, the input
elsewhere); the last one is the result; the image is only computed when asked, at the size asked."""
from __future__ import annotations

import torch

from cliprpn_core import CLIPRPN, tiny_config
from cliprpn_core.inference import ENSEMBLE_FLIPS, Derainer, DerainOptions, count_tiles


def _derainer():
    torch.manual_seed(0)
    return Derainer(CLIPRPN(tiny_config()))


def test_derain_preview_grows_tile_by_tile_and_ends_at_the_result():
    d = _derainer()
    x = torch.rand(1, 3, 70, 90)
    snaps = []
    r = d.derain(x, DerainOptions(tile=32, overlap=8), preview=lambda image: snaps.append(image()))
    assert len(snaps) == count_tiles(70, 90, 32, 8, d.multiple) > 1
    first = snaps[0]
    assert first.shape == (1, 3, 70, 90)
    assert torch.equal(first[..., 48:, 48:], x[..., 48:, 48:])  # not restored yet: the input
    assert not torch.allclose(first[..., :16, :16], x[..., :16, :16])  # the first tile is restored
    assert torch.allclose(snaps[-1], r.images, atol=1e-5)


def test_preview_is_downscaled_on_request_and_costs_nothing_unasked():
    d = _derainer()
    x = torch.rand(2, 3, 70, 90)
    calls, small = [], []
    d.derain(x, DerainOptions(tile=32, overlap=8), preview=lambda image: calls.append(1))
    d.derain(x[:1], preview=lambda image: small.append(image(30)))
    assert len(calls) == 2 * count_tiles(70, 90, 32, 8, d.multiple)
    assert small[0].shape == (1, 3, 24, 30)  # every 3rd pixel: longer side <= 30


def test_self_ensemble_previews_come_back_unflipped():
    d = _derainer()
    x = torch.rand(1, 3, 40, 56)
    snaps = []
    d.derain(x, DerainOptions(self_ensemble=True), preview=lambda image: snaps.append(image()))
    assert len(snaps) == len(ENSEMBLE_FLIPS) == 4
    for s, dims in zip(snaps, ENSEMBLE_FLIPS):  # each flip's restoration, flipped back
        assert torch.allclose(s, d.derain(x.flip(dims)).images.flip(dims), atol=1e-5), dims


def test_mask_preview_ends_at_the_mask():
    d = _derainer()
    x = torch.rand(1, 3, 70, 90)
    snaps = []
    m = d.estimate_mask(x, tile=32, overlap=8, preview=lambda image: snaps.append(image()))
    assert snaps[0].shape == (1, 1, 70, 90) and torch.allclose(snaps[-1], m, atol=1e-5)
    assert (snaps[0][..., 48:, 48:] == 0).all()  # not estimated yet
