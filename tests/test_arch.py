from pathlib import Path

import pytest
import torch

from cliprpn_core import CLIPRPN, CLIPRPNConfig, tiny_config
from cliprpn_core.arch import MaskGuidedCrossAttention, pattern_probs, route
from cliprpn_core.patterns import NUM_CLASSES, PATTERN_DIM


def test_forward_shapes(tiny_model):
    x = torch.rand(2, 3, 32, 48)
    out = tiny_model(x)
    assert out.image.shape == x.shape
    assert out.mask_logits.shape == (2, 1, 32, 48)
    assert out.routing.shape == (2, tiny_model.config.num_experts)
    assert out.pattern_logits.shape == (2, PATTERN_DIM)


def test_pattern_probs_sum_to_one_per_attribute():
    p = pattern_probs(torch.randn(3, PATTERN_DIM))
    for chunk in p.split(list(NUM_CLASSES), -1):
        torch.testing.assert_close(chunk.sum(-1), torch.ones(3))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_top_k(k):
    w = route(torch.randn(5, 4), top_k=k)
    assert ((w > 0).sum(1) == k).all()
    torch.testing.assert_close(w.sum(1), torch.ones(5))


def test_route_temperature_and_override():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sharp = route(logits, top_k=2, temperature=0.1)
    soft = route(logits, top_k=2, temperature=10.0)
    assert sharp[0, 0] > soft[0, 0] > 0.5
    w = route(logits, override=3)
    assert w.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="out of range"):
        route(logits, override=7)
    with pytest.raises(ValueError, match="temperature"):
        route(logits, temperature=0)


def test_experts_not_routed_are_not_executed(tiny_model):
    calls = [0] * len(tiny_model.experts)
    for i, e in enumerate(tiny_model.experts):
        e.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + a[0].shape[0]))
    x = torch.rand(3, 3, 16, 16)
    routing = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0]])
    tiny_model.restore(x, routing)
    assert calls == [2, 0, 1, 0]  # expert 0 saw two images, expert 2 one, the others none


def test_per_image_routing_in_batch_matches_single(tiny_model):
    x = torch.rand(2, 3, 16, 16)
    routing = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    both = tiny_model.restore(x, routing)[0]
    one = tiny_model.restore(x[1:], routing[1:])[0]
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)


def test_mgca_is_local_so_cost_is_linear():
    """A change far away (beyond the attention window) must not alter a pixel's output:
    no HW x HW attention anywhere."""
    torch.manual_seed(0)
    m = MaskGuidedCrossAttention(8, heads=2, cell=2, window=3)
    with torch.no_grad():
        m.gate.fill_(1.0)
    x = torch.randn(1, 8, 32, 32)
    mask = torch.rand(1, 1, 32, 32)
    y1 = m(x, mask)
    x2 = x.clone()
    x2[..., 24:, 24:] += 5.0
    y2 = m(x2, mask)
    assert torch.equal(y1[..., :8, :8], y2[..., :8, :8])
    assert not torch.equal(y1[..., 24:, 24:], y2[..., 24:, 24:])


def test_mgca_gated_by_mask():
    m = MaskGuidedCrossAttention(8, heads=2, cell=2, window=3)
    with torch.no_grad():
        m.gate.fill_(1.0)
    x = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(m(x, torch.zeros(1, 1, 8, 8)), x)  # clean everywhere: unchanged
    assert not torch.allclose(m(x, torch.ones(1, 1, 8, 8)), x)


def test_config_validation_and_json_roundtrip():
    c = tiny_config()
    assert CLIPRPNConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="enc_blocks"):
        CLIPRPNConfig(widths=(8, 16, 32), enc_blocks=(1,), dec_blocks=(1,))
    with pytest.raises(ValueError, match="unknown config keys"):
        CLIPRPNConfig.from_dict({"widths": [8, 16], "bogus": 1})


def test_default_config_builds():
    m = CLIPRPN()
    n = sum(p.numel() for p in m.parameters())
    assert 0.5e6 < n < 3e6
    assert m.config.pad_multiple == 16


def test_passes_restore_the_previous_output_again(tiny_model):
    x = torch.rand(2, 3, 16, 16)
    r = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    one, ml1, _ = tiny_model.restore(x, r)
    two, ml2, _ = tiny_model.restore(x, r, passes=2)
    torch.testing.assert_close(two, tiny_model.restore(one.clamp(0, 1), r)[0])
    torch.testing.assert_close(ml2, ml1)  # the masks are the first pass's: the rain of the input
    out = tiny_model(x, routing=r, passes=3)
    assert len(out.pass_images) == 2
    torch.testing.assert_close(out.pass_images[0], one)
    assert tiny_model(x, routing=r).pass_images == []
    with pytest.raises(ValueError, match="passes"):
        tiny_model.restore(x, r, passes=0)


