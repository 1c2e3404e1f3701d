"""Unit tests of what the nodes do, without ComfyUI (nodes/node_logic.py). The fine-tune loop the Fine-tune
node runs is the core's (tests/test_finetune.py)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny(pack_core):
    """A random tiny CLIP-RPN from the pack's own copy of the core (as the nodes see it)."""
    torch.manual_seed(0)
    m = pack_core.CLIPRPN(pack_core.tiny_config())
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("beta", "gamma", "gate")):
                p.normal_(0, 0.5)
    return m.eval()


# -- layout -------------------------------------------------------------------------------------

def test_layout_round_trip_and_masks(node_logic):
    img = torch.rand(2, 10, 12, 3)
    x = node_logic.bhwc_to_bchw(img)
    assert x.shape == (2, 3, 10, 12)
    assert torch.equal(node_logic.bchw_to_bhwc(x), img)
    assert node_logic.bhwc_to_bchw(img[0]).shape == (1, 3, 10, 12)
    with pytest.raises(ValueError, match="IMAGE batch"):
        node_logic.bhwc_to_bchw(torch.rand(1, 1, 2, 3, 4))
    with pytest.raises(TypeError):
        node_logic.bhwc_to_bchw([1, 2])
    assert node_logic.mask_to_b1hw(torch.rand(2, 10, 12)).shape == (2, 1, 10, 12)
    assert node_logic.mask_to_b1hw(torch.rand(10, 12)).shape == (1, 1, 10, 12)
    assert node_logic.mask_to_b1hw(None) is None
    gray = torch.rand(1, 1, 8, 8)
    assert torch.equal(node_logic.rgb_only(gray)[:, 2], gray[:, 0])
    assert node_logic.rgb_only(torch.rand(1, 4, 8, 8)).shape[1] == 3
    with pytest.raises(ValueError, match="5 channels"):
        node_logic.rgb_only(torch.rand(1, 5, 8, 8))


# -- payloads -------------------------------------------------------------------------------------

def test_pattern_summary_and_chart(node_logic, pack_core):
    from importlib import import_module
    P = import_module(pack_core.__name__ + ".patterns")
    probs = torch.zeros(2, P.PATTERN_DIM)
    # image 1: dense / slanted right / heavy / wide streaks; image 2: the first class everywhere
    off = 0
    for n, pick in zip(P.NUM_CLASSES, (2, 2, 2, 1)):
        probs[0, off + pick] = 1.0
        probs[1, off] = 1.0
        off += n
    pat = node_logic.RainPattern(probs, "pattern-head")
    lines = pat.summary().splitlines()
    assert len(lines) == 3 and lines[-1] == "(perceived by pattern-head)"
    assert lines[0].startswith("image 1: density: dense (1.00)") and "form: wide streaks" in lines[0]
    assert "density: sparse" in lines[1]
    chart = node_logic.pattern_chart(pat)
    assert chart.shape[0] == 2 and chart.shape[-1] == 3 and chart.dtype == torch.float32
    assert 0 <= float(chart.min()) and float(chart.max()) <= 1
    assert not torch.equal(chart[0], chart[1])  # different scores, different bars


def test_routing_summary_and_expert_choice(node_logic):
    r = node_logic.RainRouting(torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.0, 0.75, 0.0]]),
                        ("light_streaks", "heavy_streaks", "raindrops", "veil"))
    assert r.summary().splitlines() == ["image 1: heavy_streaks=1.00", "image 2: light_streaks=0.25, raindrops=0.75"]
    assert node_logic.expert_index(node_logic.EXPERT_AUTO, 4) is None
    assert node_logic.expert_index("veil", 4) == 3
    with pytest.raises(ValueError, match="only 2 experts"):
        node_logic.expert_index("veil", 2)
    with pytest.raises(ValueError, match="unknown expert"):
        node_logic.expert_index("sunshine", 4)
    # "handover": the heavy-streaks slot, restored by the model's handover network (RainRouting.handover)
    assert node_logic.expert_choices()[-1] == "handover" and node_logic.expert_index("handover", 4) == 1
    h = node_logic.RainRouting(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), ("light_streaks", "heavy_streaks"), handover=True)
    assert h.summary() == "image 1: handover network"


def test_model_handle_holds_model_and_perceiver(node_logic, tiny):
    h = node_logic.ModelHandle(tiny, None, torch.float32, name="tiny")
    assert list(h.module.keys()) == ["rpn"] and h.module["rpn"] is tiny
    assert h.experts == ("light_streaks", "heavy_streaks", "raindrops", "veil")
    assert h.size_bytes() > 0
    clip = torch.nn.Linear(2, 2)
    h2 = node_logic.ModelHandle(tiny, clip, torch.float32, name="tiny")
    assert h2.module["clip"] is clip


# -- model files ----------------------------------------------------------------------------------

