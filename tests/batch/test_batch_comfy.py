"""`cliprpn batch` against two real ComfyUI servers with this pack loaded (COMFYUI_DIR points at a
ComfyUI checkout; skipped cleanly without it). CPU, loopback, random ports, killed at the end.
The last test SIGKILLs one server mid-batch and checks every image still comes out exactly once."""
from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliprpn_core import batch as B

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "rain100l" / "rain"


@pytest.fixture
def shots(tmp_path):
    """Rain100L crops (or synthetic images when the data set is absent), small enough for CPU."""
    from batch_helpers import make_images
    folder = tmp_path / "shots"
    if not DATA.is_dir():
        return make_images(folder, 10, size=(96, 64), prefix="shot")
    folder.mkdir()
    out = []
    for p in sorted(DATA.glob("*.png"))[:10]:
        q = folder / p.name
        with Image.open(p) as im:
            im.crop((0, 0, 160, 120)).save(q)
        out.append(q)
    return out


def test_batch_through_two_servers(tmp_path, shots, comfy_servers):
    out = tmp_path / "out"
    urls = [s.url for s in comfy_servers]
    rc = B.main([str(shots[0].parent), "-o", str(out), "--server", urls[0], "--server", urls[1], "-q",
                 "--report", str(tmp_path / "r.json")])
    assert rc == 0, [s.log()[-3000:] for s in comfy_servers]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["counts"] == {"done": len(shots)}
    assert {r["server"] for r in doc["images"]} == set(urls)  # both took work
    assert doc["image_node"] == "1" and doc["output_node"] == "4"
    for p in shots:
        with Image.open(out / p.name) as a, Image.open(p) as b:
            assert a.size == b.size
    # the server ran the same model as the core: compare one image with an in-process run
    from cliprpn_core import default_model_path, load_model
    from cliprpn_core.imageio import read_image, to_uint8
    from cliprpn_core.inference import Derainer
    d = Derainer(load_model(default_model_path()), device="cpu", dtype="fp32")
    ref = to_uint8(d.derain(read_image(shots[0])).images[0]).astype(int)
    got = np.asarray(Image.open(out / shots[0].name).convert("RGB")).astype(int)
    assert np.abs(ref - got).max() <= 2
    # rerun: everything is skipped, nothing is sent
    rc = B.main([str(shots[0].parent), "-o", str(out), "--server", urls[0], "-q"])
    assert rc == 0
    doc = json.loads((out / "batch_report.json").read_text())
    assert doc["summary"]["counts"] == {"skipped": len(shots)}


def test_bad_inputs_and_workflow_errors_against_a_real_server(tmp_path, shots, comfy_servers):
    srv = comfy_servers[0]
    folder = shots[0].parent
    (folder / "zero.png").write_bytes(b"")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    tiny = folder / "tiny.png"  # readable, but the node rejects it (smaller than 8x8): a server-side failure
    Image.new("RGB", (4, 4)).save(tiny)
    out = tmp_path / "out"
    rc = B.main([str(folder), "-o", str(out), "--server", srv.url, "-q", "--retries", "1"])
    assert rc == 3  # some images failed
    rows = {Path(r["input"]).name: r for r in json.loads((out / "batch_report.json").read_text())["images"]}
    assert rows["zero.png"]["status"] == "error" and "empty" in rows["zero.png"]["error"]
    assert rows["broken.jpg"]["status"] == "error" and "not a readable image" in rows["broken.jpg"]["error"]
    assert rows["tiny.png"]["status"] == "failed" and rows["tiny.png"]["attempts"] == 2
    assert "CLIPRPNDerain" in rows["tiny.png"]["error"]
    assert sum(r["status"] == "done" for r in rows.values()) == len(shots)
    assert srv.alive()