def test_passes_config_default_validation_and_same_weights():
    assert CLIPRPNConfig().passes == 1
    assert CLIPRPNConfig.from_dict({}).passes == 1  # checkpoints written before the option existed
    with pytest.raises(ValueError, match="passes"):
        tiny_config(passes=0)
    a, b = tiny_config(), tiny_config(passes=3)
    assert a != b and a.same_weights(b) and b.same_weights(a)
    assert not a.same_weights(tiny_config(widths=(8, 24)))
    m = CLIPRPN(tiny_config(passes=2))
    assert set(m.state_dict()) == set(CLIPRPN(a).state_dict())


def test_head_views_grid_and_when_the_whole_image_is_shown():
    from cliprpn_core.arch import head_views
    assert head_views(torch.rand(1, 3, 40, 60), 0) is None  # 0: the whole image (older models)
    assert head_views(torch.rand(1, 3, 32, 32), 32) is None  # a training-sized patch: itself
    assert head_views(torch.rand(1, 3, 20, 90), 32) is None  # thinner than a crop: the whole image
    x = torch.rand(2, 3, 70, 100)
    crops, n = head_views(x, 32)
    assert n == 3 * 4 and crops.shape == (2 * 12, 3, 32, 32)
    # from edge to edge: the first crop is the top-left corner, the last the bottom-right one, per image
    assert torch.equal(crops[0], x[0, :, :32, :32]) and torch.equal(crops[11], x[0, :, -32:, -32:])
    assert torch.equal(crops[12], x[1, :, :32, :32])
    big, n = head_views(torch.rand(1, 3, 400, 300), 32, short=96)  # shorter side above 96: downscaled to 96 x 128 first
    assert n == 4 * 3 and big.shape == (12, 3, 32, 32)
    assert head_views(torch.rand(1, 3, 1000, 1000), 32, short=96)[1] == 9
    assert head_views(torch.rand(1, 3, 96, 500), 32, short=96)[1] == 3 * 4  # not downscaled: at most 4 along an axis
    assert head_views(torch.rand(1, 3, 100, 100), 32, short=16)[1] == 1  # never below one crop


def test_head_views_show_a_large_photo_at_the_training_photos_scale():
    """The shipped view (128-px crops): an image of the training photos' size (481 x 321) is cut as it is; a photo
    three times as large is first brought down to that size, so its crops show the same scene at the same scale."""
    import torch.nn.functional as F
    from cliprpn_core.arch import head_views
    g = torch.Generator().manual_seed(0)
    scene = torch.rand(1, 3, 12, 17, generator=g)  # a smooth scene, drawn at 481 x 321 and at three times that
    x, large = (F.interpolate(scene, size=(321 * k, 481 * k), mode="bilinear", align_corners=True) for k in (1, 3))
    native, n = head_views(x, 128)
    assert n == 3 * 4 and torch.equal(native[0], x[0, :, :128, :128])  # not rescaled
    seen, m = head_views(large, 128)
    assert m == n and (seen - native).abs().mean() < 0.005  # the same crops of the same scene
    assert (head_views(large, 128, short=384)[0] - native).abs().mean() > 0.05  # brought to 384 px: a closer view


def test_perceive_with_head_view_averages_the_crops_probabilities(tiny_model):
    from dataclasses import replace

    from cliprpn_core.arch import head_views
    m = tiny_model.eval()
    x = torch.rand(3, 3, 72, 100)  # 12 crops each: 36, run in chunks
    with torch.no_grad():
        whole = m.perceive(x)
        m.config = replace(m.config, head_view=32)
        viewed = pattern_probs(m.perceive(x))
        crops, n = head_views(x, 32)
        want = pattern_probs(m.pattern_head(crops)).view(3, n, -1).mean(1)
        torch.testing.assert_close(viewed, want)
        assert not torch.allclose(viewed, pattern_probs(whole))
        patch = torch.rand(3, 3, 32, 32)  # what training shows the head: unchanged by the view
        torch.testing.assert_close(m.perceive(patch), m.pattern_head(patch))
        assert m(x).routing.shape == (3, m.config.num_experts)


