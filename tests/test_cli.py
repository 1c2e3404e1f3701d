import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliprpn_core.cli import main


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30 + i, 41, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(d / "gray.png")
    return d


def test_derain_folder_same_names_and_report(images, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    rc = main(["derain", str(images), "-o", str(out), "--checkpoint", str(tiny_ckpt), "--device", "cpu",
               "--save-mask", "--report", str(tmp_path / "r.json"), "-q"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["gray.png", "gray_mask.png", "img0.png", "img0_mask.png",
                                                      "img1.png", "img1_mask.png"]
    assert Image.open(out / "img1.png").size == (41, 31)
    assert Image.open(out / "gray.png").mode == "L"
    rep = json.loads((tmp_path / "r.json").read_text())
    assert len(rep["images"]) == 3
    r0 = rep["images"][0]
    assert r0["status"] == "ok" and r0["perceived_by"] == "pattern-head" and r0["seconds"] > 0
    assert abs(sum(r0["routing"].values()) - 1) < 1e-3 and "density:" in r0["pattern"]


def test_derain_expert_by_name_or_index(images, tiny_ckpt, tmp_path):
    outs = {}
    for e in ("1", "heavy_streaks", "0"):
        out = tmp_path / f"e{e}"
        assert main(["derain", str(images / "img0.png"), "-o", str(out), "--checkpoint", str(tiny_ckpt),
                     "--device", "cpu", "--expert", e, "--report", str(tmp_path / f"{e}.json"), "-q"]) == 0
        outs[e] = np.asarray(Image.open(out / "img0.png"))
        routing = json.loads((tmp_path / f"{e}.json").read_text())["images"][0]["routing"]
        assert max(routing, key=routing.get) == ("light_streaks" if e == "0" else "heavy_streaks")
    assert np.array_equal(outs["1"], outs["heavy_streaks"]) and not np.array_equal(outs["1"], outs["0"])


def test_derain_passes_option(images, tiny_ckpt, tmp_path):
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        assert main(["derain", str(images / "img0.png"), "-o", str(out), "--checkpoint", str(tiny_ckpt),
                     "--device", "cpu", "--passes", str(n), "-q"]) == 0
        outs[n] = np.asarray(Image.open(out / "img0.png"))
    assert outs[1].shape == outs[2].shape and not np.array_equal(outs[1], outs[2])


def test_derain_work_side_option_and_a_rerun_redoes_the_images(tmp_path, tiny_ckpt):
    src = tmp_path / "big"
    src.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(src / "a.png")
    out = tmp_path / "out"
    run = lambda *extra: main(["derain", str(src), "-o", str(out), "--checkpoint", str(tiny_ckpt),  # noqa: E731
                               "--device", "cpu", "-q", *extra])
    assert run("--work-side", "0") == 0
    full = np.asarray(Image.open(out / "a.png"))
    assert run("--work-side", "64") == 0  # another working size: the finished output is redone, not skipped
    small = np.asarray(Image.open(out / "a.png"))
    assert full.shape == small.shape == (150, 200, 3) and not np.array_equal(full, small)


def test_derain_no_verify_keeps_the_light_network(images, tmp_path, tiny_network_model):
    import json
    from dataclasses import replace

    from cliprpn_core import save_model
    m = tiny_network_model
    with torch.no_grad():
        m.router.linear.bias.copy_(torch.tensor([9.0, -9.0, -9.0, -9.0]))  # perception routes to the light network
    m.config = replace(m.config, verify_light_mask=0.99)  # ... which never finds that much rain: handed over
    ck = tmp_path / "v.safetensors"
    save_model(m, ck)
    routed = {}
    for flag in ((), ("--no-verify",)):
        out = tmp_path / ("off" if flag else "on")
        assert main(["derain", str(images / "img0.png"), "-o", str(out), "--checkpoint", str(ck), "--device", "cpu",
                     "-q", "--report", str(out / "r.json"), *flag]) == 0
        routed[bool(flag)] = json.loads((out / "r.json").read_text())["images"][0]
    assert routed[False]["routing"] == {"heavy_streaks": 1.0} and routed[True]["routing"] == {"light_streaks": 1.0}
    # the report says why: the light network's mean mask, below the model's threshold; unverified runs say nothing
    assert 0 <= routed[False]["light_mask"] < 0.99 and "handed to the heavy-streaks" in routed[False]["verified"]
    assert "light_mask" not in routed[True] and "verified" not in routed[True]


def test_derain_report_says_how_heavy_routing_was_verified(images, tmp_path, tiny_network_model):
    import json
    from dataclasses import replace

    from cliprpn_core import save_model
    m = tiny_network_model
    with torch.no_grad():
        m.router.linear.bias.copy_(torch.tensor([-9.0, 9.0, -9.0, -9.0]))  # perception routes to the heavy network
    got = {}
    for name, band in (("kept", (0.001, 0.002)), ("given", (0.99, 0.995)), ("shared", (0.0, 0.99))):
        m.config = replace(m.config, verify_heavy_mask=band, verify_heavy_routing=True)
        ck, out = tmp_path / f"{name}.safetensors", tmp_path / name
        save_model(m, ck)
        assert main(["derain", str(images / "img0.png"), "-o", str(out), "--checkpoint", str(ck), "--device", "cpu",
                     "-q", "--report", str(out / "r.json")]) == 0
        got[name] = json.loads((out / "r.json").read_text())["images"][0]
    assert got["kept"]["routing"] == {"heavy_streaks": 1.0} and got["kept"]["verified"].startswith("kept by the heavy")
    assert got["given"]["routing"] == {"light_streaks": 1.0} and got["given"]["verified"].startswith("given to the light")
    hm = got["shared"]["heavy_mask"]
    assert 0 < hm < 0.99 and got["shared"]["verified"].startswith("shared")
    assert got["shared"]["routing"]["heavy_streaks"] == pytest.approx(hm / 0.99, abs=2e-4)
    assert got["kept"]["heavy_mask"] == got["given"]["heavy_mask"] == hm and "light_mask" not in got["kept"]
    # --no-verify: routed as perceived, no figure
    assert main(["derain", str(images / "img0.png"), "-o", str(tmp_path / "nv"), "--checkpoint",
                 str(tmp_path / "given.safetensors"), "--device", "cpu", "-q", "--no-verify",
                 "--report", str(tmp_path / "nv.json")]) == 0
    entry = json.loads((tmp_path / "nv.json").read_text())["images"][0]
    assert entry["routing"] == {"heavy_streaks": 1.0} and "verified" not in entry and "heavy_mask" not in entry


def test_derain_report_says_how_the_heavy_network_confirmed_a_handover(images, tmp_path, tiny_network_model):
    import json
    from dataclasses import replace

    from cliprpn_core import save_model
    m = tiny_network_model
    with torch.no_grad():
        m.router.linear.bias.copy_(torch.tensor([9.0, -9.0, -9.0, -9.0]))  # perception routes to the light network
    got = {}
    for name, band in (("kept", (0.99, 0.995)), ("handed", (0.001, 0.002)), ("shared", (0.0, 0.99))):
        m.config = replace(m.config, verify_light_mask=0.99, verify_heavy_mask=band)  # every image is handed over
        ck, out = tmp_path / f"{name}.safetensors", tmp_path / name
        save_model(m, ck)
        assert main(["derain", str(images / "img0.png"), "-o", str(out), "--checkpoint", str(ck), "--device", "cpu",
                     "-q", "--report", str(out / "r.json")]) == 0
        got[name] = json.loads((out / "r.json").read_text())["images"][0]
    assert got["kept"]["routing"] == {"light_streaks": 1.0} and "kept by the light" in got["kept"]["verified"]
    assert got["handed"]["routing"] == {"heavy_streaks": 1.0} and "handed to the heavy" in got["handed"]["verified"]
    hm = got["shared"]["heavy_mask"]
    assert 0 < hm < 0.99 and got["shared"]["verified"].startswith("shared")
    assert got["shared"]["routing"]["heavy_streaks"] == pytest.approx(hm / 0.99, abs=2e-4)
    assert got["kept"]["heavy_mask"] == got["handed"]["heavy_mask"] == hm  # the same figure decides each time
    # a light mask on the verification's ramp: the report says so, with the handover's share from it
    lm = got["kept"]["light_mask"]
    m.config = replace(m.config, verify_light_mask=lm - 1e-3, verify_light_ramp=lm + 3e-3, verify_heavy_mask=(0.0, 0.0))
    save_model(m, tmp_path / "ramp.safetensors")
    assert main(["derain", str(images / "img0.png"), "-o", str(tmp_path / "ramp"), "--checkpoint",
                 str(tmp_path / "ramp.safetensors"), "--device", "cpu", "-q", "--report", str(tmp_path / "ramp.json")]) == 0
    ramp = json.loads((tmp_path / "ramp.json").read_text())["images"][0]
    assert ramp["routing"]["heavy_streaks"] == pytest.approx(0.75, abs=0.02)  # the report rounds the light mask
    assert ramp["verified"].startswith("shared: its light mask") and "verify_light_ramp" in ramp["verified"]
    m.config = replace(m.config, verify_light_mask=0.99, verify_light_ramp=0.0)
    # a model with a handover network names it as the network that took the image
    from cliprpn_core.arch import with_handover_network
    h = with_handover_network(m)
    h.config = replace(h.config, verify_heavy_mask=(0.001, 0.002))
    save_model(h, tmp_path / "h.safetensors")
    assert main(["derain", str(images / "img0.png"), "-o", str(tmp_path / "h"), "--checkpoint",
                 str(tmp_path / "h.safetensors"), "--device", "cpu", "-q", "--report", str(tmp_path / "h.json")]) == 0
    entry = json.loads((tmp_path / "h.json").read_text())["images"][0]
    assert entry["verified"].startswith("handed to the handover network") and entry["heavy_mask"] == hm
    # --expert handover forces it by name: the same pixels as that handover, not verified, the report says which
    # network restored the image (in a model without one, the heavy-streaks network)
    for ck, name in ((tmp_path / "h.safetensors", "fh"), (tmp_path / "handed.safetensors", "fm")):
        assert main(["derain", str(images / "img0.png"), "-o", str(tmp_path / name), "--checkpoint", str(ck),
                     "--device", "cpu", "-q", "--expert", "handover", "--report", str(tmp_path / f"{name}.json")]) == 0
        got[name] = json.loads((tmp_path / f"{name}.json").read_text())["images"][0]
        assert got[name]["routing"] == {"heavy_streaks": 1.0} and "verified" not in got[name]
    assert got["fh"]["restored_by"] == "the handover network"
    assert got["fm"]["restored_by"].startswith("the heavy-streaks network (this model has no handover network)")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fh" / "img0.png")), np.asarray(Image.open(tmp_path / "h" / "img0.png")))
    assert "restored_by" not in entry
    with pytest.raises(SystemExit):
        main(["derain", str(images / "img0.png"), "-o", str(tmp_path / "x"), "--expert", "handover_net"])


def test_corrupt_file_reported_rest_processed(images, tiny_ckpt, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    (images / "zero.jpg").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["derain", str(images), "-o", str(out), "--checkpoint", str(tiny_ckpt), "--device", "cpu", "-q"])
    assert rc == 3  # partial failure
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["gray.png", "img0.png", "img1.png"]
    err = capsys.readouterr().err
    assert "broken.png" in err and "zero.jpg" in err and "empty" in err


def test_empty_folder_and_missing_input(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["derain", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--checkpoint", str(tiny_ckpt)]) == 1
    assert "holds no images" in capsys.readouterr().err
    assert main(["derain", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bad_checkpoint_message(images, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!")
    assert main(["derain", str(images), "-o", str(tmp_path / "o"), "--checkpoint", str(bad)]) == 1
    assert "not a valid safetensors" in capsys.readouterr().err


def test_eval_and_info(tmp_path, tiny_ckpt, capsys):
    a, b = tmp_path / "pred", tmp_path / "gt"
    a.mkdir()
    b.mkdir()
    img = np.full((16, 16, 3), 100, np.uint8)
    Image.fromarray(img).save(b / "x.png")
    img[..., 1] += 2
    Image.fromarray(img).save(a / "x.png")
    assert main(["eval", "--pred", str(a), "--gt", str(b), "-q"]) == 0
    assert "48.131" in capsys.readouterr().out
    r = tmp_path / "rain"
    r.mkdir()
    img[..., 1] += 20  # the "rain" is 10x the prediction's remaining error
    Image.fromarray(img).save(r / "x.png")
    assert main(["eval", "--pred", str(a), "--gt", str(b), "--rain", str(r), "-q", "--per-image"]) == 0
    out = capsys.readouterr().out
    assert out.count(" 0.091") == 2 and "rain left" in out  # Y moves 1 of 11 levels: 1/11 of the rain kept
    (r / "x.png").rename(r / "y.png")
    assert main(["eval", "--pred", str(a), "--gt", str(b), "--rain", str(r), "-q"]) == 1
    assert "must use the ground truth's file names" in capsys.readouterr().err
    assert main(["info", str(tiny_ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["widths"] == [8, 16] and info["parameters"] > 0


def test_synth_writes_labelled_set(tmp_path, capsys):
    clean = tmp_path / "clean"
    clean.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 130, 3), dtype=np.uint8)).save(clean / "a.png")
    assert main(["synth", str(clean), "-o", str(tmp_path / "syn"), "-n", "3", "--size", "96"]) == 0
    labels = json.loads((tmp_path / "syn" / "labels.json").read_text())
    assert len(labels) == 3 and {"density", "orientation", "intensity", "form", "expert"} <= set(labels["00000.png"])
    assert Image.open(tmp_path / "syn" / "rain" / "00002.png").size == (96, 96)


def test_synth_offers_every_synthesis_style():
    from cliprpn_core.cli import SYNTH_STYLES
    from cliprpn_core.synthesis import STYLES
    assert SYNTH_STYLES == STYLES


def test_train_module_entry_point_is_the_cli(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "cliprpn_core.train_cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: cliprpn train" in r.stdout
    r = subprocess.run([sys.executable, "-m", "cliprpn_core.train_cli", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: config") and "Traceback" not in r.stderr
