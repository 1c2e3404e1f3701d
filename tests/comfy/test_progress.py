"""Progress people can see (issue 22.3) and the V3 conventions the pack keeps (22.2), without a server:
per-tile / per-step progress with a preview image on the long nodes, through ComfyUI's
ProgressBar(...).update_absolute(value, total, ("JPEG", PIL image, max size)) (faked in test_host.py),
plain schema widgets only (what the Vue node renderer draws), comfy_entrypoint and node_list.json."""
from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from pack_schema import WIDGET_TYPES, _fake_io, pack_object_info
from packutil import PACK_NAME, REPO
from test_host import fake_comfy  # noqa: F401  (fixture)


@pytest.fixture
def nodes_env(fake_comfy, monkeypatch):  # noqa: F811
    api = type(sys)("comfy_api")
    api.__path__ = []
    latest = type(sys)("comfy_api.latest")
    latest.__path__ = []
    latest.io = _fake_io()
    latest.ComfyExtension = object
    for name, mod in {"comfy_api": api, "comfy_api.latest": latest, "comfy_api.latest.io": latest.io}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    fake_comfy.processing = importlib.import_module(f"{PACK_NAME}.nodes.processing")
    fake_comfy.node_logic = importlib.import_module(f"{PACK_NAME}.nodes.node_logic")
    return fake_comfy


@pytest.fixture
def handle(nodes_env, pack_core):
    torch.manual_seed(0)
    m = pack_core.CLIPRPN(pack_core.tiny_config())
    return nodes_env.node_logic.ModelHandle(m, None, torch.float32, name="tiny")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _check_preview(p, size=None):
    kind, pil, max_side = p
    assert kind == "JPEG" and max_side == 512 and pil.mode == "RGB"
    if size is not None:
        assert pil.size == size


def test_progress_shows_offered_previews_at_most_every_interval_and_always_last(nodes_env):
    h, st = nodes_env.host, nodes_env.state
    clock = Clock()
    bar = h.Progress(4, every=1.0, clock=clock)
    asked = []

    def image(max_side):
        asked.append(max_side)
        return torch.rand(1, 3, 20, 30)
    for i in range(1, 5):
        bar.offer(image)
        bar(i, 4)
        clock.t += 0.4
    assert st.progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    shown = [v for v, _ in st.previews]
    assert shown == [1, 4]  # the first, then none within the interval, then the last
    assert asked == [512, 512]  # images are only drawn when shown
    for _, p in st.previews:
        _check_preview(p, (30, 20))


def test_a_failing_preview_never_fails_the_run_and_gray_becomes_rgb(nodes_env):
    h, st = nodes_env.host, nodes_env.state
    bar = h.Progress(2)
    bar.offer(lambda max_side: 1 / 0)
    bar(1, 2)
    bar.offer(lambda max_side: torch.rand(1, 1, 8, 8))
    bar(2, 2)
    assert st.progress == [(1, 2), (2, 2)] and len(st.previews) == 1
    _check_preview(st.previews[0][1], (8, 8))


def test_derain_reports_every_tile_with_a_preview(nodes_env, handle):
    st = nodes_env.state
    image = torch.rand(2, 70, 90, 3)
    p = nodes_env.processing
    r = p.derain(handle, image, options=p.derain_options(tile=32, overlap=8))
    n_tiles = len(st.progress) // 2
    assert n_tiles > 1 and [v for v, _ in st.progress] == list(range(1, 2 * n_tiles + 1))
    assert {t for _, t in st.progress} == {2 * n_tiles}
    assert st.previews and st.previews[-1][0] == 2 * n_tiles  # the finished image is shown last
    for _, p in st.previews:
        _check_preview(p, (90, 70))
    last = torch.tensor(__import__("numpy").array(st.previews[-1][1][1])).float() / 255
    assert (last - r.images[1].movedim(0, -1)).abs().mean() < 0.02  # the preview is the result


def test_cross_attention_and_one_node_derain_show_previews(nodes_env, handle):
    st = nodes_env.state
    p = nodes_env.processing
    p.CrossAttentionDerain.execute(handle, torch.rand(1, 40, 40, 3), tile=0)
    assert st.progress[-1] == (1, 1) and len(st.previews) == 1
    st.progress.clear()
    st.previews.clear()
    p.CLIPRPNDerain.execute(handle, torch.rand(1, 40, 40, 3), expert_check=True)
    # the check's last steps measure residual rain: the kept result is shown again at the end
    assert st.progress and st.previews and st.previews[-1][0] == st.progress[-1][0] == st.progress[-1][1]


def test_derain_nodes_verify_light_routing_unless_turned_off(nodes_env, pack_core):
    """verify_light (default on) reaches the core: an image auto-routed to light_streaks whose light-network mask is
    below the model's verify_light_mask is restored by heavy_streaks; off, the light network keeps it."""
    from dataclasses import replace
    torch.manual_seed(3)
    m = pack_core.CLIPRPN(replace(pack_core.tiny_config(), expert_scope="network", verify_light_mask=0.99)).eval()
    with torch.no_grad():
        m.router.linear.bias.copy_(torch.tensor([9.0, -9.0, -9.0, -9.0]))  # every image routed to light_streaks
    handle = nodes_env.node_logic.ModelHandle(m, None, torch.float32, name="tiny-network")
    p = nodes_env.processing
    image = torch.rand(1, 40, 48, 3)
    d = pack_core.Derainer(m, device="cpu", dtype="fp32")
    x = image.movedim(-1, 1)
    light, heavy = (d.derain(x, pack_core.DerainOptions(expert=e)).images.movedim(1, -1) for e in (0, 1))
    assert (light - heavy).abs().max() > 1e-3  # the two networks differ on this image
    for node in (p.CLIPRPNDerain, p.CrossAttentionDerain):
        on = node.execute(handle, image)[0]
        off = node.execute(handle, image, verify_light=False)[0]
        assert torch.allclose(on, heavy, atol=1e-5) and torch.allclose(off, light, atol=1e-5), node.__name__