def test_model_file_choices(node_logic, tmp_path):
    files = ["clip_rpn_default.safetensors", "mine/ft.safetensors", "ViT-B-32__openai.safetensors", "old.pth",
             "myclip/open_clip_model.safetensors", ".cache/x.safetensors"]
    (tmp_path / "myclip").mkdir()
    (tmp_path / "myclip" / "open_clip_config.json").write_text("{}")
    (tmp_path / "notclip").mkdir()
    folders = node_logic.find_clip_folders([str(tmp_path), str(tmp_path / "missing")])
    assert folders == ["myclip"]
    assert node_logic.checkpoint_choices(files, folders) == ["clip_rpn_default.safetensors", "mine/ft.safetensors"]
    supported = {"ViT-B-32 OpenAI": ("ViT-B-32", "openai"), "Other": ("X", "y")}
    choices = node_logic.clip_choices(files, folders, supported)
    # ViT-B-32/openai is on disk already, so it is not offered for download again
    assert choices == [node_logic.CLIP_NONE, "ViT-B-32__openai.safetensors", "myclip", node_logic.DOWNLOAD_PREFIX + "Other"]
    files.append("X__y.safetensors")
    assert node_logic.DOWNLOAD_PREFIX + "Other" not in node_logic.clip_choices(files, folders, supported)


def test_resolve_names_every_folder_searched(node_logic, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "m.safetensors").write_bytes(b"x")
    assert node_logic.resolve_in([str(a), str(b)], "m.safetensors", "checkpoint", "clip_rpn") == b / "m.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        node_logic.resolve_in([str(a), str(b)], "nope.safetensors", "CLIP-RPN checkpoint", "clip_rpn")
    msg = str(e.value)
    assert "nope.safetensors" in msg and "'clip_rpn'" in msg and str(a) in msg and str(b) in msg
    for bad in ("../m.safetensors", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            node_logic.resolve_in([str(a)], bad, "checkpoint", "clip_rpn")


def test_save_name_rules(node_logic):
    reserved = ("clip_rpn_default",)
    assert node_logic.check_save_name("", reserved) is None
    assert node_logic.check_save_name("  ", reserved) is None
    assert node_logic.check_save_name("my-model_2.safetensors", reserved) == "my-model_2"
    for bad in ("../evil", "a/b", "clip_rpn_default", "CLIP_RPN_DEFAULT.safetensors", "x__y", ".hidden"):
        with pytest.raises(ValueError):
            node_logic.check_save_name(bad, reserved)


def test_overwrite_only_earlier_finetunes(node_logic, tmp_path):
    meta = {tmp_path / "ft.safetensors": {"finetuned_from": "x"}, tmp_path / "trained.safetensors": {}}
    for p in meta:
        p.write_bytes(b"x")
    (tmp_path / "broken.safetensors").write_bytes(b"x")

    def read(p):
        if p.name == "broken.safetensors":
            raise ValueError("corrupt")
        return meta[p]

    assert node_logic.check_overwrite(tmp_path / "new.safetensors", read) is False
    assert node_logic.check_overwrite(tmp_path / "ft.safetensors", read) is True
    for name in ("trained.safetensors", "broken.safetensors"):
        with pytest.raises(ValueError, match="not an earlier fine-tune"):
            node_logic.check_overwrite(tmp_path / name, read)


# -- tiling back-off ----------------------------------------------------------------------------------

class FakeOOM(RuntimeError):
    pass


def test_backoff_halves_tile_until_it_fits(node_logic):
    seen = []

    def fn(tile):
        seen.append(tile)
        if tile is None or tile > 150:
            raise FakeOOM("CUDA out of memory")
        return tile

    freed = []
    out = node_logic.run_with_backoff(fn, None, lambda e: isinstance(e, FakeOOM), lambda: freed.append(1))
    assert out == 128 and seen == [None, 512, 256, 128] and len(freed) == 3


def test_backoff_gives_up_below_min_and_passes_other_errors(node_logic):
    calls = []

    def always_oom(tile):
        calls.append(tile)
        raise FakeOOM("oom")

    with pytest.raises(FakeOOM):
        node_logic.run_with_backoff(always_oom, 256, lambda e: isinstance(e, FakeOOM))
    assert calls == [256, 128]

    def bad(tile):
        calls.append("bad")
        raise ValueError("NaN input")

    with pytest.raises(ValueError, match="NaN"):
        node_logic.run_with_backoff(bad, 512, lambda e: isinstance(e, FakeOOM))
    assert calls[-1] == "bad" and calls.count("bad") == 1


# -- synthesis -------------------------------------------------------------------------------------

def test_synthesize_rain_is_reproducible(node_logic):
    clean = torch.rand(2, 4, 48, 40)  # RGBA: alpha is dropped
    r1, m1 = node_logic.synthesize_rain(clean, seed=3)
    r2, m2 = node_logic.synthesize_rain(clean, seed=3)
    r3, _ = node_logic.synthesize_rain(clean, seed=4)
    assert r1.shape == (2, 3, 48, 40) and m1.shape == (2, 1, 48, 40)
    assert torch.equal(r1, r2) and torch.equal(m1, m2) and not torch.equal(r1, r3)
    assert float((r1 - clean[:, :3]).abs().mean()) > 1e-3
    assert 0 <= float(r1.min()) and float(r1.max()) <= 1
    rv, _ = node_logic.synthesize_rain(clean[:, :3], seed=3, regime="veil")
    assert rv.shape == (2, 3, 48, 40)


def test_loss_chart_is_an_image(node_logic):
    im = node_logic.loss_chart({"total": [1.0, 0.5, 0.25], "ssim": [0.3, 0.2, 0.1]}, "t")
    assert im.shape[0] == 1 and im.shape[-1] == 3 and float(im.min()) < 0.5 < float(im.max())
