"""`cliprpn batch --backend ray`. The pure parts (one image's status row, one row per job, the stop
reconciliation, the block layout, the options, the missing-Ray error) run without Ray; the rest on a real local
Ray cluster of a head with no CPU and two worker nodes of one CPU each (separate raylets on loopback), skipped
cleanly when Ray is not installed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from batch_helpers import make_images
from PIL import Image

from cliprpn_core import batch as B
from cliprpn_core.batch import ray_backend as R

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes 127.0.0.1 as this node's address


def corrupt(folder: Path) -> Path:
    p = folder / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 4)
    return p


def leftovers(out: Path) -> list[str]:
    """Temp files and the run's control files: a finished or stopped run leaves none."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


# -- without Ray ------------------------------------------------------------------------------------------
class Flaky:
    """A LocalBackend that fails ``fails`` times first."""

    def __init__(self, inner, fails, exc=None):
        self.inner, self.fails, self.exc = inner, fails, exc or RuntimeError("CUDA out of memory")

    def process(self, job):
        if self.fails:
            self.fails -= 1
            raise self.exc
        return self.inner.process(job)


@pytest.fixture
def local(tiny_ckpt):
    return B.LocalBackend(str(tiny_ckpt), device="cpu", threads=1)


def test_run_one_writes_what_the_in_process_path_writes(tmp_path, local):
    src, = make_images(tmp_path / "in", 1, size=(64, 48))
    row = R.run_one(local, 0, str(src), str(tmp_path / "o" / src.name), worker="w")
    assert row["status"] == "done" and row["error"] == "" and row["worker"] == "w" and row["attempts"] == 0
    assert row["pattern"].startswith("density:") and json.loads(row["routing"]) and row["seconds"] > 0
    B.write_output(local.process(B.Job(0, src, None)), tmp_path / "ref.png")
    assert (tmp_path / "o" / src.name).read_bytes() == (tmp_path / "ref.png").read_bytes()
    assert leftovers(tmp_path / "o") == []


def test_run_one_bad_input_retries_and_failures(tmp_path, local):
    src, = make_images(tmp_path / "in", 1, size=(64, 48))
    bad = corrupt(tmp_path / "in")
    row = R.run_one(local, 3, str(bad), str(tmp_path / "o" / bad.name))
    assert row["status"] == "error" and "not a readable image" in row["error"] and row["index"] == 3
    assert not (tmp_path / "o" / bad.name).exists()
    row = R.run_one(Flaky(local, 2), 0, str(src), str(tmp_path / "o" / "a.png"), retries=2)
    assert row["status"] == "done" and row["attempts"] == 2 and (tmp_path / "o" / "a.png").exists()
    row = R.run_one(Flaky(local, 3), 0, str(src), str(tmp_path / "o" / "b.png"), retries=2)
    assert row["status"] == "failed" and row["attempts"] == 3 and row["error"] == "RuntimeError: CUDA out of memory"
    assert not (tmp_path / "o" / "b.png").exists()
    row = R.run_one(Flaky(local, 1, B.BatchError("final", retryable=False)), 0, str(src), str(tmp_path / "o" / "c.png"))
    assert row["status"] == "failed" and row["attempts"] == 1 and row["error"] == "final"


def _row(index, status="done", worker="ray:aaaa/1", **kw):
    return {"index": index, "status": status, "error": kw.get("error", ""), "seconds": 0.5, "exec_seconds": float("nan"),
            "attempts": 0, "pattern": "", "routing": json.dumps({"light_streaks": 1.0}), "perceived_by": "",
            "worker": worker}


def test_row_collector_reports_each_job_once(tmp_path):
    jobs = B.make_jobs([p for p in make_images(tmp_path / "in", 4)], tmp_path / "out")
    c = R.RowCollector(jobs)
    assert c.take(_row(0)) == (jobs[0], True)
    assert c.take(_row(0, worker="ray:bbbb/2")) == (None, False)  # a task Ray ran again
    assert jobs[0].server == "ray:aaaa/1" and jobs[0].exec_seconds is None and jobs[0].routing == {"light_streaks": 1.0}
    assert c.take(_row(1, "failed", error="boom")) == (jobs[1], True)
    assert c.take(_row(1, "done", worker="ray:bbbb/2")) == (jobs[1], False)  # the file is there: say so
    assert jobs[1].status == "done" and jobs[1].error == ""
    assert c.take(_row(1, "failed")) == (None, False)
    assert c.take(_row(2, "interrupted")) == (None, False) and jobs[2].status == "pending"
    assert c.take(_row(99)) == (None, False)
    assert c.duplicates == 3 and dict(c.per_worker) == {"ray:aaaa/1": 1, "ray:bbbb/2": 1}