def test_head_view_config_default_validation_and_checkpoint(tmp_path, tiny_model):
    import subprocess
    import sys

    from cliprpn_core import load_model, save_model
    from cliprpn_core.arch import network_experts_from
    assert CLIPRPNConfig.from_dict({}).head_view == 0  # checkpoints written before the option: the whole image
    with pytest.raises(ValueError, match="head_view"):
        tiny_config(head_view=-1)
    assert tiny_config().same_weights(tiny_config(head_view=32))  # no tensor depends on it
    shipped_kind = network_experts_from([tiny_model] * 4, perception=tiny_model)  # whole-network experts
    save_model(shipped_kind, tmp_path / "m.safetensors")
    script = Path(__file__).resolve().parents[1] / "scripts" / "assemble_experts.py"
    out = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "m.safetensors"), "--head-view", "32",
                          "-o", str(tmp_path / "v.safetensors")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    v, m = load_model(tmp_path / "v.safetensors"), load_model(tmp_path / "m.safetensors")
    assert v.config.head_view == 32 and m.config.head_view == 0
    for (k, a), (k2, b) in zip(sorted(v.state_dict().items()), sorted(m.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    bad = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "m.safetensors"), "--head-view", "-5",
                          "-o", str(tmp_path / "b.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and "head_view" in bad.stderr and not (tmp_path / "b.safetensors").exists()


def test_replacing_an_expert_by_a_grown_network_keeps_the_models_head_view(tiny_model):
    from dataclasses import replace

    from cliprpn_core.arch import network_experts_from, replace_network_experts
    base = network_experts_from([tiny_model] * 4, perception=tiny_model)
    base.config = replace(base.config, head_view=32)
    grown = CLIPRPN(replace(tiny_model.config, middle_blocks=2))  # a deeper light network
    out = replace_network_experts(base, {0: grown})
    assert out.config.middle_blocks == 2 and out.config.head_view == 32
    assert replace_network_experts(base, {0: tiny_model}).config.head_view == 32


def test_route_pattern_is_the_one_routing_step(tiny_model):
    from cliprpn_core.arch import route_pattern
    router = tiny_model.router
    with torch.no_grad():
        router.linear.bias.copy_(torch.tensor([0.5, -0.2, 0.1, 0.3]))
    probs = pattern_probs(torch.randn(3, PATTERN_DIM))
    weights, logits = route_pattern(router, probs, top_k=2, temperature=0.5)
    assert torch.equal(logits, router.logits(probs)) and logits.dtype == torch.float32
    assert torch.equal(weights, route(logits, top_k=2, temperature=0.5))
    assert torch.equal(router(probs, 2, 0.5), weights)  # the router's forward is that step
    w, _ = route_pattern(router, probs, override=1)
    assert w[:, 1].tolist() == [1.0, 1.0, 1.0]
    # the model's forward routes by the same step from its pattern head
    x = torch.rand(2, 3, 16, 16)
    out = tiny_model(x, top_k=2)
    with torch.no_grad():
        want, want_logits = route_pattern(router, pattern_probs(tiny_model.perceive(x)), top_k=2)
    assert torch.equal(out.routing, want) and torch.equal(out.router_logits, want_logits)



def test_network_experts_start_as_the_shared_network_then_each_owns_its_own(tiny_model, tiny_network_model):
    src, m = tiny_model, tiny_network_model
    assert {n.split(".")[0] for n, _ in m.named_parameters()} == {"pattern_head", "router", "experts"}
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        for e in range(4):  # top-1 routing: the same image through each expert
            r = torch.zeros(2, 4)
            r[:, e] = 1.0
            torch.testing.assert_close(m(x, routing=r).image, src(x, routing=r).image, atol=1e-5, rtol=0)
        torch.testing.assert_close(m(x).image, src(x).image, atol=1e-5, rtol=0)  # its own perception and routing
        torch.testing.assert_close(m.estimate_mask(x), src.estimate_mask(x), atol=1e-5, rtol=0)
        one, two = torch.eye(4)[:1].repeat(2, 1), torch.eye(4)[1:2].repeat(2, 1)
        before = m(x, routing=two).image
        m.experts[0].intro.weight.add_(0.5)  # expert 0's own encoder: expert 1 must not see it
        torch.testing.assert_close(m(x, routing=two).image, before)
        assert (m(x, routing=one).image - src(x, routing=one).image).abs().max() > 1e-2
        assert (m.estimate_mask(x, routing=one) - src.estimate_mask(x)).abs().max() > 1e-3


def test_network_experts_route_batch_and_skip_like_the_shared_scope(tiny_network_model):
    m = tiny_network_model
    calls = [0] * 4
    for i, e in enumerate(m.experts):
        e.intro.register_forward_hook(lambda mod, a, o, i=i: calls.__setitem__(i, calls[i] + a[0].shape[0]))
    x = torch.rand(3, 3, 16, 16)
    routing = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0]])
    with torch.no_grad():
        both, ml, pyr = m.restore(x, routing)
        assert calls == [2, 0, 1, 0]  # expert 0's network saw two images, expert 2's one, the others none
        assert ml.shape == (3, 1, 16, 16) and [p.shape[-1] for p in pyr] == [16, 8]
        torch.testing.assert_close(both[1:2], m.restore(x[1:2], routing[1:2])[0], atol=1e-5, rtol=1e-5)
        mixed = m.restore(x[:1], torch.tensor([[0.25, 0.75, 0, 0]]))[0]  # soft routing: the images, weighted
        a, b = (m.restore(x[:1], torch.eye(4)[i:i + 1])[0] for i in (0, 1))
        torch.testing.assert_close(mixed, 0.25 * a + 0.75 * b, atol=1e-5, rtol=1e-5)
        assert m.restore(x[:1], torch.eye(4)[2:3], passes=2)[0].shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="expert_scope"):
        CLIPRPNConfig(expert_scope="decoder")


def test_network_experts_checkpoint_round_trip(tmp_path, tiny_network_model):
    from cliprpn_core import load_model, save_model
    m = tiny_network_model
    save_model(m, tmp_path / "net.safetensors")
    back = load_model(tmp_path / "net.safetensors")
    assert back.config.expert_scope == "network" and back.config == m.config
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x).image, m(x).image)


