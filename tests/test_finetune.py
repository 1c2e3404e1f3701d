"""The fine-tune the Loss-scheduled Fine-tune node runs (cliprpn_core.finetune) and the optimisation step it
shares with the Trainer (train.TrainStep)."""
from __future__ import annotations

import math

import pytest
import torch

from cliprpn_core.finetune import check_pairs, finetune, loss_curve, rgb_only
from cliprpn_core.patterns import EXPERTS
from cliprpn_core.synthesis import synthesize
from cliprpn_core.train import TrainConfig, TrainStep, cosine_lr, lr_at


def _pairs(n=2, size=32):
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(n, 3, size, size, generator=g) * 0.5 + 0.25
    clean = torch.nn.functional.avg_pool2d(clean, 3, 1, 1).contiguous()
    s = synthesize(clean, torch.Generator().manual_seed(1), regime=[EXPERTS.index("heavy_streaks")] * n)
    return s.rainy.clamp(0, 1), clean


def test_finetune_learns_and_leaves_the_loaded_model_alone(tiny_model):
    rainy, clean = _pairs(n=2, size=24)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    steps_seen = []
    with torch.inference_mode():  # ComfyUI runs nodes like this: training must still work
        res = finetune(tiny_model, rainy, clean, steps=12, lr=3e-3, schedule="charbonnier", patch=16, batch_size=2,
                           seed=0, on_step=lambda i, n: steps_seen.append((i, n)))
    assert steps_seen[0] == (1, 12) and steps_seen[-1] == (12, 12)
    h = res.history["total"]
    assert len(h) == 12 and len(res.history["charbonnier"]) == 12
    assert sum(h[-3:]) / 3 < sum(h[:3]) / 3  # it learns
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert res.model is not tiny_model and not res.model.training
    assert any(not torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), before.values()))


def test_finetune_is_deterministic(tiny_model):
    rainy, clean = _pairs(n=2, size=24)
    a = finetune(tiny_model, rainy, clean, steps=2, lr=1e-3, schedule="mix", patch=16, seed=5)
    b = finetune(tiny_model, rainy, clean, steps=2, lr=1e-3, schedule="mix", patch=16, seed=5)
    assert a.history == b.history


@pytest.mark.parametrize("schedule", ["curriculum", "dwa", "uncertainty", "equal_mix", "psnr", "psnr_mix", "psnr_dwa",
                                      "psnr_equal", "psnr_uncertainty"])
def test_finetune_schedules_run(tiny_model, schedule):
    rainy, clean = _pairs(n=1, size=24)
    res = finetune(tiny_model, rainy, clean, steps=2, lr=1e-4, schedule=schedule, patch=16)
    assert len(res.history["total"]) == 2 and all(math.isfinite(v) for v in res.history["total"])


class Cancelled(BaseException):
    """Like ComfyUI's InterruptProcessingException (a BaseException)."""


def test_finetune_cancel_aborts_without_result(tiny_model):
    rainy, clean = _pairs(n=1, size=16)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}

    def cancel_at_3(i, n):
        if i == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        finetune(tiny_model, rainy, clean, steps=50, lr=1e-3, patch=16, batch_size=1, on_step=cancel_at_3)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k])


def test_finetune_rejects_bad_arguments(tiny_model):
    rainy, clean = _pairs(n=1)
    with pytest.raises(ValueError, match="schedule"):
        finetune(tiny_model, rainy, clean, steps=1, lr=1e-4, schedule="adam")
    with pytest.raises(ValueError, match="learning rate"):
        finetune(tiny_model, rainy, clean, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="same size"):
        finetune(tiny_model, rainy, clean[..., :30], steps=1, lr=1e-4)


def test_finetune_on_a_single_16px_pair_with_a_larger_patch(tiny_model):
    """The smallest pair the node accepts, with the default 128-px patch: crops shrink to the image, no error."""
    rainy, clean = _pairs(n=1, size=16)
    res = finetune(tiny_model, rainy, clean, steps=2, lr=1e-4, patch=128, batch_size=4)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in res.history.values())
    with pytest.raises(ValueError, match="at least 16x16"):
        check_pairs(torch.rand(1, 3, 15, 15), torch.rand(1, 3, 15, 15))


def test_check_pairs():
    check_pairs(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="2 images but clean has 1"):
        check_pairs(torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="same size"):
        check_pairs(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 40))
    x = torch.rand(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_pairs(x, torch.rand(1, 3, 32, 32))


def test_rgb_only_and_loss_curve():
    gray = torch.rand(1, 1, 8, 8)
    assert torch.equal(rgb_only(gray)[:, 2], gray[:, 0]) and rgb_only(torch.rand(1, 4, 8, 8)).shape[1] == 3
    with pytest.raises(ValueError, match="5 channels"):
        rgb_only(torch.rand(1, 5, 8, 8))
    im = loss_curve({"total": [1.0, 0.5, 0.25]}, "t")
    assert im.shape[:2] == (1, 3) and float(im.min()) < 0.5 < float(im.max())


# -- the shared optimisation step -------------------------------------------------------------------

def test_cosine_lr_is_the_trainers_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, steps=100)
    for step in (0, 5, 9, 10, 50, 99, 100, 150):
        assert lr_at(step, cfg) == cosine_lr(step, 100, 1e-3, 1e-5, 10)
    assert cosine_lr(0, 10, 2.0, 0.2) == 2.0 and cosine_lr(10, 10, 2.0, 0.2) == pytest.approx(0.2)
    assert cosine_lr(5, 10, 2.0, 0.2) == pytest.approx(1.1)


