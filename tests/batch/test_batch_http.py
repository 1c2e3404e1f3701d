"""`cliprpn batch` over HTTP against fake ComfyUI servers (tests/batch/fake_comfy.py): upload,
queue, websocket / polling, download, server loss, retries, rejection, Ctrl-C and resume, and the
in-process CLI with a tiny model. Fast; no ComfyUI needed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cliprpn_core import batch as B

REPO = Path(__file__).resolve().parents[2]


def inverted(p: Path) -> np.ndarray:
    return np.asarray(ImageOps.invert(Image.open(p).convert("RGB")))


def backend(fake, **kw):
    wf, _ = B.load_workflow("basic_derain")
    kw.setdefault("slots", 2)
    kw.setdefault("timeout", 20)
    return B.ComfyBackend(fake.url, wf, B.find_image_node(wf), B.find_output_node(wf), **kw)


def run(jobs, backends, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda m: None)
    r = B.BatchRunner(jobs, backends, **kw)
    return r, r.run()


def test_websocket_client_handshake_frames_ping(fakes):
    fake, = fakes(1)
    ws = B.WebSocket(B.ComfyClient(fake.url).ws_url("abc"), timeout=5)
    try:
        op, payload = ws.recv(timeout=5)
        assert op == 1 and json.loads(payload)["type"] == "status"
        op, payload = ws.recv(timeout=5)
        assert op == 2  # binary preview frame comes through as binary; the ping after it is answered
        fake._send("abc", "progress", {"value": 1, "max": 2, "prompt_id": "p", "text": "x" * 70000})
        op, payload = ws.recv(timeout=5)  # 64-bit length frame
        assert json.loads(payload)["data"]["value"] == 1
        with pytest.raises(OSError):  # socket.timeout when nothing comes
            ws.recv(timeout=0.2)
        fake._send("abc", "executing", {"node": None, "prompt_id": "p"})
        assert json.loads(ws.recv(timeout=5)[1])["type"] == "executing"  # buffer survived the timeout
    finally:
        ws.close()


@pytest.mark.parametrize("use_ws", [True, False], ids=["websocket", "polling"])
def test_images_go_through_the_server_and_come_back_under_their_names(tmp_path, images, fakes, use_ws):
    fake, = fakes(1, websocket=use_ws)
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    be = backend(fake, use_ws=True)  # without a websocket on the server it falls back to polling
    seen = []
    be.progress = lambda job, v, m: seen.append((job.index, v, m))
    r, s = run(jobs, [be])
    assert s["counts"] == {"done": len(images)}
    for j in jobs:
        assert j.dst.name == j.src.name and j.server == fake.url
        assert np.array_equal(np.asarray(Image.open(j.dst).convert("RGB")), inverted(j.src))
        assert j.seconds > 0 and j.exec_seconds is not None
    assert sorted(n.rsplit("/", 1)[-1].split("_", 2)[-1] for n in fake.executed) == [p.name for p in images]
    assert all(k.startswith(B.UPLOAD_SUBFOLDER + "/") for k in fake.inputs)
    assert fake.history == {}  # we clean our history entries
    assert be.use_ws is use_ws and (bool(seen) is use_ws)


def test_work_is_shared_and_foreign_load_is_avoided(tmp_path, fakes):
    from batch_helpers import make_images
    imgs = make_images(tmp_path / "in", 16)
    a, b = fakes(2, delay=0.03)
    b.foreign = 5  # another user's long queue on b
    jobs = B.make_jobs([imgs[0].parent], tmp_path / "out")
    ba, bb = backend(a), backend(b)
    r, s = run(jobs, [ba, bb], depth_interval=0.05)
    assert s["counts"] == {"done": 16}
    # b holds at most one of ours at a time while it is busy with others' work, a takes up to two
    assert s["servers"][a.url]["done"] > s["servers"][b.url]["done"]


def test_killing_a_server_mid_batch_every_image_exactly_once(tmp_path, fakes, monkeypatch):
    from batch_helpers import make_images
    imgs = make_images(tmp_path / "in", 24)
    a, b = fakes(2, delay=0.03)
    writes = Counter()
    real = B.write_output
    monkeypatch.setattr(B.scheduler, "write_output", lambda out, dst: (writes.update([Path(dst).name]), real(out, dst)))

    def on_done(job, runner):
        if sum(j.status == "done" for j in runner.jobs) == 6:
            a.kill()
    jobs = B.make_jobs([imgs[0].parent], tmp_path / "out")
    r, s = run(jobs, [backend(a), backend(b)], on_done=on_done, retries=0, probe_interval=60)
    assert s["counts"] == {"done": 24}
    assert sorted(writes) == [p.name for p in imgs] and set(writes.values()) == {1}
    assert not s["servers"][a.url]["alive"]
    assert all(j.attempts == 0 for j in jobs)
    for j in jobs:
        assert np.array_equal(np.asarray(Image.open(j.dst).convert("RGB")), inverted(j.src))


def test_server_failure_is_retried_then_reported(tmp_path, images, fakes):
    fake, = fakes(1)
    fake.fail = {"img002.png": 1, "img004.png": 9}
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    r, s = run(jobs, [backend(fake)], retries=2)
    by = {j.src.name: j for j in jobs}
    assert by["img002.png"].status == "done" and by["img002.png"].attempts == 1
    assert by["img004.png"].status == "failed" and by["img004.png"].attempts == 3
    assert "CLIPRPNDerain (node 4): RuntimeError: injected failure" in by["img004.png"].error


def test_bad_files_are_not_sent(tmp_path, images, fakes):
    fake, = fakes(1)
    (images[0].parent / "zero.png").write_bytes(b"")
    (images[0].parent / "text.jpg").write_text("not an image")
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    r, s = run(jobs, [backend(fake)])
    assert s["counts"] == {"done": len(images), "error": 2}
    assert not any(k.endswith(("zero.png", "text.jpg")) for k in fake.inputs)


def test_rejected_workflow_is_reported_per_image(tmp_path, images, fakes, monkeypatch):
    fake, = fakes(1)
    monkeypatch.setattr(B.ComfyClient, "upload", lambda self, data, name, sub="": "never/uploaded.png")
    jobs = B.make_jobs([images[0]], tmp_path / "out")
    r, s = run(jobs, [backend(fake)], retries=1)
    assert jobs[0].status == "failed" and jobs[0].attempts == 2
    assert "workflow rejected" in jobs[0].error and "Invalid image file" in jobs[0].error


def test_cli_workflow_without_image_input_is_reported(tmp_path, images, fakes, capsys):
    fake, = fakes(1)
    wf = tmp_path / "noinput.json"
    wf.write_text(json.dumps({"1": {"class_type": "EmptyImage", "inputs": {}},
                              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}))
    rc = B.main([str(images[0].parent), "-o", str(tmp_path / "out"), "--server", fake.url, "--workflow", str(wf), "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no image input" in err
    doc = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    assert {r["status"] for r in doc["images"]} == {"error"} and fake.prompts_seen == 0


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "cliprpn_core.batch", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_cleanly_and_a_rerun_picks_up(tmp_path, fakes, sig):
    from batch_helpers import make_images
    # 40 images at 0.25 s each: a window of ~10 s for the signal to land mid-batch (12 images once finished
    # before a loaded machine's polling loop saw the first result)
    n = 40
    imgs = make_images(tmp_path / "in", n)
    fake, = fakes(1, delay=0.25)
    out = tmp_path / "out"
    args = [str(imgs[0].parent), "-o", str(out), "--server", fake.url, "--report", str(tmp_path / "r.csv"), "-q"]
    p = _cli(args)
    try:
        t0 = time.time()
        # wait for the first result (minutes on a loaded machine: importing torch alone can take long);
        # a signal sent before the CLI runs would only test Python's own KeyboardInterrupt
        while not list(out.glob("*.png")) and time.time() - t0 < 180 and p.poll() is None:
            time.sleep(0.05)
        assert list(out.glob("*.png")), "the batch CLI wrote no result within 3 minutes"
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)  # generous: a loaded machine can starve the clean stop
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "left for a rerun" in err
    done_first = {q.name for q in out.glob("*.png")}
    assert 1 <= len(done_first) < n and not list(out.glob(".*.part"))
    rows = (tmp_path / "r.csv").read_text()
    assert "interrupted" in rows
    time.sleep(0.3)
    assert fake.pending == []  # our queued prompts were deleted
    fake.delay = 0.01
    p = _cli(args)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert {q.name for q in out.glob("*.png")} == {q.name for q in imgs}
    assert f"{len(done_first)} skipped" in err
    for q in imgs:
        assert np.array_equal(np.asarray(Image.open(out / q.name).convert("RGB")), inverted(q))


def test_cli_in_process_with_tiny_model(tmp_path, images, tiny_ckpt, capsys):
    (images[0].parent / "zero.png").write_bytes(b"")
    out = tmp_path / "out"
    rc = B.main([str(images[0].parent), "-o", str(out), "--checkpoint", str(tiny_ckpt), "--threads", "1", "-q",
                 "--device", "cpu"])
    assert rc == 3  # one bad input
    doc = json.loads((out / "batch_report.json").read_text())
    assert doc["mode"] == "in-process" and doc["summary"]["counts"] == {"done": len(images), "error": 1}
    row = next(r for r in doc["images"] if r["status"] == "done")
    assert row["pattern"].startswith("density:") and row["routing"] and row["perceived_by"] == "pattern-head"
    assert Image.open(out / images[0].name).size == Image.open(images[0]).size
    rc = B.main([str(images[0].parent), "-o", str(out), "--checkpoint", str(tiny_ckpt), "--threads", "1", "-q",
                 "--device", "cpu"])
    assert rc == 3 and f"{len(images)} skipped" in capsys.readouterr().err
    out2 = tmp_path / "checked"
    rc = B.main([str(images[0]), "-o", str(out2), "--checkpoint", str(tiny_ckpt), "--threads", "1", "-q",
                 "--device", "cpu", "--check"])
    doc = json.loads((out2 / "batch_report.json").read_text())
    assert rc == 0 and doc["expert_check"] is True and doc["verify_light"] is True
    assert len(doc["images"][0]["routing"]) == 1  # the checked image went through one expert
    rc = B.main([str(images[0]), "-o", str(tmp_path / "unverified"), "--checkpoint", str(tiny_ckpt), "--threads", "1",
                 "-q", "--device", "cpu", "--no-verify"])
    assert rc == 0 and json.loads((tmp_path / "unverified" / "batch_report.json").read_text())["verify_light"] is False
    assert not B.LocalBackend(str(tiny_ckpt), device="cpu", threads=1, verify=False).options.verify


def test_add_batch_parser_registers_the_subcommand():
    import argparse
    p = argparse.ArgumentParser()
    B.add_batch_parser(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["batch", "in", "-o", "out", "--server", "h:1", "--server", "h:2"])
    assert a.fn is B.cmd_batch and a.server == ["h:1", "h:2"] and a.depth == 2 and a.retries == 2


def test_a_hung_server_times_out_and_its_prompt_is_withdrawn(tmp_path, images, fakes):
    fake, = fakes(1)
    fake.freeze = True  # accepts prompts, never runs them
    jobs = B.make_jobs([images[0]], tmp_path / "out")
    r, s = run(jobs, [backend(fake, timeout=1.0)], retries=0)
    assert jobs[0].status == "failed" and "no result within" in jobs[0].error
    assert fake.prompts_seen == 1 and fake.pending == []


def test_wires_into_the_cliprpn_cli(tmp_path, images, tiny_ckpt):
    import argparse

    from cliprpn_core import cli
    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    if "batch" not in sub.choices:  # until cli.build_parser registers it
        B.add_batch_parser(sub)
    args = p.parse_args(["batch", str(images[0].parent), "-o", str(tmp_path / "o"), "--checkpoint", str(tiny_ckpt),
                         "--device", "cpu", "--threads", "1", "-q", "--report", str(tmp_path / "r.csv")])
    assert args.fn is B.cmd_batch
    assert args.fn(args) == 0 and len(list((tmp_path / "o").glob("*.png"))) == len(images)


@pytest.mark.parametrize("kind", ["500", "junk"])
@pytest.mark.parametrize("path", ["/prompt", "/upload/image", "/history/", "/view"])
def test_a_server_answering_500_or_garbage_each_image_comes_out_once(tmp_path, images, fakes, kind, path):
    fake, = fakes(1, websocket=False) if path == "/history/" else fakes(1)
    fake.garbage, fake.garbage_kind = {path: 2}, kind
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    r, s = run(jobs, [backend(fake, use_ws=path != "/history/")], retries=3)
    assert s["counts"] == {"done": len(images)}, [j.error for j in jobs]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(q.name for q in images)
    assert fake.garbage[path] == 0  # the broken answers were really served
    for q in images:  # every output is that image's result (the fake inverts), written once
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / q.name).convert("RGB")), inverted(q))