def test_network_experts_assembled_from_specialists(tmp_path, tiny_model):
    import copy
    import subprocess
    import sys

    from cliprpn_core import load_model, save_model
    from cliprpn_core.arch import network_experts_from
    base = tiny_model.eval()
    special = copy.deepcopy(base)
    with torch.no_grad():
        for p in special.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m = network_experts_from([special, base, base, base], perception=base).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        for e, src in enumerate([special, base, base, base]):
            r = torch.eye(4)[e:e + 1]
            torch.testing.assert_close(m(x, routing=r).image, src(x, routing=r).image, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.perceive(x), base.perceive(x))
    with pytest.raises(ValueError, match="one source per expert"):
        network_experts_from([base, base])
    save_model(base, tmp_path / "base.safetensors")
    save_model(special, tmp_path / "light.safetensors")
    script = Path(__file__).resolve().parents[1] / "scripts" / "assemble_experts.py"
    out = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "base.safetensors"), "--expert",
                          f"light_streaks={tmp_path / 'light.safetensors'}", "-o", str(tmp_path / "net.safetensors")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "light_streaks <- " in out.stdout
    back = load_model(tmp_path / "net.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x, routing=torch.eye(4)[:1]).image, m(x, routing=torch.eye(4)[:1]).image)
    bad = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "base.safetensors"), "--expert",
                          "snow=x", "-o", str(tmp_path / "n2.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown expert 'snow'" in bad.stderr
    # a whole-network-expert base (the shipped kind): only the expert given is replaced, the rest kept as they are
    newer = copy.deepcopy(special)
    with torch.no_grad():
        for p in newer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(newer, tmp_path / "light2.safetensors")
    out = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "net.safetensors"), "--expert",
                          f"0={tmp_path / 'light2.safetensors'}", "-o", str(tmp_path / "net2.safetensors")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    again = load_model(tmp_path / "net2.safetensors").eval()
    want = network_experts_from([newer, base, base, base], perception=base).eval()
    assert again.config == want.config
    for (k, v), (k2, v2) in zip(sorted(again.state_dict().items()), sorted(want.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    from cliprpn_core.arch import replace_network_experts
    with pytest.raises(ValueError, match="whole networks"):
        replace_network_experts(base, {0: newer})
    # the light routing's verification threshold is set in the config, the weights unchanged; --extract takes none
    out = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "net2.safetensors"),
                          "--verify-light-mask", "0.03", "-o", str(tmp_path / "net3.safetensors")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    third = load_model(tmp_path / "net3.safetensors")
    assert third.config.verify_light_mask == 0.03 and third.config.same_weights(again.config)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in third.state_dict().items())
    bad = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "net3.safetensors"), "--extract",
                          "light_streaks", "--verify-light-mask", "0.1", "-o", str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--verify-light-mask" in bad.stderr
    # the verification's ramp likewise, checked against the threshold it is given with
    out = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "net2.safetensors"),
                          "--verify-light-mask", "0.03", "--verify-light-ramp", "0.04",
                          "-o", str(tmp_path / "net4.safetensors")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    fourth = load_model(tmp_path / "net4.safetensors")
    assert (fourth.config.verify_light_mask, fourth.config.verify_light_ramp) == (0.03, 0.04)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fourth.state_dict().items())
    bad = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "net3.safetensors"),
                          "--verify-light-ramp", "0.02", "-o", str(tmp_path / "y.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "verify_light_ramp must be" in bad.stderr and not (tmp_path / "y.safetensors").exists()
    # heavy routing's verification: on with the heavy mask it is confirmed by, refused without one
    out = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "net2.safetensors"),
                          "--verify-heavy-mask", "0.1", "0.2", "--verify-heavy-routing", "on",
                          "-o", str(tmp_path / "net5.safetensors")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    fifth = load_model(tmp_path / "net5.safetensors")
    assert fifth.config.verify_heavy_routing and fifth.config.verify_heavy_mask == (0.1, 0.2)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fifth.state_dict().items())
    bad = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "net2.safetensors"),
                          "--verify-heavy-routing", "on", "-o", str(tmp_path / "z.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "verify_heavy_routing needs" in bad.stderr and not (tmp_path / "z.safetensors").exists()
    with pytest.raises(ValueError, match="not a shared-network model"):
        replace_network_experts(again, {1: again})


def test_replace_network_experts_grows_the_base_for_a_deeper_source(tiny_model, tiny_network_model):
    from dataclasses import replace as dc_replace

    from cliprpn_core import CLIPRPN
    from cliprpn_core.arch import grow_from, replace_network_experts
    deeper_cfg = dc_replace(tiny_model.config, expert_blocks=tiny_model.config.expert_blocks + 1,
                            middle_blocks=tiny_model.config.middle_blocks + 1)
    deeper = CLIPRPN(deeper_cfg)
    grow_from(deeper, tiny_model)
    with torch.no_grad():
        for p in deeper.parameters():
            p.add_(0.05 * torch.randn_like(p))  # trained: its added blocks open
    m = replace_network_experts(tiny_network_model, {0: deeper}).eval()
    assert m.config.expert_blocks == deeper_cfg.expert_blocks and m.config.expert_scope == "network"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for e in range(4):
            r = torch.eye(4)[e:e + 1]
            want = (deeper if e == 0 else tiny_network_model).eval()(x, routing=r).image
            torch.testing.assert_close(m(x, routing=r).image, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.perceive(x), tiny_network_model.perceive(x))
    wider = CLIPRPN(dc_replace(tiny_model.config, widths=tuple(2 * w for w in tiny_model.config.widths)))
    with pytest.raises(ValueError, match="neither the model's nor a grown"):
        replace_network_experts(tiny_network_model, {0: wider})


def test_replace_network_experts_grows_a_shallower_source_to_the_base(tiny_model, tiny_network_model):
    """A base whose networks were grown (one network given more blocks, the others identity blocks) takes back a
    network of the earlier, smaller shape: that source is grown to the base's block counts with identity blocks and
    computes what it computed; the base keeps its shape and its other networks."""
    from dataclasses import replace as dc_replace

    from cliprpn_core import CLIPRPN
    from cliprpn_core.arch import grow_from, replace_network_experts
    c = tiny_model.config
    deeper = CLIPRPN(dc_replace(c, dec_blocks=tuple(n + 1 for n in c.dec_blocks), expert_blocks=c.expert_blocks + 1))
    grow_from(deeper, tiny_model)
    with torch.no_grad():
        for p in deeper.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = replace_network_experts(tiny_network_model, {1: deeper}).eval()  # network 1 grown, the others identity
    shallow = CLIPRPN(c)
    shallow.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        for p in shallow.parameters():
            p.add_(0.05 * torch.randn_like(p))  # trained further at the old shape
    shallow.eval()
    m = replace_network_experts(base, {0: shallow}).eval()
    assert m.config == base.config
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for e in range(4):
            r = torch.eye(4)[e:e + 1]
            want = (shallow if e == 0 else base)(x, routing=r).image
            torch.testing.assert_close(m(x, routing=r).image, want, atol=1e-5, rtol=0)
    # a source that differs in block counts both ways: each count is the larger of the two
    mixed = CLIPRPN(dc_replace(c, middle_blocks=c.middle_blocks + 1))
    grow_from(mixed, tiny_model)
    m2 = replace_network_experts(base, {0: mixed})
    assert (m2.config.middle_blocks, m2.config.expert_blocks, m2.config.dec_blocks) == (
        c.middle_blocks + 1, c.expert_blocks + 1, deeper.config.dec_blocks)
    # the refusal names what is wrong (the widths), not the inference settings the source also differs in
    wider = CLIPRPN(dc_replace(c, widths=tuple(2 * w for w in c.widths), passes=c.passes + 1))
    with pytest.raises(ValueError, match="differs in more than block counts.*widths") as refused:
        replace_network_experts(base, {0: wider})
    assert "passes" not in str(refused.value)


@pytest.mark.parametrize("scope", ["bottleneck", "network"])
def test_one_expert_for_the_whole_batch_skips_the_weighted_sum_with_equal_outputs(scope, tiny_model,
                                                                                  tiny_network_model):
    """Top-1 routing of a whole batch to one expert returns that expert's output as it is; the weighted-sum path
    (an expert given weight 1 next to one given weight 0+) must agree with it."""
    from cliprpn_core.arch import _sole_expert
    m = tiny_model if scope == "bottleneck" else tiny_network_model
    assert _sole_expert(torch.tensor([[0, 1.0, 0, 0], [0, 1.0, 0, 0]])) == 1
    assert _sole_expert(torch.tensor([[0, 1.0, 0, 0], [1.0, 0, 0, 0]])) is None
    assert _sole_expert(torch.tensor([[0, 0.5, 0.5, 0]])) is None
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        fast, ml, pyr = m.restore(x, torch.tensor([[0, 1.0, 0, 0], [0, 1.0, 0, 0]]))
        tiny = 1e-30  # the sum path: expert 2 runs with a weight that changes nothing
        slow, ml2, pyr2 = m.restore(x, torch.tensor([[0, 1.0, tiny, 0], [0, 1.0, tiny, 0]]))
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    torch.testing.assert_close(ml, ml2, atol=1e-6, rtol=0)
    for a, b in zip(pyr, pyr2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_contact_sheet_named_photos_and_forced_expert(tmp_path, tiny_ckpt):
    import importlib.util

    from PIL import Image
    spec = importlib.util.spec_from_file_location(
        "make_contact_sheet", Path(__file__).resolve().parents[1] / "scripts" / "make_contact_sheet.py")
    mcs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mcs)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 32), (60 * i, 90, 120)).save(photos / f"{i:03d}.png")
    out = tmp_path / "sheet.jpg"
    mcs.main([str(tiny_ckpt), str(tiny_ckpt), "--images", str(photos), "--names", "002", "000.png",
              "--expert", "heavy_streaks", "--width", "40", "--out", str(out), "--threads", "1"])
    sheet = Image.open(out)
    assert sheet.width == 3 * 40 and sheet.height == 26 + 2 * (32 + 18)  # two rows: the photos named
    with pytest.raises(SystemExit):
        mcs.main([str(tiny_ckpt), str(tiny_ckpt), "--images", str(photos), "--names", "009", "--out", str(out)])


