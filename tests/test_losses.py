import pytest
import torch

from cliprpn_core.losses import (LOSSES, PRESETS, CurriculumSchedule, DWASchedule, LoadBalanceLoss, LossSchedule,
                                 MaskLoss, UncertaintySchedule, build_schedule)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_losses_reductions(name, reduction):
    torch.manual_seed(0)
    pred, tgt = torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24)
    loss = LOSSES[name](loss_weight=2.0, reduction=reduction)
    out = loss(pred, tgt)
    if reduction == "none":
        assert out.dim() >= 1
    else:
        assert out.dim() == 0 and out > 0
        same = loss(tgt, tgt)
        assert same < out  # identical images are (near) zero loss
    half = LOSSES[name](loss_weight=1.0, reduction=reduction)(pred, tgt)
    torch.testing.assert_close(out, 2 * half)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_reduction(name):
    with pytest.raises(ValueError, match="reduction"):
        LOSSES[name](reduction="avg")


def test_charbonnier_value():
    p, t = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.3)
    assert LOSSES["charbonnier"](eps=0.0)(p, t).item() == pytest.approx(0.3)


def test_mask_loss_prefers_right_mask():
    tgt = torch.zeros(1, 1, 8, 8)
    tgt[..., :4] = 1
    good = (tgt * 2 - 1) * 8
    assert MaskLoss()(good, tgt) < MaskLoss()(-good, tgt)


def test_load_balance_is_one_when_balanced():
    logits = torch.zeros(4, 4)
    assert LoadBalanceLoss()(logits, torch.arange(4)).item() == pytest.approx(1.0)
    skew = torch.tensor([[9.0, 0, 0, 0]]).repeat(4, 1)
    assert LoadBalanceLoss()(skew, torch.zeros(4, dtype=torch.long)) > 3.5


def test_fixed_schedule_sum():
    s = LossSchedule({"l1": 1.0, "ssim": 0.5})
    total = s({"l1": torch.tensor(0.2), "ssim": torch.tensor(0.4)}, 0, 10)
    assert total.item() == pytest.approx(0.4)


def test_curriculum_moves_from_start_to_end():
    s = CurriculumSchedule({"charbonnier": 1.0}, {"charbonnier": 1.0, "ssim": 0.4})
    assert s.current_weights(0, 100)["ssim"] == 0.0
    assert s.current_weights(50, 100)["ssim"] == pytest.approx(0.2)
    assert s.current_weights(100, 100)["ssim"] == pytest.approx(0.4)


def test_dwa_upweights_the_stalled_term():
    s = DWASchedule({"charbonnier": 1.0, "ssim": 1.0}, temperature=1.0, period=2)
    # charbonnier keeps falling fast, ssim stalls
    for step, (c, m) in enumerate([(1.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.5, 1.0)]):
        s.observe({"charbonnier": c, "ssim": m})
    w = s.current_weights(4, 10)
    assert w["ssim"] > 1.0 > w["charbonnier"]
    assert w["ssim"] + w["charbonnier"] == pytest.approx(2.0)
    s2 = DWASchedule({"charbonnier": 1.0, "ssim": 1.0}, temperature=1.0, period=2)
    s2.load_state(s.state())
    assert s2.current_weights(4, 10) == w


def test_uncertainty_is_learnable():
    s = UncertaintySchedule({"l1": 1.0, "ssim": 1.0})
    terms = {"l1": torch.tensor(2.0), "ssim": torch.tensor(0.1)}
    s(terms, 0, 1).backward()
    assert s.log_vars.grad is not None and s.log_vars.grad[0] < 0  # large loss -> raise its variance


def test_build_schedule_and_errors():
    for name, spec in PRESETS.items():
        assert isinstance(build_schedule(spec), LossSchedule), name
    with pytest.raises(ValueError, match="unknown loss schedule"):
        build_schedule({"type": "magic"})
    with pytest.raises(ValueError, match="unknown loss term"):
        LossSchedule({"perceptual": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        LossSchedule({"l1": -1.0})


def test_psnr_loss_is_the_psnr_deficit_per_image():
    t = torch.full((2, 3, 8, 8), 0.5)
    p = t.clone()
    p[0] += 0.01  # MSE 1e-4: PSNR 40 dB
    p[1] += 0.1  # MSE 1e-2: PSNR 20 dB
    per = LOSSES["psnr"](reduction="none")(p, t)
    assert per.shape == (2,)
    # about 50 dB (the ceiling) minus PSNR, exactly 10 log10(1 + MSE / 1e-5)
    torch.testing.assert_close(per, torch.tensor([10.414, 30.004]), atol=2e-3, rtol=0)
    assert LOSSES["psnr"]()(t, t).item() == 0.0
    assert LOSSES["psnr"](ceiling_db=60.0)(p, t).item() == pytest.approx(30.0, abs=0.05)  # mean of 20 and 40
    # gradient of -PSNR: the image with the smaller error is pushed harder per unit of error
    q = p.clone().requires_grad_(True)
    LOSSES["psnr"]()(q, t).backward()
    assert q.grad[0].abs().mean() > 5 * q.grad[1].abs().mean()
