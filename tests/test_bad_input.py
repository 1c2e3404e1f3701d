"""Bad input and interruption, command by command: each case asserts the message, the exit code and
that nothing on disk was lost or left half-written.

Exit codes (cliprpn --help): 0 all done, 1 nothing done, 2 bad command line, 3 some images failed,
130 interrupted."""
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliprpn_core import cli
from cliprpn_core.cli import main


def _png(path, h=24, w=32, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _snapshot(root: Path) -> dict:
    """Every file under root with its bytes' hash: what a refused run must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.fixture
def ws(tmp_path):
    """A workspace: in/ with two images, a tiny checkpoint; returns (root, argv prefix builder)."""
    d = tmp_path / "in"
    d.mkdir()
    _png(d / "a.png", seed=1)
    _png(d / "b.png", seed=2)
    return tmp_path


def _derain(ws, *args, ck=None):
    return ["derain", *[str(a) for a in args], "--device", "cpu", "-q"] + (["--checkpoint", str(ck)] if ck else [])


# -- refused before any work: exit 2, nothing written, nothing lost --------------------------------
def _same_stem(ws):
    _png(ws / "in" / "a.jpg", seed=3)
    return [ws / "in", "-o", ws / "out"]


def _mask_clash(ws):
    _png(ws / "in" / "a_mask.png", seed=4)
    return [ws / "in", "-o", ws / "out", "--save-mask"]


def _out_is_input_folder(ws):
    return [ws / "in", "-o", ws / "in"]


def _out_inside_input_folder(ws):
    return [ws / "in", "-o", ws / "in" / "derained"]


def _out_is_a_file(ws):
    (ws / "afile").write_text("keep me")
    return [ws / "in", "-o", ws / "afile"]


def _out_under_a_file(ws):
    (ws / "afile").write_text("keep me")
    return [ws / "in", "-o", ws / "afile" / "sub"]


def _report_over_input(ws):
    return [ws / "in", "-o", ws / "out", "--report", ws / "in" / "a.png"]


REFUSED = [
    # (case, argv builder, message part)
    ("a.jpg and a.png -> one a.png", _same_stem, "a.png (from"),
    ("x.png's mask and x_mask.png", _mask_clash, "a_mask.png (from"),
    ("-o is the input folder", _out_is_input_folder, "is the input folder"),
    ("-o inside the input folder", _out_inside_input_folder, "inside the input folder"),
    ("-o is a file", _out_is_a_file, "is a file, not a folder"),
    ("-o under a file", _out_under_a_file, "cannot create the output folder"),
    ("--report over an input", _report_over_input, "would overwrite the input"),
    ("--tile 8", lambda ws: [ws / "in", "-o", ws / "out", "--tile", "8"], "8 is out of range: use 0 or 128..16384"),
    ("--tile 16", lambda ws: [ws / "in", "-o", ws / "out", "--tile", "16"], "out of range"),
    ("--tile -5", lambda ws: [ws / "in", "-o", ws / "out", "--tile", "-5"], "out of range"),
    ("--tile abc", lambda ws: [ws / "in", "-o", ws / "out", "--tile", "abc"], "'abc' is not a whole number"),
    ("--work-side 10", lambda ws: [ws / "in", "-o", ws / "out", "--work-side", "10"],
     "10 is out of range: use 0 or 64..16384"),
    ("--overlap 200 with --tile 256", lambda ws: [ws / "in", "-o", ws / "out", "--tile", "256", "--overlap", "200"],
     "--overlap 200 is too large for --tile 256"),
    ("--overlap -10", lambda ws: [ws / "in", "-o", ws / "out", "--overlap", "-10"], "-10 is out of range: use 0..512"),
    ("--top-k 0", lambda ws: [ws / "in", "-o", ws / "out", "--top-k", "0"], "0 is out of range: use 1..4"),
    ("--top-k 99", lambda ws: [ws / "in", "-o", ws / "out", "--top-k", "99"], "99 is out of range: use 1..4"),
    ("--expert 7", lambda ws: [ws / "in", "-o", ws / "out", "--expert", "7"], "7 is out of range: use 0..3"),
    ("--expert heavy", lambda ws: [ws / "in", "-o", ws / "out", "--expert", "heavy"],
     "'heavy' is not an expert's index or name; experts: 0 light_streaks, 1 heavy_streaks"),
    ("--passes 99", lambda ws: [ws / "in", "-o", ws / "out", "--passes", "99"], "out of range: use 0 or 1..8"),
    ("--threads -1", lambda ws: [ws / "in", "-o", ws / "out", "--threads", "-1"], "-1 is out of range: use 0 or 1..1024"),
    ("--device foo", lambda ws: [ws / "in", "-o", ws / "out", "--device", "foo"], "unknown device 'foo'"),
]


def _assert_refused(ws, capsys, argv, message):
    """The command exits 2 with ``message``, no traceback, and leaves every file under ws as it was."""
    before = _snapshot(ws)
    with pytest.raises(SystemExit) as e_info:  # argparse's usage errors exit 2 themselves
        raise SystemExit(main(argv))
    assert e_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _snapshot(ws) == before  # nothing written, nothing changed (inputs, files in the way)
    assert not (ws / "out").exists()


@pytest.mark.parametrize("case,build,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_derain_refuses_before_any_work(ws, tiny_ckpt, capsys, case, build, message):
    argv = build(ws)
    _assert_refused(ws, capsys, ["derain", *map(str, argv), "--checkpoint", str(tiny_ckpt), "-q"]
                    + ([] if "--device" in argv else ["--device", "cpu"]), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu(ws, tiny_ckpt, capsys):
    assert main(_derain(ws, ws / "in", "-o", ws / "out", ck=tiny_ckpt)[:-3] + ["--device", "cuda", "-q",
                "--checkpoint", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA GPU on this machine; use cpu" in err and not (ws / "out").exists()


# -- partial failure: exit 3, the good ones done -------------------------------------------------
def test_missing_file_beside_a_good_one_processes_the_good_one(ws, tiny_ckpt, capsys):
    rc = main(_derain(ws, ws / "in" / "a.png", ws / "in" / "gone.png", "-o", ws / "out", "--report",
                      ws / "r.json", ck=tiny_ckpt))
    assert rc == 3
    assert "gone.png does not exist" in capsys.readouterr().err
    assert _visible(ws / "out") == ["a.png"]
    rows = {Path(r["file"]).name: r["status"] for r in json.loads((ws / "r.json").read_text())["images"]}
    assert rows == {"a.png": "ok", "gone.png": "error"}


def test_all_inputs_bad_is_exit_1(ws, tiny_ckpt, capsys):
    (ws / "in" / "a.png").write_bytes(b"")
    (ws / "in" / "b.png").write_bytes(b"\x89PNG broken")
    assert main(_derain(ws, ws / "in", "-o", ws / "out", ck=tiny_ckpt)) == 1
    err = capsys.readouterr().err
    assert "file is empty" in err and "not a readable image" in err


def test_corrupt_checkpoint_is_exit_1_and_writes_nothing(ws, capsys):
    bad = ws / "bad.safetensors"
    bad.write_bytes(b"garbage!")
    assert main(_derain(ws, ws / "in", "-o", ws / "out", ck=bad)) == 1
    assert "not a valid safetensors" in capsys.readouterr().err
    assert _visible(ws / "out") == []


# -- in place on purpose ---------------------------------------------------------------------------
def test_in_place_replaces_only_its_own_originals(ws, tiny_ckpt):
    _png(ws / "in" / "c.jpg", seed=5)
    before = _snapshot(ws / "in")
    assert main(_derain(ws, ws / "in", "-o", ws / "in", "--in-place", ck=tiny_ckpt)) == 0
    after = _snapshot(ws / "in")
    assert after["c.jpg"] == before["c.jpg"] and "c.png" in after  # a jpg original is kept beside its PNG
    assert after["a.png"] != before["a.png"]  # a PNG original is replaced, as asked
    # a rerun does not derain the derained images again
    assert main(_derain(ws, ws / "in", "-o", ws / "in", "--in-place", ck=tiny_ckpt)) == 0
    assert _snapshot(ws / "in") == after


def test_keep_ext_names_outputs_apart(ws, tiny_ckpt):
    _png(ws / "in" / "a.jpg", seed=3)
    assert main(_derain(ws, ws / "in", "-o", ws / "out", "--keep-ext", ck=tiny_ckpt)) == 0
    assert _visible(ws / "out") == ["a.jpg.png", "a.png.png", "b.png.png"]


# -- resume, interruption, hard kills ---------------------------------------------------------------
def test_rerun_skips_complete_unchanged_outputs_and_redoes_changed_ones(ws, tiny_ckpt, capsys):
    out = ws / "out"
    assert main(_derain(ws, ws / "in", "-o", out, ck=tiny_ckpt)) == 0
    first = {n: os.stat(out / n).st_mtime_ns for n in _visible(out)}
    capsys.readouterr()
    assert main(_derain(ws, ws / "in", "-o", out, ck=tiny_ckpt)) == 0
    err = capsys.readouterr().err
    assert "0 derained" in err and "2 skipped (already done)" in err
    assert {n: os.stat(out / n).st_mtime_ns for n in _visible(out)} == first
    _png(ws / "in" / "a.png", seed=9)  # the input changed
    (out / "b.png").write_bytes(b"\x89PNG cut short")  # an output damaged
    assert main(_derain(ws, ws / "in", "-o", out, ck=tiny_ckpt)) == 0
    assert "2 derained" in capsys.readouterr().err
    assert main(_derain(ws, ws / "in", "-o", out, "--passes", "2", ck=tiny_ckpt)) == 0  # other settings: redone
    assert "2 derained" in capsys.readouterr().err


def test_ctrl_c_keeps_finished_outputs_writes_the_report_and_a_rerun_resumes(ws, tiny_ckpt, capsys, monkeypatch):
    from cliprpn_core.inference import Derainer
    _png(ws / "in" / "c.png", seed=6)
    real, calls = Derainer.derain, []

    def derain(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(Derainer, "derain", derain)
    out, rep = ws / "out", ws / "r.json"
    assert main(_derain(ws, ws / "in", "-o", out, "--report", rep, ck=tiny_ckpt)) == 130
    assert "interrupted, rerun the same command to resume" in capsys.readouterr().err
    assert _visible(out) == ["a.png"]
    doc = json.loads(rep.read_text())
    assert doc["interrupted"] is True
    assert {Path(r["file"]).name: r["status"] for r in doc["images"]} == {"a.png": "ok", "b.png": "interrupted",
                                                                         "c.png": "interrupted"}
    assert not list(out.glob(".*.part"))
    monkeypatch.setattr(Derainer, "derain", real)
    assert main(_derain(ws, ws / "in", "-o", out, "--report", rep, ck=tiny_ckpt)) == 0
    assert "2 derained into" in capsys.readouterr().err and _visible(out) == ["a.png", "b.png", "c.png"]


def test_partial_files_of_a_hard_kill_are_removed_on_rerun(ws, tiny_ckpt, capsys):
    out = ws / "out"
    out.mkdir()
    (out / ".a.png.x1y2.part").write_bytes(b"half")
    assert main(_derain(ws, ws / "in", "-o", out, ck=tiny_ckpt)) == 0
    assert "removed 1 partial file(s)" in capsys.readouterr().err
    assert not list(out.glob(".*.part")) and _visible(out) == ["a.png", "b.png"]


# -- what a photo carries: orientation, colour profile, 16 bits -----------------------------------
def test_exif_orientation_is_applied(ws, tiny_ckpt):
    d = ws / "phone"
    d.mkdir()
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(d / "p.jpg", exif=exif.tobytes())
    assert main(_derain(ws, d, "-o", ws / "out", ck=tiny_ckpt)) == 0
    assert Image.open(ws / "out" / "p.png").size == (24, 40)  # shown upright: portrait


def test_icc_profile_is_carried_over(ws, tiny_ckpt):
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    d = ws / "icc"
    d.mkdir()
    Image.open(ws / "in" / "a.png").save(d / "a.png", icc_profile=icc)
    assert main(_derain(ws, d, "-o", ws / "out", ck=tiny_ckpt)) == 0
    assert Image.open(ws / "out" / "a.png").info.get("icc_profile") == icc


def test_16_bit_gray_is_read_at_full_precision_and_written_as_8_bit(ws, tiny_ckpt):
    from cliprpn_core.imageio import read_image
    d = ws / "deep"
    d.mkdir()
    a = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)
    Image.fromarray(a).save(d / "g.png")
    x = read_image(d / "g.png")
    assert x.shape == (1, 24, 32) and torch.allclose(x[0], torch.from_numpy(a / 65535.0).float(), atol=1e-6)
    assert main(_derain(ws, d, "-o", ws / "out", ck=tiny_ckpt)) == 0
    assert Image.open(ws / "out" / "g.png").mode == "L"


# -- eval, synth, train ------------------------------------------------------------------------------
def _eval_dirs(ws):
    p, g = ws / "pred", ws / "gt"
    p.mkdir()
    g.mkdir()
    _png(g / "x.png")
    return p, g


def test_eval_corrupt_prediction(ws, capsys):
    p, g = _eval_dirs(ws)
    (p / "x.png").write_bytes(b"\x89PNG broken")
    assert main(["eval", "--pred", str(p), "--gt", str(g), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"prediction {p / 'x.png'} is not a readable image" in err and "Traceback" not in err


def test_eval_prediction_of_another_size(ws, capsys):
    p, g = _eval_dirs(ws)
    _png(p / "x.png", h=20)
    assert main(["eval", "--pred", str(p), "--gt", str(g), "-q"]) == 1
    assert "must keep the ground truth's size" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--size", "0"], "0 is out of range: use 32..4096"),
    (["-n", "0"], "0 is out of range"),
    (["--seed", "-1"], "-1 is out of range: use >= 0"),
])
def test_synth_bad_values(ws, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["synth", str(ws / "in"), "-o", str(ws / "syn"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err and not (ws / "syn").exists()


def test_synth_skips_an_unreadable_photo(ws, capsys):
    c = ws / "clean"
    c.mkdir()
    _png(c / "ok.png", h=120, w=130)
    (c / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["synth", str(c), "-o", str(ws / "syn"), "-n", "2", "--size", "64"]) == 0
    assert "warning: skipped 1 unreadable image(s)" in capsys.readouterr().err
    assert len(json.loads((ws / "syn" / "labels.json").read_text())) == 2


@pytest.mark.parametrize("override,message", [
    ("steps=abc", "training option steps must be a whole number, got 'abc'"),
    ("lr=fast", "training option lr must be a number, got 'fast'"),
    ("no_such_option=1", "unknown training options ['no_such_option']"),
])
def test_train_bad_options(ws, capsys, override, message):
    assert main(["train", override, f"out_dir={json.dumps(str(ws / 'run'))}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (ws / "run").exists()


def test_train_ctrl_c_says_so_and_resumes(ws, capsys, monkeypatch):
    from test_train import TINY

    from cliprpn_core.train import Trainer
    c = ws / "clean"
    c.mkdir()
    for i in range(2):
        _png(c / f"c{i}.png", h=64, w=64, seed=i)
    argv = ["train", f"out_dir={json.dumps(str(ws / 'run'))}", f"clean_dirs={json.dumps([str(c)])}",
            f"model={json.dumps(TINY)}", "batch_size=2", "patch_size=32", "steps=4", "log_every=1", "ckpt_every=100"]
    real = Trainer.train_step

    def step_then_ctrl_c(self):
        logs = real(self)
        if self.step == 2:
            self._on_signal()  # what the SIGINT handler does
        return logs
    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2 of 4" in err and "run the same command again to resume" in err
    assert (ws / "run" / "state.safetensors").exists() and not list((ws / "run").glob("*.part"))
    monkeypatch.setattr(Trainer, "train_step", real)
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith("model.safetensors")
    assert [json.loads(x)["step"] for x in (ws / "run" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_exit_codes_are_documented():
    text = io.StringIO()
    cli.build_parser().print_help(text)
    flat = " ".join(text.getvalue().split())
    assert "2 bad command line" in flat and "3 some images failed" in flat and "130 interrupted" in flat


# -- cliprpn batch: the same discipline ----------------------------------------------------------------
BATCH_REFUSED = [
    ("-o is the input folder", lambda ws: [ws / "in", "-o", ws / "in"], "is the input folder"),
    ("-o is a file", lambda ws: [ws / "in", "-o", ws / "afile"], "is a file, not a folder"),
    ("--device foo", lambda ws: [ws / "in", "-o", ws / "out", "--device", "foo"], "unknown device 'foo'"),
    ("--depth 0", lambda ws: [ws / "in", "-o", ws / "out", "--depth", "0"], "0 is out of range: use 1..64"),
    ("--retries -1", lambda ws: [ws / "in", "-o", ws / "out", "--retries", "-1"], "-1 is out of range"),
    ("--timeout 0", lambda ws: [ws / "in", "-o", ws / "out", "--timeout", "0"], "must be more than 0 seconds"),
    ("--tile 8", lambda ws: [ws / "in", "-o", ws / "out", "--tile", "8"], "8 is out of range: use 0 or 128..16384"),
]


@pytest.mark.parametrize("case,build,message", BATCH_REFUSED, ids=[c[0] for c in BATCH_REFUSED])
def test_batch_refuses_before_any_work(ws, tiny_ckpt, capsys, case, build, message):
    (ws / "afile").write_text("keep me")
    _assert_refused(ws, capsys, ["batch", *map(str, build(ws)), "--checkpoint", str(tiny_ckpt), "-q"], message)