def test_shared_network_of_inverts_replace(tmp_path, tiny_network_model):
    """One expert's network taken out of a whole-network-expert model runs as that expert does inside it, and put
    back by replace_network_experts gives the same tensors; the script's --extract writes it."""
    import subprocess
    import sys

    from cliprpn_core import load_model, save_model
    from cliprpn_core.arch import replace_network_experts, shared_network_of
    m = tiny_network_model
    with torch.no_grad():  # make the networks differ, so taking the wrong one shows
        for name, p in m.named_parameters():
            if name.startswith("experts."):
                p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(1, 3, 16, 16)
    for e in range(m.config.num_experts):
        net = shared_network_of(m, e).eval()
        assert net.config.expert_scope == "bottleneck" and net.config.head_view == m.config.head_view
        r = torch.eye(m.config.num_experts)[e:e + 1]
        with torch.no_grad():
            torch.testing.assert_close(net(x, routing=r).image, m(x, routing=r).image, atol=1e-5, rtol=0)
            torch.testing.assert_close(net.perceive(x), m.perceive(x))
        back = replace_network_experts(m, {e: net})
        for (k, v), (k2, v2) in zip(sorted(back.state_dict().items()), sorted(m.state_dict().items())):
            assert k == k2 and torch.equal(v, v2), k
    with pytest.raises(ValueError, match="whole networks"):
        shared_network_of(shared_network_of(m, 0), 0)
    with pytest.raises(ValueError, match="out of range"):
        shared_network_of(m, m.config.num_experts)
    save_model(m, tmp_path / "net.safetensors")
    script = Path(__file__).resolve().parents[1] / "scripts" / "assemble_experts.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "net.safetensors"), *a],  # noqa: E731
                                    capture_output=True, text=True)
    out = run("--extract", "heavy_streaks", "-o", str(tmp_path / "heavy.safetensors"))
    assert out.returncode == 0, out.stderr
    got = load_model(tmp_path / "heavy.safetensors")
    for (k, v), (k2, v2) in zip(sorted(got.state_dict().items()), sorted(shared_network_of(m, 1).state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    bad = run("--extract", "snow", "-o", str(tmp_path / "x.safetensors"))
    assert bad.returncode == 2 and "unknown expert 'snow'" in bad.stderr and not (tmp_path / "x.safetensors").exists()
    bad = run("--extract", "0", "--head-view", "64", "-o", str(tmp_path / "x.safetensors"))
    assert bad.returncode == 2 and "takes no --expert" in bad.stderr
    save_model(got, tmp_path / "shared.safetensors")
    bad = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "shared.safetensors"), "--extract", "0",
                          "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and "whole networks" in bad.stderr


def test_identity_blocks_are_skipped_without_gradients_and_run_with_them(tiny_model):
    """A block with zero residual scales (added by grow_from) computes the identity: skipped at inference, so a
    network carrying them costs what it did, but run while training so that its scales can learn."""
    from dataclasses import replace as dc_replace

    from cliprpn_core.arch import Block, grow_from
    deeper = CLIPRPN(dc_replace(tiny_model.config, middle_blocks=tiny_model.config.middle_blocks + 2)).eval()
    added = grow_from(deeper, tiny_model)
    new = [m for n, m in deeper.named_modules() if isinstance(m, Block) and f"{n}.beta" in added]
    assert len(new) == 2 and all(b.is_identity() for b in new)
    assert not any(b.is_identity() for b in tiny_model.modules() if isinstance(b, Block))
    calls = []
    hooks = [b.dw.register_forward_hook(lambda *a: calls.append(1)) for b in new]
    x, r = torch.rand(1, 3, 32, 32), torch.eye(4)[:1]
    with torch.no_grad():
        out = deeper(x, routing=r).image
        torch.testing.assert_close(out, tiny_model.eval()(x, routing=r).image, atol=1e-6, rtol=0)
    assert calls == []  # skipped
    deeper.train()
    deeper(x, routing=r).image.square().mean().backward()
    assert len(calls) == 2 and all(b.beta.grad is not None and b.beta.grad.abs().sum() > 0 for b in new)
    with torch.no_grad():  # once a scale is no longer zero (an in-place update), the block runs again
        new[0].gamma.add_(0.1)
        calls.clear()
        deeper.eval()(x, routing=r)
    assert len(calls) == 1 and not new[0].is_identity() and new[1].is_identity()
    # a fused optimiser updates the scales without bumping their version counters: a training forward in between
    # makes the next inference look again
    opt = torch.optim.AdamW([new[1].beta], lr=0.1, fused=True)
    deeper.train()
    deeper(x, routing=r).image.square().mean().backward()
    version = new[1].beta._version
    opt.step()
    assert new[1].beta._version == version and new[1].beta.abs().sum() > 0  # unseen by the version counter
    calls.clear()
    with torch.no_grad():
        deeper.eval()(x, routing=r)
    assert len(calls) == 2 and not new[1].is_identity()
    for h in hooks:
        h.remove()


def test_frozen_identity_blocks_are_skipped_while_training(tiny_model):
    """A block kept removed by a run (zero scales, frozen) is skipped in training too: same output and gradients as
    without it; a frozen block with non-zero scales, or an identity block whose scales can learn, still runs."""
    from dataclasses import replace as dc_replace

    from cliprpn_core.arch import Block, grow_from
    deeper = CLIPRPN(dc_replace(tiny_model.config, middle_blocks=tiny_model.config.middle_blocks + 2))
    added = grow_from(deeper, tiny_model)
    new = [m for n, m in deeper.named_modules() if isinstance(m, Block) and f"{n}.beta" in added]
    for p in new[0].parameters():
        p.requires_grad_(False)
    calls = []
    hooks = [b.dw.register_forward_hook(lambda *a, b=b: calls.append(b)) for b in new]
    x, r = torch.rand(1, 3, 32, 32), torch.eye(4)[:1]
    deeper.train(), tiny_model.train()
    out = deeper(x, routing=r).image
    out.square().mean().backward()
    ref = tiny_model(x, routing=r).image
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert calls == [new[1]]  # the frozen one skipped, the learning one run
    torch.testing.assert_close(deeper.intro.weight.grad, tiny_model.intro.weight.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        new[0].beta.add_(0.1)  # frozen, but no longer the identity: it runs
    calls.clear()
    deeper(x, routing=r)
    assert calls == [new[0], new[1]]
    for h in hooks:
        h.remove()


def test_identity_blocks_of_a_model_made_in_inference_mode(tmp_path, tiny_model):
    """ComfyUI runs nodes in torch.inference_mode, so a model loaded there has weights without version counters."""
    from dataclasses import replace as dc_replace

    from cliprpn_core.arch import grow_from
    from cliprpn_core.checkpoint import load_model, save_model
    deeper = CLIPRPN(dc_replace(tiny_model.config, middle_blocks=tiny_model.config.middle_blocks + 1))
    grow_from(deeper, tiny_model)
    save_model(deeper, tmp_path / "m.safetensors")
    x, r = torch.rand(1, 3, 32, 32), torch.eye(4)[:1]
    with torch.inference_mode():
        m = load_model(tmp_path / "m.safetensors").eval()
        torch.testing.assert_close(m(x, routing=r).image, tiny_model.eval()(x, routing=r).image, atol=1e-6, rtol=0)


def test_inference_folds_the_residual_scales_and_follows_weight_changes(tiny_model):
    """Without gradients a block runs with beta and gamma folded into pw2 and ffn2: the training path's output up
    to float rounding. The folded copies follow in-place weight changes, replaced weights and moves (cast: the cache
    is dropped, so an offloaded model keeps no folded copy on its old device)."""
    from cliprpn_core.arch import Block
    x, r = torch.rand(2, 3, 32, 48), torch.eye(4)[[0, 2]]
    m = tiny_model.requires_grad_(False)  # the gradient path then builds no graph, but runs the unfolded sums
    blocks = [b for b in m.modules() if isinstance(b, Block)]
    assert blocks and not any(b.is_identity() for b in blocks)

    def both():
        with torch.no_grad():
            folded = m(x, routing=r).image
        with torch.enable_grad():
            plain = m(x, routing=r).image
        return folded, plain

    folded, plain = both()
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        m(x, routing=r)
        b = blocks[0]
        first = b._inference
        b.pw2.weight.mul_(-1.5)  # in place: a version counter moves
        b.ffn2.bias = torch.nn.Parameter(torch.randn_like(b.ffn2.bias), requires_grad=False)  # replaced
        changed = m(x, routing=r).image
        assert b._inference is not first
    folded, plain = both()
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=0)
    assert torch.equal(changed, folded)
    m.double()  # a cast clears the cache; the next run folds again in float64
    assert all(b._inference is None for b in blocks)
    with torch.no_grad():
        out64 = m(x.double(), routing=r.double()).image
    assert blocks[0]._inference[1].dtype == torch.float64
    torch.testing.assert_close(out64.float(), plain, atol=1e-5, rtol=0)


def test_handover_network_is_a_network_of_its_own_kept_through_assembly(tmp_path, tiny_model, tiny_network_model):
    """A handover network starts as a copy of the heavy-streaks network (same restorations), is stored with its
    config, survives replacing or growing the heavy network, goes out and back in through the shared-network form,
    and is what the script's --handover / --extract handover write."""
    import subprocess
    import sys
    from dataclasses import replace as dc_replace

    from cliprpn_core import load_model, save_model
    from cliprpn_core.arch import HANDOVER, grow_from, replace_network_experts, shared_network_of, with_handover_network
    with pytest.raises(ValueError, match="handover_network needs expert_scope 'network'"):
        CLIPRPNConfig(handover_network=True)
    m = tiny_network_model
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("experts."):
                p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ValueError, match="only 'handover' is a named routing"):
        m.restore(torch.rand(1, 3, 16, 16), HANDOVER)
    h = with_handover_network(m).eval()
    assert h.config.handover_network and not m.config.handover_network
    x, heavy = torch.rand(2, 3, 16, 16), torch.eye(4)[1:2].expand(2, -1)
    with torch.no_grad():
        want = m.restore(x, heavy, passes=2)[0]
        torch.testing.assert_close(h.restore(x, HANDOVER, passes=2)[0], want, atol=0, rtol=0)
    # the heavy network replaced by another one: the handover network stays as it was
    other = shared_network_of(m, 0)  # any network of the model's shape (here the light one)
    two = replace_network_experts(h, {1: other}).eval()
    with torch.no_grad():
        torch.testing.assert_close(two.restore(x, HANDOVER)[0], m.restore(x, heavy)[0], atol=0, rtol=0)
        torch.testing.assert_close(two.restore(x, heavy)[0], other.eval().restore(x, heavy)[0], atol=1e-6, rtol=0)
    # ... also by a deeper network: the handover network is grown with identity blocks and restores as before
    deeper = CLIPRPN(dc_replace(tiny_model.config, middle_blocks=tiny_model.config.middle_blocks + 1))
    grow_from(deeper, tiny_model)
    grown = replace_network_experts(h, {1: deeper}).eval()
    assert grown.config.handover_network and grown.config.middle_blocks == deeper.config.middle_blocks
    with torch.no_grad():
        torch.testing.assert_close(grown.restore(x, HANDOVER)[0], m.restore(x, heavy)[0], atol=1e-5, rtol=0)
    # out as a shared-network model (the heavy-streaks slot) and back in
    net = shared_network_of(two, HANDOVER).eval()
    assert net.config.expert_scope == "bottleneck" and not net.config.handover_network
    with torch.no_grad():
        torch.testing.assert_close(net.restore(x, heavy)[0], m.restore(x, heavy)[0], atol=1e-6, rtol=0)
    back = with_handover_network(two, net)
    for (k, v), (k2, v2) in zip(sorted(back.state_dict().items()), sorted(two.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    with pytest.raises(ValueError, match="no handover network"):
        shared_network_of(m, HANDOVER)
    # stored: the config says so, the tensors come back; the script writes both forms
    save_model(two, tmp_path / "two.safetensors")
    got = load_model(tmp_path / "two.safetensors")
    assert got.config.handover_network
    for (k, v), (k2, v2) in zip(sorted(got.state_dict().items()), sorted(two.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    save_model(m, tmp_path / "m.safetensors")
    save_model(other, tmp_path / "other.safetensors")
    script = Path(__file__).resolve().parents[1] / "scripts" / "assemble_experts.py"
    run = lambda base, *a: subprocess.run([sys.executable, str(script), "--base", str(tmp_path / base), *a],  # noqa: E731
                                          capture_output=True, text=True)
    out = run("m.safetensors", "--handover", "heavy_streaks", "--expert", f"heavy_streaks={tmp_path / 'other.safetensors'}",
              "-o", str(tmp_path / "s.safetensors"))
    assert out.returncode == 0, out.stderr
    for (k, v), (k2, v2) in zip(sorted(load_model(tmp_path / "s.safetensors").state_dict().items()),
                                sorted(two.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    out = run("s.safetensors", "--extract", "handover", "-o", str(tmp_path / "h.safetensors"))
    assert out.returncode == 0, out.stderr
    out = run("s.safetensors", "--handover", str(tmp_path / "h.safetensors"), "-o", str(tmp_path / "s2.safetensors"))
    assert out.returncode == 0, out.stderr
    for (k, v), (k2, v2) in zip(sorted(load_model(tmp_path / "s2.safetensors").state_dict().items()),
                                sorted(two.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    # a deeper network grows the others (and the handover network) with identity blocks: the same command writes
    # the same tensors and metadata (safetensors orders the metadata as it likes, so not always the same bytes)
    save_model(deeper, tmp_path / "deeper.safetensors")
    for name in ("g1", "g2"):
        out = run("s.safetensors", "--expert", f"heavy_streaks={tmp_path / 'deeper.safetensors'}",
                  "-o", str(tmp_path / f"{name}.safetensors"))
        assert out.returncode == 0, out.stderr
    from safetensors import safe_open
    with safe_open(tmp_path / "g1.safetensors", "pt") as f1, safe_open(tmp_path / "g2.safetensors", "pt") as f2:
        assert f1.metadata() == f2.metadata() and sorted(f1.keys()) == sorted(f2.keys())
        for k in f1.keys():
            assert torch.equal(f1.get_tensor(k), f2.get_tensor(k)), k
    assert load_model(tmp_path / "g1.safetensors").config.middle_blocks == deeper.config.middle_blocks
    save_model(shared_network_of(m, 0), tmp_path / "shared.safetensors")
    bad = run("shared.safetensors", "--handover", "heavy_streaks", "-o", str(tmp_path / "x.safetensors"))
    assert bad.returncode == 2 and "whole networks" in bad.stderr and not (tmp_path / "x.safetensors").exists()