def test_reconcile_counts_only_fresh_complete_outputs(tmp_path):
    jobs = B.make_jobs(make_images(tmp_path / "in", 3), tmp_path / "out")
    (tmp_path / "out").mkdir()
    for j in jobs:
        j.status = "interrupted"
    since = time.time_ns()
    jobs[0].dst.write_bytes(jobs[0].src.read_bytes())  # written as the run stopped
    jobs[1].dst.write_bytes(b"")  # not an image
    jobs[2].dst.write_bytes(jobs[2].src.read_bytes())
    os.utime(jobs[2].dst, ns=(since - 10**9, since - 10**9))  # there before the run
    assert R.reconcile_stopped(jobs, since) == 1
    assert [j.status for j in jobs] == ["done", "interrupted", "interrupted"] and jobs[0].server == "ray"


@pytest.mark.parametrize("pending, workers, want", [(7, 2, (1, 7)), (100, 4, (1, 100)), (1000, 4, (15, 67)),
                                                    (10**6, 2, (32, 31250))])
def test_block_layout(pending, workers, want):
    assert R.block_layout(pending, workers) == want


def test_wait_not_busy(tmp_path):
    control = tmp_path / ".cliprpn-ray-x"
    busy = Path(str(control) + ".busy-n-1")
    busy.touch()
    threading.Timer(0.3, busy.unlink).start()
    t = time.monotonic()
    assert R.wait_not_busy(control, timeout=10) and time.monotonic() - t >= 0.25
    busy.touch()
    assert not R.wait_not_busy(control, timeout=0.2)
    assert R.clean_control_files(tmp_path) == tmp_path and not busy.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(f"{control}.busy-n-{dead.pid}").touch()  # an actor killed mid-image: its marker never goes away
    t = time.monotonic()
    assert R.wait_not_busy(control, timeout=10) and time.monotonic() - t < 1


def test_actor_starts_an_image_only_while_the_run_flag_is_up(tmp_path, local):
    src, = make_images(tmp_path / "in", 1, size=(64, 48))
    control = tmp_path / "o" / ".cliprpn-ray-x"
    control.parent.mkdir()
    actor = object.__new__(R.DerainActor)  # its __init__ needs a Ray worker; _one needs only these
    actor.backend, actor.worker, actor.settings = local, "w", R.WorkerSettings(checkpoint="", control=str(control))
    actor.run, actor.stop, actor.busy = f"{control}.run", f"{control}.stop", f"{control}.busy-n-{os.getpid()}"
    row = actor._one(0, str(src), str(tmp_path / "o" / "a.png"))  # no run flag: the driver is gone
    assert row["status"] == "interrupted" and not (tmp_path / "o" / "a.png").exists()
    Path(actor.run).touch()
    assert actor._one(1, str(src), str(tmp_path / "o" / "b.png"))["status"] == "done"
    Path(actor.stop).touch()
    assert actor._one(2, str(src), str(tmp_path / "o" / "c.png"))["status"] == "interrupted"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".cliprpn-ray-x.run", ".cliprpn-ray-x.stop", "b.png"]


def test_nothing_pending_needs_no_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing ray fails from here on
    imgs = make_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    for p in imgs:
        (out / p.name).write_bytes(p.read_bytes())
    (out / ".a.png.x1.part").write_bytes(b"half")
    jobs = B.make_jobs([tmp_path / "in"], out)
    s = R.RayRunner(jobs, R.WorkerSettings(), progress=False, log=lambda m: None).run()
    assert s["counts"] == {"skipped": 3} and leftovers(out) == []


def test_without_ray_the_cli_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    make_images(tmp_path / "in", 2)
    rc = B.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--backend", "ray", "-q"])
    assert rc == 2 and "error: Ray is not installed: pip install clip-rpn[ray]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, msg", [
    (["--backend", "servers"], "--backend servers needs at least one --server URL"),
    (["--backend", "ray", "--server", "http://h:1"], "--server is for the servers backend"),
    (["--ray-workers", "2"], "--ray-address and --ray-workers are for --backend ray"),
    (["--backend", "ray", "--device", "mps"], "--backend ray runs on --device auto, cpu or cuda"),
])
def test_backend_options_are_checked_before_any_work(tmp_path, capsys, args, msg):
    make_images(tmp_path / "in", 1)
    rc = B.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q", *args])
    assert rc == 2 and msg in capsys.readouterr().err and not (tmp_path / "out").exists()