def test_train_step_sets_lr_clips_and_refuses_non_finite_losses():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    step = TrainStep([w], 0.1, lambda s: 0.1 / (s + 1), grad_clip=1.0)
    step.set_lr(1)
    assert step.lr == 0.05
    gn = step((w * torch.tensor([30.0, 40.0])).sum(), lambda: "never")
    assert float(gn) == pytest.approx(50.0)  # the norm before clipping
    assert torch.allclose(w.grad, torch.tensor([0.6, 0.8]))  # clipped to norm 1
    before = w.detach().clone()
    with pytest.raises(FloatingPointError, match="loss is nan at step 7"):
        step(w.sum() * float("nan"), lambda: "loss is nan at step 7")
    assert torch.equal(w.detach(), before) and w.grad is not None  # nothing changed
    # clip_params: only those are clipped (the Trainer leaves its loss schedule's weights out)
    a, b = torch.nn.Parameter(torch.tensor([10.0])), torch.nn.Parameter(torch.tensor([10.0]))
    TrainStep([a, b], 0.1, lambda s: 0.1, grad_clip=1.0, clip_params=[a])((a * 10 + b * 10).sum(), str)
    assert math.isclose(float(a.grad), 1.0, rel_tol=1e-5) and float(b.grad) == 10.0


def test_finetune_of_network_experts_trains_only_the_routed_networks(tiny_network_model):
    net = tiny_network_model
    rainy, clean = _pairs(n=2, size=24)
    with torch.no_grad():
        routed = {str(int(e)) for e in net(rainy).routing.argmax(-1)}
    res = finetune(net, rainy, clean, steps=3, lr=3e-3, schedule="charbonnier", patch=16, batch_size=2, seed=0)
    before, after = net.state_dict(), res.model.state_dict()
    changed = {k.split(".")[1] for k in before if k.startswith("experts.") and not torch.equal(before[k], after[k])}
    assert changed == routed and len(routed) < 4  # only the networks of the experts the pairs are routed to


def test_finetune_trains_pairs_above_the_working_size_at_it(tiny_model, monkeypatch):
    """The derainer restores a large image at the working size; the fine-tune learns large pairs' rain there too."""
    from cliprpn_core import finetune as ft
    seen = []
    real = ft._crops
    monkeypatch.setattr(ft, "_crops", lambda r, c, *a: seen.append((tuple(r.shape), tuple(c.shape))) or real(r, c, *a))
    rainy, clean = _pairs(n=2, size=96)
    finetune(tiny_model, rainy, clean, steps=1, lr=1e-3, patch=16, work_side=64)
    assert seen[-1] == ((2, 3, 64, 64), (2, 3, 64, 64))
    finetune(tiny_model, rainy, clean, steps=1, lr=1e-3, patch=16, work_side=0)  # 0: full size
    assert seen[-1] == ((2, 3, 96, 96), (2, 3, 96, 96))
    finetune(tiny_model, rainy, clean, steps=1, lr=1e-3, patch=16)  # the default: not above 321 px, full size
    assert seen[-1] == ((2, 3, 96, 96), (2, 3, 96, 96))
    with pytest.raises(ValueError, match="work_side must be 0"):
        finetune(tiny_model, rainy, clean, steps=1, lr=1e-3, work_side=8)


def test_finetune_trains_the_network_the_derainer_would_use(tiny_network_model):
    """Pairs perception routes to the light network but the light verification hands over train the network that
    takes the handover (the heavy-streaks network, or the handover network of a model with one); a pair shared by
    the confirmation trains both; pairs the light network keeps train it."""
    from dataclasses import replace

    from cliprpn_core.arch import with_handover_network
    from cliprpn_core.finetune import pair_routing
    m = tiny_network_model
    with torch.no_grad():
        m.router.linear.bias.copy_(torch.tensor([9.0, -9.0, -9.0, -9.0]))  # perception routes to the light network
    rainy, clean = _pairs(n=2, size=24)

    def trained(model):
        res = finetune(model, rainy, clean, steps=2, lr=3e-3, schedule="charbonnier", patch=16, batch_size=2, seed=0)
        before, after = model.state_dict(), res.model.state_dict()
        return {k.split(".")[1] if k.startswith("experts.") else k.split(".")[0]
                for k in before if not torch.equal(before[k], after[k])}

    assert trained(m) == {"0"}  # not verified: the light network
    m.config = replace(m.config, verify_light_mask=0.99)  # the light network never finds that much rain: handed over
    assert trained(m) == {"1"}
    h = with_handover_network(m)
    routing, handover = pair_routing(h, rainy, None, "cpu")
    assert routing.sum().item() == 0 and handover.tolist() == [1.0, 1.0]
    assert trained(h) == {"handover"}
    h.config = replace(h.config, verify_heavy_mask=(0.0, 0.99))  # the handover network's mask shares them
    routing, handover = pair_routing(h, rainy, None, "cpu")
    assert ((handover > 0) & (handover < 1)).all() and torch.allclose(routing[:, 0] + handover, torch.ones(2))
    assert trained(h) == {"0", "handover"}
    # a light mask on the verification's ramp (verify_light_ramp) shares a pair as well: both networks train on it
    from cliprpn_core.inference import Derainer, DerainOptions
    d = Derainer(h, device="cpu", dtype="fp32")
    lm = float(d.derain(rainy[:1], DerainOptions(expert=0)).masks.mean())
    h.config = replace(h.config, verify_light_mask=lm - 1e-3, verify_light_ramp=lm + 1e-3, verify_heavy_mask=(0.0, 0.0))
    routing, handover = pair_routing(h, rainy[:1], None, "cpu")
    assert 0 < float(handover[0]) < 1 and float(routing[0, 0] + handover[0]) == pytest.approx(1.0, abs=1e-6)