def test_expert_router_override_handover_reaches_the_handover_network(nodes_env, pack_core):
    """The Expert Router's override "handover" sends every image to the network the light verification hands over
    to (the model's handover network), through Cross-Attention Derain; its routing says heavy streaks."""
    from dataclasses import replace
    import importlib
    arch = importlib.import_module(pack_core.CLIPRPN.__module__)
    torch.manual_seed(4)
    m = pack_core.CLIPRPN(replace(pack_core.tiny_config(), expert_scope="network")).eval()
    m = arch.with_handover_network(m).eval()
    with torch.no_grad():  # the handover network no longer a copy of the heavy one
        for q in m.handover.parameters():
            q.add_(0.05 * torch.randn_like(q))
    handle = nodes_env.node_logic.ModelHandle(m, None, torch.float32, name="tiny-handover")
    p = nodes_env.processing
    image = torch.rand(1, 40, 48, 3)
    d = pack_core.Derainer(m, device="cpu", dtype="fp32")
    x = image.movedim(-1, 1)
    want = d.derain(x, pack_core.DerainOptions(expert=arch.HANDOVER)).images.movedim(1, -1)
    heavy = d.derain(x, pack_core.DerainOptions(expert=1)).images.movedim(1, -1)
    assert (want - heavy).abs().max() > 1e-3
    pattern = p.CLIPRainPerceiver.execute(handle, image)[0]
    routing, summary = p.ExpertRouter.execute(handle, pattern, expert_override="handover")[:2]
    assert routing.handover and routing.weights.argmax(1).tolist() == [1] and summary == "image 1: handover network"
    got = p.CrossAttentionDerain.execute(handle, image, routing=routing)[0]
    assert torch.allclose(got, want, atol=1e-5)
    plain = p.ExpertRouter.execute(handle, pattern, expert_override="heavy_streaks")[0]
    assert not plain.handover
    assert torch.allclose(p.CrossAttentionDerain.execute(handle, image, routing=plain)[0], heavy, atol=1e-5)


def test_mask_estimator_reports_every_tile_with_a_preview(nodes_env, handle):
    st = nodes_env.state
    nodes_env.processing.MaskEstimator.execute(handle, torch.rand(1, 70, 90, 3), tile=32, overlap=8)
    assert len(st.progress) > 1 and st.progress[-1][0] == st.progress[-1][1]
    assert st.previews
    for _, pv in st.previews:
        _check_preview(pv, (90, 70))


def test_finetune_previews_its_loss_curve(nodes_env, handle):
    st = nodes_env.state
    bar = nodes_env.host.Progress(3, every=0.0)
    rainy, clean = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    finetune = importlib.import_module(f"{PACK_NAME}.cliprpn_core.finetune").finetune
    finetune(handle.model, rainy, clean, steps=3, lr=1e-4, patch=32, batch_size=1, on_step=bar, preview=bar.offer)
    assert [v for v, _ in st.progress] == [1, 2, 3] and [v for v, _ in st.previews] == [1, 2, 3]
    _check_preview(st.previews[-1][1])


def test_finetune_node_drives_the_core_loop_with_its_bar(nodes_env, handle):
    """The Fine-tune node runs cliprpn_core.finetune with its progress bar (progress, previews, Cancel)."""
    st = nodes_env.state
    training = importlib.import_module(f"{PACK_NAME}.nodes.training")
    out = training.LossScheduledFinetune.execute(handle, torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), steps=3,
                                                 schedule="charbonnier", patch_size=32, batch_size=1)
    assert [v for v, _ in st.progress] == [1, 2, 3]
    assert st.previews[0][0] == 1 and st.previews[-1][0] == 3  # the first, then at most every 0.5 s, and the last
    _check_preview(st.previews[-1][1])
    model, curve, report = out
    assert report.startswith("fine-tuned tiny for 3 steps (charbonnier)") and curve.shape[-1] == 3
    assert model.model is not handle.model


# -- V3 conventions ----------------------------------------------------------------------------------

def test_widgets_are_plain_schema_widgets(tmp_path):
    """Every input is a socket (IMAGE, MASK or one of the pack's types) or one of the frontend's built-in
    widgets; no custom widget, no web extension: the Vue node renderer draws every node."""
    info = pack_object_info(tmp_path)
    sockets = {"IMAGE", "MASK", "CLIPRPN_MODEL", "RAIN_PATTERN", "RAIN_ROUTING"}
    for node, d in info.items():
        for sect in ("required", "optional"):
            for name, (kind, opts) in d["input"][sect].items():
                assert kind in WIDGET_TYPES or kind in sockets, f"{node}.{name}: {kind}"
                assert not {"widget", "display", "multiline"} & set(opts) or kind in WIDGET_TYPES, (node, name)
                if kind in sockets:
                    assert set(opts) <= {"tooltip"}, f"{node}.{name}: socket with widget options {opts}"
    init = (REPO / "__init__.py").read_text()
    assert "WEB_DIRECTORY" not in init and not list(REPO.glob("js/**/*.js")) and not list(REPO.glob("web/**/*.js"))


def test_entrypoint_and_manager_node_list(tmp_path):
    init = (REPO / "__init__.py").read_text()
    assert "async def comfy_entrypoint" in init
    assert "NODE_CLASS_MAPPINGS =" not in init and "NODE_CLASS_MAPPINGS[" not in init  # would hide comfy_entrypoint
    listed = json.loads((REPO / "node_list.json").read_text())
    assert set(listed) == set(pack_object_info(tmp_path))