def test_full_graph_workflow_polling_and_ctrl_c_against_a_real_server(tmp_path, shots, comfy_servers):
    """Our full-graph workflow (several preview nodes, one SaveImage), followed by polling /history;
    then the CLI is interrupted with SIGINT mid-batch: exit 130, our prompts leave the server's
    queue, no partial file, and a rerun finishes exactly the rest."""
    import subprocess
    import sys
    import time
    srv = comfy_servers[0]
    out = tmp_path / "full"
    rc = B.main([str(shots[0]), str(shots[1]), "-o", str(out), "--server", srv.url, "--workflow", "full_graph",
                 "--no-websocket", "-q"])
    assert rc == 0
    doc = json.loads((out / "batch_report.json").read_text())
    assert doc["output_node"] == "11" and doc["summary"]["counts"] == {"done": 2}
    out = tmp_path / "out"
    repo = Path(B.__file__).resolve().parents[2]
    args = [sys.executable, "-m", "cliprpn_core.batch", str(shots[0].parent), "-o", str(out), "--server", srv.url,
            "--depth", "3", "-q"]
    p = subprocess.Popen(args, cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not list(out.glob("*.png")) and time.time() - t0 < 120:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    first = {q.name for q in out.glob("*.png")}
    assert 1 <= len(first) < len(shots) and not list(out.glob(".*.part"))
    q = srv.get("/queue")
    assert not q["queue_pending"]  # ours were deleted (a running one is interrupted)
    rc = B.main([str(shots[0].parent), "-o", str(out), "--server", srv.url, "-q"])
    assert rc == 0
    doc = json.loads((out / "batch_report.json").read_text())
    assert doc["summary"]["counts"] == {"skipped": len(first), "done": len(shots) - len(first)}
    assert srv.alive()


def test_pattern_and_routing_come_back_from_the_server(tmp_path, shots, comfy_servers):
    """--pattern adds perceiver + router taps to the basic workflow; the full graph has its own.
    Either way the report carries the same pattern and routing as an in-process run."""
    srv = comfy_servers[0]
    two = [str(p) for p in shots[:2]]
    rc = B.main([*two, "-o", str(tmp_path / "a"), "--server", srv.url, "--pattern", "-q"])
    assert rc == 0
    rc = B.main([*two, "-o", str(tmp_path / "b"), "--server", srv.url, "--workflow", "full_graph", "-q"])
    assert rc == 0
    rc = B.main([*two, "-o", str(tmp_path / "c"), "--threads", "1", "--device", "cpu", "--dtype", "fp32", "-q"])
    assert rc == 0
    rows = {k: json.loads((tmp_path / k / "batch_report.json").read_text())["images"] for k in "abc"}
    for i in range(2):
        local = rows["c"][i]
        for k in "ab":
            r = rows[k][i]
            assert r["pattern"] == local["pattern"] and r["routing"] == local["routing"], (k, r, local)
            assert r["perceived_by"] == "pattern-head"
    rc = B.main([*two, "-o", str(tmp_path / "d"), "--server", srv.url, "-q"])  # basic, untouched: no pattern
    assert json.loads((tmp_path / "d" / "batch_report.json").read_text())["images"][0]["pattern"] is None


def test_killing_a_server_mid_batch(tmp_path, shots, comfy_servers, monkeypatch):
    """Runs last in this module: one of the two servers is SIGKILLed after a few images."""
    victim, survivor = comfy_servers
    writes = Counter()
    real = B.write_output
    monkeypatch.setattr(B.scheduler, "write_output", lambda o, dst: (writes.update([Path(dst).name]), real(o, dst)))
    wf, _ = B.load_workflow(None)
    img, outn = B.find_image_node(wf), B.find_output_node(wf)
    backends = [B.ComfyBackend(s.url, wf, img, outn, slots=2, timeout=120) for s in (victim, survivor)]
    killed = []

    def on_done(job, runner):
        if not killed and backends[0].done >= 2 and backends[0].ours >= 1:  # dies with an image in flight
            os.killpg(victim.proc.pid, signal.SIGKILL)
            killed.append(sum(j.status == "done" for j in runner.jobs))
    jobs = B.make_jobs([shots[0].parent], tmp_path / "out")
    r = B.BatchRunner(jobs, backends, retries=0, server_wait=30, probe_interval=60, progress=False,
                      log=lambda m: None, on_done=on_done)
    s = r.run()
    assert killed, "the victim never finished two images"
    assert s["counts"] == {"done": len(shots)}, [j.row() for j in jobs if j.status != "done"]
    assert sorted(writes) == sorted(p.name for p in shots) and set(writes.values()) == {1}
    assert not victim.alive() and survivor.alive()
    assert s["servers"][survivor.url]["done"] >= len(shots) - 2 - 1
    assert sum(j.requeued for j in jobs) >= 1  # the image in flight on the victim moved over
    assert all(j.attempts == 0 for j in jobs)
    assert not list((tmp_path / "out").glob(".*.part"))
