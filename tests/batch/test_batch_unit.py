"""Unit tests of `cliprpn batch`: inputs, workflow rewriting, scheduling, retry, server loss,
resume, stop, reports. No ComfyUI needed (fake backends and a fake HTTP server)."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliprpn_core import batch as B

REPO = Path(__file__).resolve().parents[2]
API = REPO / "workflows" / "api"


# -- inputs --------------------------------------------------------------------------------
def test_collect_folder_glob_and_list_file(tmp_path, images):
    folder = images[0].parent
    (folder / "notes.txt").write_text("x")  # not an image: ignored in a folder
    got = [p for p, prob in B.collect_inputs([folder])]
    assert got == images
    got = [p for p, _ in B.collect_inputs([str(folder / "img00[12].png")])]
    assert [p.name for p in got] == ["img001.png", "img002.png"]
    lst = tmp_path / "frames.lst"
    lst.write_text("# frames\nin/img003.png\n\n%s\nin/missing.png\n" % images[4])
    got = B.collect_inputs([lst])
    assert [p.name for p, _ in got] == ["img003.png", "img004.png", "missing.png"]
    assert got[0][1] == "" and "does not exist" in got[2][1]
    # duplicates collapse; a missing input becomes a per-image problem, not an exception
    got = B.collect_inputs([images[0], folder, tmp_path / "nope", str(tmp_path / "*.jpg")])
    assert len([p for p, prob in got if not prob]) == len(images)
    problems = [prob for _, prob in got if prob]
    assert any("does not exist" in p for p in problems) and any("matches no files" in p for p in problems)


def test_make_jobs_names_and_collisions(tmp_path, images):
    other = tmp_path / "b"
    other.mkdir()
    (other / "img000.png").write_bytes(images[0].read_bytes())
    jobs = B.make_jobs([images[0].parent, other], tmp_path / "out")
    assert [j.dst.name for j in jobs[:len(images)]] == [p.name for p in images]
    assert jobs[-1].status == "error" and "already taken" in jobs[-1].error
    jobs = B.make_jobs([images[0]], tmp_path / "out", fmt="jpg")
    assert jobs[0].dst.name == "img000.jpg"


# -- workflows -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(API.glob("*.json")), ids=lambda p: p.stem)
def test_our_workflows_have_one_image_input(path):
    wf, origin = B.load_workflow(str(path))
    node = B.find_image_node(wf)
    assert wf[node]["class_type"] == "LoadImage"
    out = B.find_output_node(wf)
    assert wf[out]["class_type"] == "SaveImage"


def test_load_workflow_by_name_and_rewrite_is_a_copy():
    wf, origin = B.load_workflow("basic_derain")
    assert origin.endswith("clip_rpn_basic_derain.json")
    assert B.load_workflow(None)[1] == origin
    before = json.dumps(wf, sort_keys=True)
    img, out = B.find_image_node(wf), B.find_output_node(wf)
    new = B.rewrite_workflow(wf, img, "cliprpn_batch/x_001.png", out, "cliprpn_batch/run_1_x")
    assert json.dumps(wf, sort_keys=True) == before
    assert new[img]["inputs"]["image"] == "cliprpn_batch/x_001.png"
    assert new[out]["inputs"]["filename_prefix"] == "cliprpn_batch/run_1_x"
    assert new["3"]["inputs"]["image"] == ["1", 0]  # links untouched


def test_workflow_errors_are_clear(tmp_path):
    with pytest.raises(B.WorkflowError, match="UI .saved. workflow"):
        B.check_workflow({"nodes": [], "links": [], "version": 0.4}, "x.json")
    with pytest.raises(B.WorkflowError, match="not an API-format"):
        B.check_workflow({"a": 1})
    with pytest.raises(B.WorkflowError, match="neither a file nor one of ours"):
        B.load_workflow("no_such_workflow")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(B.WorkflowError, match="not readable JSON"):
        B.load_workflow(str(bad))
    no_input = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(B.WorkflowError, match="no image input"):
        B.find_image_node(no_input)
    two = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
           "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
           "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}}
    with pytest.raises(B.WorkflowError, match="several image inputs"):
        B.find_image_node(two)
    assert B.find_image_node(two, "2") == "2"
    with pytest.raises(B.WorkflowError, match="no such node"):
        B.find_image_node(two, "9")
    with pytest.raises(B.WorkflowError, match="several SaveImage"):
        B.find_output_node(two)
    assert B.find_output_node(two, 4) == "4"
    # a custom loader node with a file-name 'image' input is found too; PreviewImage as output
    custom = {"7": {"class_type": "VHS_LoadImagePath", "inputs": {"image": "x.png"}},
              "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}}
    assert B.find_image_node(custom) == "7" and B.find_output_node(custom) == "8"
    # a saved POST /prompt body is accepted
    assert B.check_workflow({"prompt": two, "client_id": "x"}) == two


# -- scheduling ----------------------------------------------------------------------------
class Stub(B.Backend):
    def __init__(self, name, slots=2, ours=0, foreign=0, alive=True, done=0):
        super().__init__()
        self.name, self.slots, self.ours, self.foreign, self.alive, self.done = name, slots, ours, foreign, alive, done


def test_pick_backend_by_queue_depth():
    job = B.Job(0, Path("a.png"), Path("o/a.png"))
    a, b = Stub("a", ours=1), Stub("b")
    assert B.pick_backend(job, [a, b]) is b
    b.foreign = 3  # another user's prompts are queued on b: a is shorter
    assert B.pick_backend(job, [a, b]) is a
    a.ours = 2  # a is full; b is busy with foreign work but holds none of ours -> still gets one
    assert B.pick_backend(job, [a, b]) is b
    b.ours = 1
    assert B.pick_backend(job, [a, b]) is None
    a.ours, b.ours, b.foreign = 0, 0, 0
    b.alive = False
    assert B.pick_backend(job, [a, b]) is a
    b.alive = True
    job.failed_on.add("a")  # retries prefer another server
    assert B.pick_backend(job, [a, b]) is b
    assert B.pick_backend(job, [a]) is a  # ...unless there is none
    a.done, b.done = 5, 1
    job.failed_on.clear()
    assert B.pick_backend(job, [a, b]) is b  # tie: the one that finished fewest


class FakeBackend(B.Backend):
    """Thread-safe fake: returns a small image; can fail images or die after N jobs."""

    def __init__(self, name, slots=2, fail=None, die_after=None, delay=0.005, bad=()):
        super().__init__()
        self.name, self.slots, self.delay = name, slots, delay
        self.fail = dict(fail or {})
        self.die_after, self.dead, self.count = die_after, False, 0
        self.bad = set(bad)
        self.lock = threading.Lock()
        self.seen = []

    def process(self, job):
        with self.lock:
            if self.dead:
                raise B.ServerUnreachable(f"{self.name} refused")
            self.count += 1
            if self.die_after is not None and self.count > self.die_after:
                self.dead = True
                raise B.ServerUnreachable(f"{self.name} connection reset")
            self.seen.append(job.src.name)
            failing = self.fail.get(job.src.name, 0)
            if failing:
                self.fail[job.src.name] = failing - 1
        time.sleep(self.delay)
        if job.src.name in self.bad:
            raise B.BadInput(f"{job.src}: not a readable image")
        if failing:
            raise B.BatchError("injected failure")
        return B.Output(array=np.full((4, 4, 3), job.index, np.uint8), seconds=self.delay, pattern="p",
                        routing={"veil": 1.0})

    def ping(self):
        return not self.dead


@pytest.fixture
def writes(monkeypatch):
    """Counts every output write (exactly-once checks)."""
    c = Counter()
    real = B.write_output

    def counting(out, dst):
        c[Path(dst).name] += 1
        real(out, dst)
    monkeypatch.setattr(B.scheduler, "write_output", counting)
    return c


def run(jobs, backends, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda m: None)
    r = B.BatchRunner(jobs, backends, **kw)
    return r, r.run()


def test_two_backends_share_and_each_image_is_written_once(tmp_path, images, writes):
    a, b = FakeBackend("a"), FakeBackend("b")
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    r, s = run(jobs, [a, b])
    assert s["counts"] == {"done": len(images)}
    assert a.seen and b.seen and len(a.seen) + len(b.seen) == len(images)
    assert set(writes.values()) == {1} and len(writes) == len(images)
    for j in jobs:
        assert np.asarray(Image.open(j.dst))[0, 0, 0] == j.index
        assert j.server in ("a", "b") and j.pattern == "p" and j.routing == {"veil": 1.0}


def test_failed_image_is_retried_then_reported(tmp_path, images, writes):
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    be = FakeBackend("a", fail={"img001.png": 2, "img002.png": 5})
    r, s = run(jobs, [be], retries=2)
    by = {j.src.name: j for j in jobs}
    assert by["img001.png"].status == "done" and by["img001.png"].attempts == 2
    assert by["img002.png"].status == "failed" and by["img002.png"].attempts == 3
    assert "injected failure" in by["img002.png"].error
    assert s["counts"] == {"done": len(images) - 1, "failed": 1}
    assert not (tmp_path / "out" / "img002.png").exists()
    assert set(writes.values()) == {1}


def test_retry_moves_to_another_server(tmp_path, images):
    jobs = B.make_jobs([images[1]], tmp_path / "out")
    a, b = FakeBackend("a", fail={"img001.png": 5}), FakeBackend("b")
    r, s = run(jobs, [a, b], retries=1)  # first try goes to a (tie -> first listed), the retry to b
    assert jobs[0].status == "done" and jobs[0].failed_on == {"a"} and jobs[0].server == "b"
    assert a.seen == ["img001.png"] and b.seen == ["img001.png"]


def test_bad_input_does_not_stop_the_rest(tmp_path, images):
    (images[0].parent / "zero.png").write_bytes(b"")
    jobs = B.make_jobs([images[0].parent, tmp_path / "missing.png"], tmp_path / "out")
    be = FakeBackend("a", bad={"zero.png"})
    r, s = run(jobs, [be])
    assert s["counts"] == {"done": len(images), "error": 2}
    bad = {j.src.name: j.error for j in jobs if j.status == "error"}
    assert "not a readable image" in bad["zero.png"] and "does not exist" in bad["missing.png"]
    assert all(j.attempts == 0 for j in jobs)  # bad input is not retried


def test_server_dying_mid_batch_requeues_its_images(tmp_path, writes):
    from batch_helpers import make_images
    imgs = make_images(tmp_path / "in", 30)
    a, b = FakeBackend("a", die_after=4), FakeBackend("b")
    jobs = B.make_jobs([imgs[0].parent], tmp_path / "out")
    r, s = run(jobs, [a, b], retries=0, probe_interval=60)
    assert s["counts"] == {"done": 30}
    assert a.dead and not s["servers"]["a"]["alive"]
    assert len(writes) == 30 and set(writes.values()) == {1}
    assert sum(j.requeued for j in jobs) >= 1
    assert all(j.attempts == 0 for j in jobs)  # losing a server is not the image's fault
    assert s["servers"]["a"]["done"] + s["servers"]["b"]["done"] == 30


def test_all_servers_gone_reports_not_run(tmp_path, images):
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    a = FakeBackend("a", die_after=1)
    r, s = run(jobs, [a], server_wait=0.3, probe_interval=0.1)
    assert s["counts"].get("not-run", 0) >= len(images) - 1
    assert all("no server reachable" in j.error for j in jobs if j.status == "not-run")


def test_dead_server_coming_back_is_used_again(tmp_path, images):
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    a = FakeBackend("a", die_after=2)
    t = threading.Timer(0.3, lambda: setattr(a, "dead", False) or setattr(a, "die_after", None))
    t.start()
    r, s = run(jobs, [a], server_wait=10, probe_interval=0.05)
    t.join()
    assert s["counts"] == {"done": len(images)}


def test_resume_skips_complete_outputs_and_redoes_broken_ones(tmp_path, images, writes):
    out = tmp_path / "out"
    jobs = B.make_jobs([images[0].parent], out)
    run(jobs, [FakeBackend("a")])
    assert len(writes) == len(images)
    writes.clear()
    # a truncated output, an empty one and a leftover temp file from a hard kill
    data = (out / "img003.png").read_bytes()
    (out / "img003.png").write_bytes(data[: len(data) // 2])
    (out / "img005.png").write_bytes(b"")
    (out / ".img006.png.abc123.part").write_bytes(b"half")
    jobs = B.make_jobs([images[0].parent], out)
    r, s = run(jobs, [FakeBackend("a")])
    assert sorted(writes) == ["img003.png", "img005.png"]
    assert s["counts"] == {"done": 2, "skipped": len(images) - 2}
    assert not list(out.glob(".*.part"))
    assert B.output_complete(out / "img003.png")
    writes.clear()
    jobs = B.make_jobs([images[0].parent], out)
    r, s = run(jobs, [FakeBackend("a")], overwrite=True)
    assert len(writes) == len(images) and s["counts"] == {"done": len(images)}


def test_stop_then_rerun_finishes_exactly_the_rest(tmp_path, writes):
    from batch_helpers import make_images
    imgs = make_images(tmp_path / "in", 20)
    out = tmp_path / "out"
    stop = threading.Event()

    def on_done(job, runner):
        if sum(j.status == "done" for j in runner.jobs) >= 5:
            stop.set()  # what Ctrl-C does
    jobs = B.make_jobs([imgs[0].parent], out)
    r, s = run(jobs, [FakeBackend("a", slots=1, delay=0.02)], stop=stop, on_done=on_done)
    assert r.interrupted and s["counts"]["done"] >= 5 and s["counts"]["interrupted"] >= 1
    first = set(writes)
    assert not list(out.glob(".*.part"))
    jobs = B.make_jobs([imgs[0].parent], out)
    r, s = run(jobs, [FakeBackend("a")])
    assert s["counts"]["skipped"] == len(first) and s["counts"]["done"] == 20 - len(first)
    assert len(writes) == 20 and set(writes.values()) == {1}


def test_keyboard_interrupt_in_the_loop_is_a_clean_stop(tmp_path, images, monkeypatch):
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    r = B.BatchRunner(jobs, [FakeBackend("a", slots=1, delay=0.05)], progress=False, log=lambda m: None)
    calls = {"n": 0}
    real = r._refresh

    def refresh():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real()
    monkeypatch.setattr(r, "_refresh", refresh)
    s = r.run()
    assert r.interrupted and s["counts"].get("interrupted", 0) >= 1
    assert sum(s["counts"].values()) == len(images)


def test_report_json_and_csv(tmp_path, images):
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    r, s = run(jobs, [FakeBackend("a")])
    B.write_report(tmp_path / "r.json", jobs, s, {"mode": "test"})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["counts"] == {"done": len(images)} and doc["mode"] == "test"
    assert doc["images"][0]["routing"] == {"veil": 1.0} and doc["images"][0]["server"] == "a"
    B.write_report(tmp_path / "r.csv", jobs, s)
    import csv
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == len(images) and set(rows[0]) == set(B.REPORT_FIELDS)
    assert json.loads(rows[0]["routing"]) == {"veil": 1.0} and rows[0]["status"] == "done"


def test_write_output_formats_and_permissions(tmp_path):
    arr = np.zeros((6, 5, 3), np.uint8)
    B.write_output(B.Output(array=arr), tmp_path / "a.jpg")
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    B.write_output(B.Output(data=buf.getvalue()), tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes() == buf.getvalue()  # PNG bytes kept as they came
    B.write_output(B.Output(data=buf.getvalue()), tmp_path / "c.webp")
    assert Image.open(tmp_path / "c.webp").format == "WEBP"
    assert (tmp_path / "b.png").stat().st_mode & 0o044  # readable by others, not mkstemp's 0600


def test_history_helpers():
    ok = {"status": {"status_str": "success", "completed": True,
                     "messages": [["execution_start", {"timestamp": 1000}], ["execution_success", {"timestamp": 3500}]]}}
    assert B.history_state(ok) == "success" and B.history_exec_seconds(ok) == 2.5
    err = {"status": {"status_str": "error", "completed": False, "messages": [
        ["execution_error", {"node_id": "3", "node_type": "CLIPRPNDerain", "exception_type": "ValueError",
                             "exception_message": "image is 4x4 pixels"}]]}}
    assert B.history_state(err) == "error"
    assert B.history_error(err) == "CLIPRPNDerain (node 3): ValueError: image is 4x4 pixels"
    assert B.history_state(None) is None and B.history_state({"status": {"messages": []}}) is None
    assert B.normalize_url("127.0.0.1:8188/") == "http://127.0.0.1:8188"
    assert B.ComfyClient("https://h:1/base").ws_url("c") == "wss://h:1/base/ws?clientId=c"


def test_interrupt_while_an_output_is_written_leaves_no_job_running(tmp_path, images, monkeypatch):
    real, n = B.write_output, {"calls": 0}

    def write(out, dst):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt  # Ctrl-C lands in the middle of writing a result
        real(out, dst)
    monkeypatch.setattr(B.scheduler, "write_output", write)
    jobs = B.make_jobs([images[0].parent], tmp_path / "out")
    r, s = run(jobs, [FakeBackend("a", slots=1)])
    assert r.interrupted and set(s["counts"]) == {"done", "interrupted"} and s["counts"]["done"] == 2
    assert not list((tmp_path / "out").glob(".*.part"))


def test_builtin_basic_workflow_matches_the_file_and_is_used_without_the_folder(monkeypatch, tmp_path):
    wf, _ = B.load_workflow(None)
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in wf.items()}
    assert strip == B.BUILTIN_BASIC
    monkeypatch.setattr(B.workflow, "API_WORKFLOWS", tmp_path / "absent")
    wf2, origin = B.load_workflow(None)
    assert wf2 == B.BUILTIN_BASIC and origin.startswith("built-in")
    with pytest.raises(B.WorkflowError, match="not installed here"):
        B.load_workflow("full_graph")


def test_pattern_taps_and_their_parsing():
    wf, _ = B.load_workflow("full_graph")
    img = B.find_image_node(wf)
    tapped, taps = B.add_pattern_taps(wf, img)
    assert set(taps) == {"pattern", "routing"} and len(tapped) == len(wf) + 2
    assert tapped[taps["pattern"]] == {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}
    assert tapped[taps["routing"]]["inputs"]["source"] == ["5", 1]
    basic, _ = B.load_workflow(None)
    assert B.add_pattern_taps(basic, "1") == (basic, {})  # nothing to tap, nothing added by default
    added, taps = B.add_pattern_taps(basic, "1", add_nodes=True)
    perc = next(k for k, n in added.items() if n["class_type"] == B.PERCEIVER)
    rout = next(k for k, n in added.items() if n["class_type"] == B.ROUTER)
    assert added[perc]["inputs"] == {"model": ["2", 0], "image": ["1", 0]}
    assert added[rout]["inputs"]["pattern"] == [perc, 0] and added[rout]["inputs"]["top_k"] == 1
    assert len(set(added)) == len(basic) + 4 and basic == B.load_workflow(None)[0]
    text = "image 1: density: dense (0.81) | form: thin streaks (0.90)\n(perceived by pattern-head)"
    assert B.parse_pattern_text(text) == ("density: dense (0.81) | form: thin streaks (0.90)", "pattern-head")
    assert B.parse_routing_text("image 1: light_streaks=0.75, veil=0.25") == {"light_streaks": 0.75, "veil": 0.25}
    assert B.parse_routing_text("nothing") is None


def test_set_expert_check_in_every_derain_node():
    basic, _ = B.load_workflow(None)
    on = B.set_expert_check(basic)
    assert on["3"]["inputs"]["expert_check"] is True and basic["3"]["inputs"]["expert_check"] is False  # a copy
    full, _ = B.load_workflow("full_graph")
    on = B.set_expert_check(full)
    hits = [n for n in on.values() if n["class_type"] in B.DERAIN_NODES]
    assert hits and all(n["inputs"]["expert_check"] is True for n in hits)
    with pytest.raises(B.WorkflowError, match="needs a CLIP-RPN Derain"):
        B.set_expert_check({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}})


def test_set_verify_light_in_every_derain_node():
    basic, _ = B.load_workflow(None)
    assert basic["3"]["inputs"]["verify_light"] is True  # on unless turned off
    off = B.set_verify_light(basic, False)
    assert off["3"]["inputs"]["verify_light"] is False and basic["3"]["inputs"]["verify_light"] is True  # a copy
    full, _ = B.load_workflow("full_graph")
    hits = [n for n in B.set_verify_light(full, False).values() if n["class_type"] in B.DERAIN_NODES]
    assert hits and all(n["inputs"]["verify_light"] is False for n in hits)
    with pytest.raises(B.WorkflowError, match="--no-verify needs a CLIP-RPN Derain"):
        B.set_verify_light({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}, False)