# -- on a local Ray cluster of two worker nodes -------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """Head without CPUs + two 1-CPU worker nodes, all on 127.0.0.1, no dashboard; the driver is connected."""
    old = os.environ.get(LOOPBACK_ONLY)
    os.environ[LOOPBACK_ONLY] = "0"  # before ray is imported (its constants) and for the nodes it starts
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster
    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before this fixture set the variable
    small = {"object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **small})
        nodes = [c.add_node(num_cpus=1, **small) for _ in range(2)]
        c.wait_for_nodes(timeout=60)
        ray.init(address=c.address, log_to_driver=False, logging_level="warning")
        yield ray, c, nodes
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = was
        if old is None:
            os.environ.pop(LOOPBACK_ONLY, None)
        else:
            os.environ[LOOPBACK_ONLY] = old


def wait_all_cpus_free(ray, timeout=30):
    """The actors of an earlier run are gone once the cluster's two CPUs are free again."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, f"Ray actors still hold CPUs: {ray.available_resources()}"
        time.sleep(0.1)


def test_two_worker_nodes_each_image_once_same_bytes_as_in_process(tmp_path, tiny_ckpt, cluster, capsys):
    ray, _, nodes = cluster
    wait_all_cpus_free(ray)
    imgs = make_images(tmp_path / "in", 6, size=(64, 48))
    bad = corrupt(tmp_path / "in")
    out, ref = tmp_path / "out", tmp_path / "ref"
    common = [str(tmp_path / "in"), "--checkpoint", str(tiny_ckpt), "--threads", "1", "--device", "cpu", "-q"]
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = 300  # both actors up before the first block, so both nodes get work (slow when loaded)
    try:
        rc = B.main([*common, "-o", str(out), "--backend", "ray", "--ray-workers", "2"])
    finally:
        ctx.wait_for_min_actors_s = -1
    assert rc == 3, capsys.readouterr().err  # one bad input
    doc = json.loads((out / "batch_report.json").read_text())
    rows = doc["images"]
    assert sorted(Path(r["input"]).name for r in rows) == sorted([p.name for p in imgs] + [bad.name])
    assert doc["mode"] == "ray" and doc["ray_workers"] == 2 and doc["summary"]["counts"] == {"done": 6, "error": 1}
    broken, = [r for r in rows if r["status"] != "done"]
    assert broken["input"].endswith("broken.png") and "not a readable image" in broken["error"]
    assert sorted(p.name for p in out.glob("*.png")) == [p.name for p in imgs] and leftovers(out) == []
    nodes_used = {r["server"].split(":")[1].split("/")[0] for r in rows if r["status"] == "done"}
    assert nodes_used == {n.node_id[:8] for n in nodes}  # both worker nodes derained, the CPU-less head none
    assert set(doc["summary"]["servers"]) == {r["server"] for r in rows if r["status"] == "done"}
    assert all(r["pattern"].startswith("density:") and r["routing"] for r in rows if r["status"] == "done")

    assert B.main([*common, "-o", str(ref)]) == 3  # in-process, same settings
    for p in imgs:
        assert (out / p.name).read_bytes() == (ref / p.name).read_bytes(), p.name

    bad.unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    capsys.readouterr()
    assert B.main([*common, "-o", str(out), "--backend", "ray"]) == 0
    assert "0 derained, 6 skipped" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps


def _cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "cliprpn_core.batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_ctrl_c_then_rerun_finishes_exactly_the_rest(tmp_path, tiny_ckpt, cluster, capsys):
    ray, c, _ = cluster
    wait_all_cpus_free(ray)
    imgs = make_images(tmp_path / "in", 16, size=(384, 384))
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "-o", str(out), "--backend", "ray", "--ray-address", c.address,
            "--checkpoint", str(tiny_ckpt), "--threads", "1", "--device", "cpu", "-q"]
    env = {**os.environ, LOOPBACK_ONLY: "0", "OMP_NUM_THREADS": "1"}
    p = _cli(args, env)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.png")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    doc = json.loads((out / "batch_report.json").read_text())
    status = {Path(r["input"]).name: r["status"] for r in doc["images"]}
    assert sorted(status) == [q.name for q in imgs] and doc["summary"]["interrupted"] is True
    done = {n for n, s in status.items() if s == "done"}
    assert set(status.values()) == {"done", "interrupted"}, status
    assert {q.name for q in out.glob("*.png")} == done and leftovers(out) == []  # no temp file, no half output
    assert all(np.asarray(Image.open(out / n)).shape == (384, 384, 3) for n in done)

    wait_all_cpus_free(ray)
    stamps = {n: (out / n).stat().st_mtime_ns for n in done}
    rc = B.main(args)  # the rerun from this process, on the same cluster (it is connected)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"{16 - len(done)} derained, {len(done)} skipped" in err
    assert {q.name for q in out.glob("*.png")} == {q.name for q in imgs} and leftovers(out) == []
    assert {n: (out / n).stat().st_mtime_ns for n in done} == stamps


def test_backends_benchmark_table_and_a_missing_server(tmp_path, capsys):
    from benchmarks import batch_backends as bb
    make_images(tmp_path / "in", 3, size=(64, 48))
    bb.main(["--data", str(tmp_path / "in"), "--limit", "2", "--modes", "inprocess,comfy", "--threads", "1"])
    out = capsys.readouterr().out
    assert "(no --comfy-url: the ComfyUI row is left out)" in out
    head, rule, row = out.strip().splitlines()[-3:]
    assert head.split()[:4] == ["backend", "images", "total", "s"] and set(rule) == {"-"}
    cells = row.split()
    total, rate = float(cells[2]), float(cells[3])
    # total is printed to 0.01 s, so a short run's rate can only be checked against that rounding interval
    assert cells[:2] == ["in-process", "2"] and total > 0
    assert 2 / (total + 0.005) - 0.001 <= rate <= 2 / max(total - 0.005, 1e-9) + 0.001
    with pytest.raises(SystemExit, match="does not answer"):
        bb.main(["--data", str(tmp_path / "in"), "--limit", "1", "--modes", "comfy", "--comfy-url", "http://127.0.0.1:9"])


def test_a_worker_killed_mid_image_is_restarted_and_each_image_still_comes_out_once(tmp_path, tiny_ckpt, cluster,
                                                                                     capsys):
    ray, _, _ = cluster
    wait_all_cpus_free(ray)
    imgs = make_images(tmp_path / "in", 16, size=(384, 384))
    out = tmp_path / "out"
    killed = []

    def kill_a_busy_worker():  # SIGKILL, as the OOM killer or a lost node would: Ray restarts it, reruns its task
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            busy = list(out.glob(".cliprpn-ray-*.busy-*")) if list(out.glob("*.png")) else []
            if busy:
                node, pid = busy[0].name.rsplit("-", 2)[-2:]
                os.kill(int(pid), signal.SIGKILL)
                killed.append((node, int(pid)))
            time.sleep(0.01)
    t = threading.Thread(target=kill_a_busy_worker, daemon=True)
    t.start()
    rc = B.main([str(tmp_path / "in"), "-o", str(out), "--backend", "ray", "--ray-workers", "2", "--checkpoint",
                 str(tiny_ckpt), "--threads", "1", "--device", "cpu", "-q"])
    t.join(timeout=5)
    assert killed, "no worker was caught mid-image"
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "batch_report.json").read_text())["images"]
    assert sorted(Path(r["input"]).name for r in rows) == [q.name for q in imgs]
    assert {r["status"] for r in rows} == {"done"}
    assert sorted(q.name for q in out.glob("*.png")) == [q.name for q in imgs] and leftovers(out) == []
    (node, pid), = killed
    assert any(r["server"].startswith(f"ray:{node}/") and r["server"] != f"ray:{node}/{pid}" for r in rows)


def test_a_bad_checkpoint_is_one_line_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "import_ray", lambda: None)  # Ray itself is never reached
    make_images(tmp_path / "in", 1)
    (tmp_path / "bad.safetensors").write_text("not a model")
    rc = B.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--backend", "ray", "-q",
                 "--checkpoint", str(tmp_path / "bad.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: cannot load the model: ") and "not a valid safetensors file" in err
    assert len(err.strip().splitlines()) == 1


def test_the_report_is_rewritten_as_rows_arrive_but_throttled():
    calls = []
    r = R.RayRunner([], R.WorkerSettings(), progress=False, on_update=calls.append, update_interval=0.0)
    r._maybe_update()
    time.sleep(0.01)  # more than 20x what the update cost: the report may take at most ~5% of the time
    r._maybe_update()
    assert calls == [r, r]
    r = R.RayRunner([], R.WorkerSettings(), progress=False, on_update=calls.append, update_interval=3600.0)
    r._maybe_update()
    assert len(calls) == 3  # the first row writes it, the next ones wait for the interval
    r._maybe_update()
    assert len(calls) == 3
