"""The benchmark scripts' own logic (not their figures): which runs count as finished, and the table.
They are modules of the ``benchmarks`` package (``python -m benchmarks.NAME`` from the repository root)."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))


def _load(name):
    return importlib.import_module(f"benchmarks.{name}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_runs_as_a_module(name):
    """`python -m benchmarks.NAME --help` from the repository root: imports resolve without sys.path edits."""
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_benchmarks_edit_no_sys_path_and_import_no_private_names():
    import re
    for p in (ROOT / "benchmarks").glob("*.py"):
        text = p.read_text()
        assert "sys.path" not in text, p.name
        assert not re.search(r"^from \S+ import .*\b_[a-z]", text, re.MULTILINE), p.name


def _fake_run(out, tiny_model, preset, seed, steps, trained, psnr):
    from cliprpn_core import save_model
    d = out / f"{preset}_s{seed}"
    d.mkdir(parents=True)
    save_model(tiny_model, d / "model.safetensors",
               {"trained_steps": trained, "train_config": {"loss_preset": preset, "seed": seed, "steps": steps}})
    if psnr is not None:
        ev = {"x": {"rain100l": {"routed": {"psnr": psnr, "ssim": 0.9, "rain_left": 0.3}}}}
        (out / f"{preset}_s{seed}.eval.json").write_text(json.dumps(ev))
    return d / "model.safetensors"


def test_loss_ablation_finished_runs_and_table(tmp_path, tiny_model, capsys):
    la = _load("loss_ablation")
    m = _fake_run(tmp_path, tiny_model, "charbonnier", 0, 5, 5, 30.0)
    _fake_run(tmp_path, tiny_model, "charbonnier", 1, 5, 5, 31.0)
    _fake_run(tmp_path, tiny_model, "dwa", 0, 5, 5, 32.0)
    _fake_run(tmp_path, tiny_model, "dwa", 1, 5, 3, 33.0)  # interrupted at step 3: not finished
    assert la.finished(m, "charbonnier", 0, 5)
    assert not la.finished(m, "charbonnier", 1, 5)  # another seed's run
    assert not la.finished(m, "charbonnier", 0, 600)  # another budget
    assert not la.finished(tmp_path / "missing.safetensors", "charbonnier", 0, 5)

    rc = la.main(["--presets", "charbonnier", "dwa", "--steps", "5", "--out", str(tmp_path), "--eval-only"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {line.split("`")[1]: line for line in out.splitlines() if line.startswith("| `")}
    assert "30.00 / 0.900 | 31.00 / 0.900 | 30.50 | 0.900 |" in rows["charbonnier"]
    # one seed unfinished: its cell and the means stay empty instead of averaging one seed
    assert "32.00 / 0.900 | – | – | – |" in rows["dwa"]
    assert "fixed: 1 charbonnier" in rows["charbonnier"] and "dwa: 1 charbonnier + 0.2 ssim" in rows["dwa"]


def test_evaluate_one_forced_expert_in_place_of_routing(tmp_path, tiny_ckpt):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for sub in ("rain", "gt"):
        (tmp_path / "data" / "mini" / sub).mkdir(parents=True)
    for i in range(2):
        gt = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(gt).save(tmp_path / "data" / "mini" / "gt" / f"{i}.png")
        Image.fromarray(np.clip(gt.astype(int) + 40, 0, 255).astype(np.uint8)).save(
            tmp_path / "data" / "mini" / "rain" / f"{i}.png")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.evaluate", str(tiny_ckpt), "--sets", "mini", "--data",
           str(tmp_path / "data"), "--threads", "1", "--expert", "raindrops"]
    r = subprocess.run(cmd + ["--json", str(tmp_path / "r.json")], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())[str(tiny_ckpt)]["mini"]
    assert list(res) == ["forced_raindrops"] and res["forced_raindrops"]["routing"] == {"raindrops": 2}
    bad = subprocess.run(cmd + ["--experts"], cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not go with" in bad.stderr


def test_evaluate_oracle_expert():
    ev = _load("evaluate")
    res = {"routed": {"per_image_psnr": {"a.png": 30.0, "b.png": 20.0, "c.png": 25.0},
                      "per_image_expert": {"a": "light_streaks", "b": "light_streaks", "c": "veil"}},
           "forced_light_streaks": {"per_image_psnr": {"a.png": 30.0, "b.png": 20.0, "c.png": 24.0}},
           "forced_heavy_streaks": {"per_image_psnr": {"a.png": 29.0, "b.png": 23.0, "c.png": 26.0}}}
    o = ev.oracle(res)
    assert o["psnr"] == round((30.0 + 23.0 + 26.0) / 3, 3)
    assert o["best_expert"] == {"light_streaks": 1, "heavy_streaks": 2}
    assert o["routed_chose_best"] == 1  # only a.png went to its best expert
    with pytest.raises(ValueError, match="--experts"):
        ev.oracle({"routed": res["routed"]})


def test_expert_probe_psnr_matches_the_protocol_metric():
    import numpy as np
    import torch
    from cliprpn_core.metrics import psnr_y
    ep = _load("expert_probe")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    got = ep.y_psnr_8bit(a, b)
    u8 = lambda t: (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # noqa: E731
    want = [psnr_y(u8(a[i]), u8(b[i])) for i in range(2)]
    assert np.allclose(got.numpy(), want, atol=1e-3)


def test_routing_check_measures_what_the_check_decides(tiny_model):
    import numpy as np
    import torch
    from cliprpn_core import Derainer
    from cliprpn_core.inference import DerainOptions, check_choice
    rc = _load("routing_check")
    from cliprpn_core.imageio import to_uint8
    d = Derainer(tiny_model)
    g = torch.Generator().manual_seed(0)
    x, clean = torch.rand(3, 32, 48, generator=g), torch.rand(3, 32, 48, generator=g)
    row = rc.measure(d, x, to_uint8(clean))
    assert len(row["experts"]) == 2 and len(set(row["experts"])) == 2
    for bias in ([6.0, 6.0, -6.0, -6.0], [-6.0, 6.0, 7.0, -6.0]):  # streak experts first (checked), or not
        with torch.no_grad():
            d.model.router.linear.bias.copy_(torch.tensor(bias))
        row = rc.measure(d, x, to_uint8(clean))
        assert row["checked"] == (bias[0] > 0) and len(row["residual"]) == 2
        for t in (1e-9, 0.5, 1.0, 1e9):
            want = row["experts"][rc.decide(row, t)]
            assert int(d.derain(x, DerainOptions(check=True, check_ratio=t)).routing[0].argmax()) == want
    assert rc.decide(row, 1e9) == 0 and rc.decide(row, 1e9, every_pair=True) == check_choice(row["residual"], 1e9)
    row["checked"] = True
    rows = [row, {"experts": [0, 1], "checked": True, "residual": [0.02, 0.009], "psnr": [30.0, 33.0]},
            {"experts": [0, 1], "checked": True, "residual": [0.02, 0.016], "psnr": [35.0, 31.0]}]
    s = rc.summarize(rows)
    assert s["n"] == 3 and s["best"] >= max(s[t] for t in rc.RATIOS)
    switched = [s[f"switched@{t}"] for t in rc.RATIOS]
    assert switched == sorted(switched)  # a larger ratio never switches fewer images
    assert np.isclose(s[0.5], np.mean([row["psnr"][check_choice(row["residual"], 0.5)], 33.0, 35.0]))


def test_expert_fusion_rules():
    import numpy as np
    import torch
    from cliprpn_core.metrics import psnr_y
    ef = _load("expert_fusion")
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 16, 16, generator=g)
    u8 = lambda t: (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # noqa: E731
    light, heavy = (clean + 0.1 * torch.rand(3, 16, 16, generator=g)).clamp(0, 1), clean * 0.9
    L, H = ef.LIGHT, ef.HEAVY
    row = {"cands": [L, H], "clean": u8(clean), "m_in": torch.zeros(16, 16),
           L: {"out": light, "res": torch.full((16, 16), 0.5), "psnr": psnr_y(u8(light), u8(clean))},
           H: {"out": heavy, "res": torch.full((16, 16), 0.1), "psnr": psnr_y(u8(heavy), u8(clean))}}
    row["top1"] = row[L]["psnr"]
    # the check keeps the heavy output (0.1 < 0.4 * 0.5), whole-image, also in "check+fuse"
    assert ef.check_pick(row) == H
    assert ef.rule_psnr(row, ("check", None, 0, 0)) == row[H]["psnr"]
    assert ef.rule_psnr(row, ("check+fuse", "avg", 0.5, 0)) == row[H]["psnr"]
    # fusing: weight 0 is the light output, weight 1 the heavy one, pix weights follow the residual difference
    assert ef.rule_psnr(row, ("fuse all", "avg", 0.0, 0)) == row[L]["psnr"]
    assert ef.rule_psnr(row, ("fuse all", "avg", 1.0, 0)) == row[H]["psnr"]
    assert torch.allclose(ef.weight(row, "pix", 2.0, 2), torch.full((16, 16), 0.8))
    assert ef.rule_psnr(row, ("fuse all", "inmask", 4, 3)) == row[L]["psnr"]  # no rain in the input mask
    # not checked: top-1 in every rule
    assert ef.rule_psnr({"cands": [L], "top1": 12.5}, ("fuse all", "avg", 1.0, 0)) == 12.5
    # the blur keeps a constant map and spreads a point symmetrically
    w = torch.zeros(15, 15)
    w[7, 7] = 1.0
    b = ef.gaussian_blur(w, 2)
    assert np.isclose(float(b.sum()), 1.0, atol=1e-5) and torch.allclose(b, b.flip(0).flip(1))
    assert torch.allclose(ef.gaussian_blur(torch.full((9, 9), 0.3), 2), torch.full((9, 9), 0.3))


def _clean_photos(tmp_path, seed):
    """Two random 120 x 112 'clean photos' in tmp_path/clean (the backgrounds of a labelled synthetic set)."""
    import numpy as np
    from PIL import Image
    clean = tmp_path / "clean"
    clean.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (112, 120, 3), dtype=np.uint8)).save(clean / f"{i}.png")
    return clean


def test_synthetic_regimes_groups_by_label(tmp_path, tiny_model):
    import numpy as np
    from cliprpn_core import Derainer
    from cliprpn_core.data import write_labelled_set
    sr = _load("synthetic_regimes")
    clean = _clean_photos(tmp_path, seed=0)
    labels = write_labelled_set([clean], tmp_path / "set", 6, 96, seed=3, progress=False)
    # the same seed writes the same set
    again = write_labelled_set([clean], tmp_path / "again", 6, 96, seed=3, progress=False)
    assert again == labels and (tmp_path / "set" / "rain" / "00005.png").read_bytes() == \
        (tmp_path / "again" / "rain" / "00005.png").read_bytes()
    d = Derainer(tiny_model)
    res = sr.evaluate(d, tmp_path / "set", labels)
    assert res["all"]["n"] == 6 and sum(res["routing"].values()) == 6
    assert sum(v["n"] for k, v in res.items() if k not in ("all", "routing")) == 6
    forced = sr.evaluate(d, tmp_path / "set", labels, expert=2)  # every image through the raindrops expert
    assert forced["routing"] == {"raindrops": 6} and forced["all"]["n"] == 6
    # 'all' is the plain mean of the protocol metric over every image
    rows = [{"name": "a", "psnr": 30.0, "ssim": 0.9}, {"name": "b", "psnr": 20.0, "ssim": 0.5},
            {"name": "c", "psnr": 25.0, "ssim": 0.7}]
    lab = {"a": {"expert": "veil"}, "b": {"expert": "light_streaks"}, "c": {"expert": "veil"}}
    g = sr.by_regime(rows, lab, {"a": "veil", "b": "veil", "c": "light_streaks"})
    assert g["veil"] == {"n": 2, "psnr": 27.5, "ssim": 0.8, "routed_to_label": 0.5}
    assert g["light_streaks"]["routed_to_label"] == 0.0 and g["all"]["psnr"] == 25.0
    assert np.isclose(g["all"]["routed_to_label"], 1 / 3, atol=1e-3)
    assert list(g) == ["light_streaks", "veil", "all"]


def test_synthetic_regimes_writes_the_set_in_the_style_asked_for(tmp_path, tiny_ckpt, monkeypatch):
    import json

    from cliprpn_core.data import write_labelled_set
    sr = _load("synthetic_regimes")
    clean = _clean_photos(tmp_path, seed=1)
    written = {}

    def write(clean_dirs, out, count, size, seed, style="classic"):
        labels = write_labelled_set(clean_dirs, out, count, size, seed, style=style, progress=False)
        written[style] = {n: (Path(out) / "rain" / n).read_bytes() for n in labels}, labels
        return labels

    monkeypatch.setattr(sr, "write_labelled_set", write)
    sets = {}
    for style in ("classic", "downpour"):
        out = tmp_path / f"{style}.json"
        monkeypatch.setattr(sys, "argv", ["synthetic_regimes", str(tiny_ckpt), "--clean", str(clean), "-n", "12",
                                          "--size", "96", "--seed", "5", "--style", style, "--threads", "1",
                                          "--json", str(out)])
        sr.main()
        sets[style] = json.loads(out.read_text())
    assert "downpour" in sets["downpour"]["set"] and "style" not in sets["classic"]["set"]
    assert sets["downpour"]["results"][str(tiny_ckpt)]["routed"]["all"]["n"] == 12
    # each run wrote its set in its own style: the same seed, other rain once a heavy-streak image is drawn
    (ci, cl), (di, dl) = written["classic"], written["downpour"]
    first = min(n for n, v in dl.items() if v["expert"] == "heavy_streaks")
    assert all(ci[n] == di[n] for n in dl if n < first) and ci[first] != di[first]


def test_speed_timing_reports_median_and_fastest(monkeypatch):
    from benchmarks import speed
    clock = iter([0.0, 3.0, 10.0, 12.0, 20.0, 24.0])  # three runs lasting 3, 2 and 4 seconds
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(clock))
    calls = []
    assert speed.timed(lambda: calls.append(1), 3) == (3.0, 2.0)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="--repeats"):
        speed.timed(lambda: None, 0)


def test_perception_scale_counts_routes_per_factor_against_the_native_size(tmp_path, tiny_ckpt, monkeypatch):
    import numpy as np
    from PIL import Image
    ps = _load("perception_scale")
    rng = np.random.default_rng(0)
    for folder, n in ((tmp_path / "paired" / "rain", 3), (tmp_path / "photos", 2)):  # a paired set, a plain folder
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    monkeypatch.setattr(ps, "DATA", tmp_path)
    res = ps.main(["--checkpoint", str(tiny_ckpt), "--sets", "paired", "photos", "--factors", "2",
                   "--threads", "1", "--json", str(tmp_path / "r.json")])
    assert res["factors"] == [1.0, 2.0]  # the native size is always measured: agreement is counted against it
    for name, n in (("paired", 3), ("photos", 2)):
        rows = res["sets"][name]["by_factor"]
        assert res["sets"][name]["images"] == n and list(rows) == ["x1", "x2"]
        assert rows["x1"]["as_native"] == n and 0 <= rows["x2"]["as_native"] <= n
        assert all(sum(r["experts"].values()) == n for r in rows.values())
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(res))
    with pytest.raises(SystemExit, match="no data set 'absent'"):
        ps.main(["--checkpoint", str(tiny_ckpt), "--sets", "absent"])


def test_large_photos_scores_both_ways_on_upscaled_pairs(tmp_path, tiny_ckpt, monkeypatch):
    import numpy as np
    from PIL import Image
    lp = _load("large_photos")
    rng = np.random.default_rng(0)
    for sub in ("rain", "gt"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
        for i in range(2):
            img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "pairs" / sub / f"{i}.png")
    monkeypatch.setattr(lp, "DATA", tmp_path)
    monkeypatch.setattr(lp, "WAYS", {"working size": lp.DerainOptions(work_side=64),  # 40 x 56 upscaled 2x: above it
                                     "full size": lp.DerainOptions(work_side=0)})
    res = lp.main(["--checkpoint", str(tiny_ckpt), "--sets", "pairs", "--factors", "2", "--n", "0", "--threads", "1"])
    row = res["sets"]["pairs"]["x2"]
    assert row["images"] == 2 and set(row) >= {"input", "working size", "full size"}
    assert row["working size"] != row["full size"]  # two different restorations of the same upscaled pairs
    assert all(0 < row[w]["ssim"] <= 1 and row[w]["psnr"] > 0 for w in ("input", "working size", "full size"))
    with pytest.raises(SystemExit, match="no paired set 'absent'"):
        lp.main(["--checkpoint", str(tiny_ckpt), "--sets", "absent"])


def test_perception_draws_the_chosen_style_and_counts_every_image(tmp_path, tiny_ckpt, monkeypatch):
    import numpy as np
    from PIL import Image
    pc = _load("perception")
    rng = np.random.default_rng(0)
    (tmp_path / "clean").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / "clean" / f"{i}.png")
    monkeypatch.setattr(pc, "DATA", tmp_path)
    args = ["--checkpoint", str(tiny_ckpt), "--n", "32", "--size", "64", "--threads", "1"]
    classic, pour = pc.main(args), pc.main(args + ["--style", "downpour"])
    assert (classic["style"], pour["style"]) == ("classic", "downpour")
    for res in (classic, pour):
        conf = res["router_confusion_rows_true_cols_chosen"]
        assert res["images"] == 32 and sum(map(sum, conf)) == 32
        assert all(0 <= v <= 1 for v in res["accuracy"].values())
    assert pc.main(args) == classic  # a fixed seed: the same rain, the same figures
    assert pour != classic  # the heavy images are drawn another way (and the draws after them move)
    with pytest.raises(SystemExit):
        pc.main(args + ["--style", "drizzle"])


def test_speed_default_path_perceives_then_restores_with_the_light_network(tiny_model):
    """The speed figures time the path of a photo the router sends to the light-streaks network, not wherever a
    random image happens to be routed."""
    from benchmarks import speed
    from cliprpn_core import Derainer
    from cliprpn_core.patterns import EXPERTS
    d = Derainer(tiny_model)
    seen = []
    perceive = d.perceive
    d.perceive = lambda x, *a, **k: seen.append(x.shape) or perceive(x, *a, **k)
    r = speed.default_path(d, torch.rand(1, 3, 40, 48), speed.FULL)
    assert seen == [(1, 3, 40, 48)] and r.images.shape == (1, 3, 40, 48)
    assert r.routing.tolist() == [[float(e == "light_streaks") for e in EXPERTS]]



def test_speed_times_and_counts_the_handover_network(tiny_network_model):
    """--per-expert times the handover network (forced, as `--expert handover` forces it) beside the four experts, and
    its FLOPs are counted, in a model that has one; a model without one lists the four experts only."""
    from benchmarks import speed
    from cliprpn_core import Derainer
    from cliprpn_core.arch import with_handover_network
    x = torch.rand(1, 3, 40, 48)
    d = Derainer(with_handover_network(tiny_network_model), device="cpu", dtype="fp32")
    per = speed.per_network_times(d, x, 1)
    assert list(per) == ["light_streaks", "heavy_streaks", "raindrops", "veil", "handover"]
    assert all(v[0] > 0 for v in per.values())
    assert list(speed.per_network_times(Derainer(tiny_network_model, device="cpu", dtype="fp32"), x, 1)) == \
        ["light_streaks", "heavy_streaks", "raindrops", "veil"]
    experts, handover = speed.per_network_flops(d.model, torch.rand(1, 3, 32, 32))
    assert len(experts) == 4 and handover == experts[1] > 0  # a copy of the heavy network
    assert speed.per_network_flops(tiny_network_model, torch.rand(1, 3, 32, 32))[1] is None


def test_speed_flops_only_prints_sizes_and_flops_without_timing(tiny_ckpt, monkeypatch, capsys):
    """--flops-only prints the parameters and FLOPs per pixel (the same on any machine) and times nothing."""
    from benchmarks import speed
    monkeypatch.setattr(speed, "timed", lambda *a, **k: pytest.fail("--flops-only timed something"))
    monkeypatch.setattr(speed.sys, "argv", ["speed", "--checkpoint", str(tiny_ckpt), "--flops-only", "--threads", "1"])
    speed.main()
    res = json.loads(capsys.readouterr().out)
    assert res["checkpoint"] == str(tiny_ckpt)
    assert len(res["flops_per_pixel_per_expert"]) == len(res["parameters_per_expert"]) == 4
    assert all(f > 0 for f in res["flops_per_pixel_per_expert"]) and res["flops_per_pixel_restore_top1"] > 0
    assert not any(k.startswith("seconds") or k.startswith("peak") for k in res)
