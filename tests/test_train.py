import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cliprpn_core import load_model
from cliprpn_core.train import TrainConfig, Trainer, lr_at

TINY = {"widths": [8, 16], "enc_blocks": [1], "dec_blocks": [1], "middle_blocks": 1, "expert_blocks": 1,
        "attn_heads": 2, "attn_cell": 2, "head_width": 8, "head_size": 32}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    clean = root / "clean"
    clean.mkdir()
    yy, xx = np.mgrid[0:80, 0:96]
    for i in range(4):
        img = (127 + 60 * np.sin(xx / (5 + i)) [..., None] + 40 * np.cos(yy / 7)[..., None]
               + rng.normal(0, 5, (80, 96, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(clean / f"c{i}.png")
    pairs = root / "pairs"
    (pairs / "rain").mkdir(parents=True)
    (pairs / "gt").mkdir()
    for i in range(2):
        gt = np.asarray(Image.open(clean / f"c{i}.png"))
        rain = gt.astype(int)
        rain[:, ::7] += 80
        Image.fromarray(gt).save(pairs / "gt" / f"heavy_{i}.png")
        Image.fromarray(rain.clip(0, 255).astype(np.uint8)).save(pairs / "rain" / f"heavy_{i}.png")
    return clean, pairs


def _cfg(tmp_path, data_dirs, **kw):
    clean, pairs = data_dirs
    over = [f"out_dir={json.dumps(str(tmp_path / 'run'))}", f"clean_dirs={json.dumps([str(clean)])}",
            f"pair_dirs={json.dumps([str(pairs)])}", f"model={json.dumps(TINY)}", "batch_size=3", "patch_size=32",
            "warmup_steps=2", "log_every=2", "ckpt_every=3", "loss_preset=dwa", "threads=1"]
    over += [f"{k}={json.dumps(v)}" for k, v in kw.items()]
    return TrainConfig.from_toml(None, over)


def test_train_writes_everything(tmp_path, data_dirs):
    out = Trainer(_cfg(tmp_path, data_dirs, steps=4, snapshot_every=2), progress=False).fit()
    run = tmp_path / "run"
    assert load_model(run / "model_step2.safetensors").config.widths == (8, 16)
    assert (run / "model_step4.safetensors").exists() and not (run / "model_step3.safetensors").exists()
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]
    assert all(np.isfinite(r["total"]) for r in recs)
    assert (run / "loss_curve.png").stat().st_size > 0
    assert load_model(out).config.widths == (8, 16)
    assert not [p for p in run.iterdir() if p.name.endswith(".part")]


def test_resume_is_exact(tmp_path, data_dirs):
    a = tmp_path / "a"
    a.mkdir()
    Trainer(_cfg(a, data_dirs, steps=6), progress=False).fit()
    b = tmp_path / "b"
    b.mkdir()
    Trainer(_cfg(b, data_dirs, steps=3), progress=False).fit()
    Trainer(_cfg(b, data_dirs, steps=6), progress=False).fit()  # resumes at step 3
    sa, sb = load_file(str(a / "run" / "state.safetensors")), load_file(str(b / "run" / "state.safetensors"))
    for k in sa:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_interrupt_saves_valid_state(tmp_path, data_dirs):
    t = Trainer(_cfg(tmp_path, data_dirs, steps=50), progress=False)
    orig = t.train_step

    def step_then_stop():
        logs = orig()
        if t.step == 2:
            t._on_signal()  # what SIGINT / SIGTERM do
        return logs

    t.train_step = step_then_stop
    t.fit()
    t2 = Trainer(_cfg(tmp_path, data_dirs, steps=50), progress=False)
    t2.load_state()
    assert t2.step == 2


def test_lr_warmup_cosine():
    c = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.0)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(100, c) == pytest.approx(0.0, abs=1e-9)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_toml(None, ["stepz=3"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.from_toml(None, ["steps"])
    with pytest.raises(ValueError, match="unknown loss preset"):
        TrainConfig.from_toml(None, ["loss_preset=magic"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    # every recorded recipe still loads with today's options (a renamed option would fail here, not mid-run)
    c = TrainConfig.from_toml(str(path), [])
    assert c.steps > 0 or c.budget_minutes > 0


def test_torchrun_two_cpu_processes(tmp_path, data_dirs):
    clean, pairs = data_dirs
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import socket
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # a free port can be taken by another process before torchrun binds it
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}",
               "-m", "cliprpn_core.train_cli", f"out_dir={json.dumps(str(tmp_path / f'ddp{attempt}'))}",
               f"clean_dirs={json.dumps([str(clean)])}", f"pair_dirs={json.dumps([str(pairs)])}",
               f"model={json.dumps({**TINY, 'passes': 2})}", "batch_size=2", "patch_size=32", "steps=3",
               "log_every=1", "device=\"cpu\"", "threads=1", "misroute_fraction=0.5"]
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
        port_taken = "address already in use" in r.stderr.lower()
        # a worker has (rarely, on this 2-core CPU under load) aborted in the C++ teardown after its last step
        # ("terminate called without an active exception", SIGABRT): tried once more, the run must then succeed
        teardown_abort = "terminate called without an active exception" in r.stderr and "3/3" in r.stderr
        if r.returncode == 0 or not (port_taken or teardown_abort):
            break
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / f"ddp{attempt}"  # each attempt a fresh run (a second one must not resume the first)
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3]  # only rank 0 logs
    # DDP with everything trained, two passes and misrouting decided inside the one forward
    assert load_model(out / "model.safetensors").config.widths == (8, 16)


def test_all_sources_mixed_and_norain_is_identity(tmp_path, data_dirs):
    from cliprpn_core.data import MixtureSource, NoRainSource, RainLayerSource
    clean, pairs = data_dirs
    t = Trainer(_cfg(tmp_path, data_dirs, steps=2, layer_dirs=[str(pairs)], layer_fraction=0.3,
                     norain_fraction=0.2), progress=False)
    src = t.source
    assert isinstance(src, MixtureSource)
    assert [type(s).__name__ for s in src.sources] == ["SyntheticSource", "PairedSource", "RainLayerSource",
                                                      "NoRainSource"]
    assert src.weights.tolist() == pytest.approx([0.4, 0.1, 0.3, 0.2])
    assert isinstance(src.sources[2], RainLayerSource) and isinstance(src.sources[3], NoRainSource)
    b = src.sources[3].batch(4, 32, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(b.rainy, b.clean) and not b.mask.any() and (b.expert == 0).all()
    assert b.rainy.std() > 0.05  # real photo crops, not blank
    t.fit()  # a mixed batch trains
    with pytest.raises(ValueError, match="negative share"):
        Trainer(_cfg(tmp_path, data_dirs, steps=2, layer_dirs=[str(pairs)], layer_fraction=0.6,
                     norain_fraction=0.5), progress=False)


def test_unknown_synthesis_style_fails_before_training(tmp_path, data_dirs):
    with pytest.raises(ValueError, match="unknown synthesis style 'photoshop'"):
        Trainer(_cfg(tmp_path, data_dirs, steps=1, synth_style="photoshop"), progress=False)


def _save_tiny(path, **over):
    from cliprpn_core.arch import CLIPRPN
    from cliprpn_core.checkpoint import save_model
    from cliprpn_core.config import CLIPRPNConfig
    torch.manual_seed(1)
    m = CLIPRPN(CLIPRPNConfig.from_dict({**TINY, **over}))
    with torch.no_grad():  # trained-looking residual scales, so the old blocks are not the identity
        for n, p in m.named_parameters():
            if n.endswith(("beta", "gamma")):
                p.normal_(0, 0.1)
    save_model(m, path)
    return m


def _same_start_then_fit(t, src, routings) -> set[str]:
    """The trainer's model computes what ``src`` computes (one image per routing row), then trains: -> the names of
    the parameters that changed."""
    x = torch.rand(len(routings), 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.model.eval()(x, routing=routings).image, src.eval()(x, routing=routings).image,
                                   atol=1e-5, rtol=0)
    t.model.train()
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.fit()
    return {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}


def test_grow_keeps_the_function_then_trains_only_what_is_asked(tmp_path, data_dirs):
    src = _save_tiny(tmp_path / "small.safetensors")
    cfg = _cfg(tmp_path, data_dirs, steps=3, init=str(tmp_path / "small.safetensors"), grow=True,
               model={**TINY, "dec_blocks": [3], "enc_blocks": [2]}, trainable=["decoders", "outro"],
               misroute_fraction=0.5)
    t = Trainer(cfg, progress=False)
    changed = _same_start_then_fit(t, src, torch.eye(4)[:2])
    assert changed and all(n.startswith(("decoders.", "outro.")) for n in changed)
    assert any(n.startswith("decoders.0.2.") for n in changed)  # an added block learned
    assert not t.train_perception
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert rec["pattern_ce"] == 0.0 and np.isfinite(rec["total"])


def test_grown_blocks_learn_at_their_own_rate_and_keep_it_on_resume(tmp_path, data_dirs):
    src = _save_tiny(tmp_path / "small.safetensors")
    kw = dict(steps=4, init=str(tmp_path / "small.safetensors"), grow=True, grown_lr_scale=10.0,
              model={**TINY, "dec_blocks": [3]}, warmup_steps=0, lr=1e-3, min_lr=1e-3)
    t = Trainer(_cfg(tmp_path, data_dirs, **kw), progress=False)
    base, grown = t.opt.param_groups
    names = {id(p): n for n, p in t.model.named_parameters()}
    added = {n for n, _ in t.model.named_parameters()} - set(src.state_dict())
    assert added and {names[id(p)] for p in grown["params"]} == added
    assert not {names.get(id(p)) for p in base["params"]} & added
    t.cfg.steps = 2
    t.fit()
    assert grown["lr"] == pytest.approx(10 * base["lr"]) and base["lr"] == pytest.approx(1e-3)
    t2 = Trainer(_cfg(tmp_path, data_dirs, **kw), progress=False)
    t2.load_state()
    assert t2.step == 2 and t2.opt.param_groups[1]["lr_scale"] == 10.0
    t2.fit()
    assert t2.opt.param_groups[1]["lr"] == pytest.approx(10 * t2.opt.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="grown_lr_scale"):
        Trainer(_cfg(tmp_path, data_dirs, **{**kw, "grown_lr_scale": 0.0}), progress=False)


def test_keep_identity_freezes_the_identity_blocks_of_init_but_not_grown_ones(tmp_path, data_dirs):
    """A continuation with keep_identity leaves init's identity blocks as they are (skipped at inference: the
    network keeps its speed) and trains everything else, blocks that grow adds included; without it they learn."""
    from cliprpn_core.checkpoint import save_model
    src = _save_tiny(tmp_path / "small.safetensors")
    with torch.no_grad():  # the middle block removed (the identity), as a run that keeps it removed leaves it
        src.middle[0].beta.zero_()
        src.middle[0].gamma.zero_()
    save_model(src, tmp_path / "ident.safetensors")
    kw = dict(steps=2, init=str(tmp_path / "ident.safetensors"), model={**TINY, "dec_blocks": [2]}, grow=True,
              warmup_steps=0, lr=1e-2, min_lr=1e-2)
    t = Trainer(_cfg(tmp_path, data_dirs, keep_identity=True, **kw), progress=False)
    assert t.identity_kept == ["middle.0"]
    changed = _same_start_then_fit(t, src, torch.eye(4)[:1])
    assert not any(n.startswith("middle.0.") for n in changed)
    assert t.model.middle[0].is_identity() and load_model(tmp_path / "run" / "model.safetensors").middle[0].is_identity()
    assert any(n.startswith("decoders.0.1.") for n in changed)  # the grown block learned
    assert any(n.startswith("experts.") for n in changed)
    t2 = Trainer(_cfg(tmp_path / "b", data_dirs, **kw), progress=False)
    assert any(n.startswith("middle.0.") for n in _same_start_then_fit(t2, src, torch.eye(4)[:1]))
    with pytest.raises(ValueError, match="keep_identity needs init"):
        Trainer(_cfg(tmp_path / "c", data_dirs, keep_identity=True), progress=False)


def test_network_experts_training_moves_only_the_routed_expert(tmp_path, data_dirs):
    """Network-scope experts: training on one rain type (the heavy pairs, expert 1) changes nothing another uses."""
    src = _save_tiny(tmp_path / "small.safetensors")
    cfg = _cfg(tmp_path, data_dirs, steps=2, init=str(tmp_path / "small.safetensors"), grow=True,
               model={**TINY, "expert_scope": "network"}, trainable=["experts"], pair_fraction=1.0,
               misroute_fraction=0.0)
    t = Trainer(cfg, progress=False)
    changed = _same_start_then_fit(t, src, torch.eye(4))  # the grown model starts as its source, expert by expert
    assert any(n.startswith("experts.1.intro.") for n in changed) and any(".experts.0." in n for n in changed)
    assert changed and all(n.startswith("experts.1.") for n in changed), sorted(changed)[:5]
    assert load_model(tmp_path / "run" / "model.safetensors").config.expert_scope == "network"


def test_init_without_model_config_continues_the_model_as_it_is(tmp_path, data_dirs):
    """No ``model`` with ``init``: the run takes init's own config (here whole-network experts, two passes)."""
    from cliprpn_core.checkpoint import save_model
    src = _save_tiny(tmp_path / "small.safetensors")
    grown = Trainer(_cfg(tmp_path, data_dirs, steps=1, init=str(tmp_path / "small.safetensors"), grow=True,
                         model={**TINY, "expert_scope": "network", "passes": 2}), progress=False).model
    save_model(grown, tmp_path / "net.safetensors")
    t = Trainer(_cfg(tmp_path / "b", data_dirs, steps=1, init=str(tmp_path / "net.safetensors"), model={},
                     trainable=["experts"]), progress=False)
    assert t.model.config == grown.config and t.model.config.expert_scope == "network" and t.model.config.passes == 2
    assert src.config.expert_scope == "bottleneck"


def test_grow_refuses_what_is_not_growth(tmp_path, data_dirs):
    from cliprpn_core.checkpoint import CheckpointError
    _save_tiny(tmp_path / "small.safetensors")
    init = str(tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="grow = true"):
        Trainer(_cfg(tmp_path, data_dirs, init=init, model={**TINY, "dec_blocks": [2]}), progress=False)
    with pytest.raises(CheckpointError, match="not a superset"):
        Trainer(_cfg(tmp_path, data_dirs, init=init, grow=True, model={**TINY, "widths": [8, 24]}), progress=False)
    with pytest.raises(ValueError, match="matches no parameter"):
        Trainer(_cfg(tmp_path, data_dirs, trainable=["decoder"]), progress=False)
    with pytest.raises(ValueError, match="misroute_fraction"):
        Trainer(_cfg(tmp_path, data_dirs, misroute_fraction=1.5), progress=False)


def test_misroute_routes_by_the_model_own_router(tmp_path, data_dirs):
    t = Trainer(_cfg(tmp_path, data_dirs, misroute_fraction=1.0), progress=False)
    seen = {}
    orig = t.model.restore_passes

    def spy(x, routing, mask=None, passes=None):
        seen["routing"] = routing.detach().clone()
        return orig(x, routing, mask, passes)

    t.model.restore_passes = spy
    batch = t.source.batch(3, 32, torch.Generator().manual_seed(0), t.device)
    t.compute_losses(batch)
    with torch.no_grad():
        from cliprpn_core.arch import pattern_probs
        own = t.model.router.logits(pattern_probs(t.model.perceive(batch.rainy))).argmax(-1)
    assert torch.equal(seen["routing"].argmax(-1), own)


def test_misroute_with_a_trainable_head_runs_the_head_once(tmp_path, data_dirs):
    t = Trainer(_cfg(tmp_path, data_dirs, misroute_fraction=0.5), progress=False)
    assert t.train_perception
    calls = []
    t.model.pattern_head.register_forward_hook(lambda *a: calls.append(1))
    batch = t.source.batch(3, 32, torch.Generator().manual_seed(0), t.device)
    total, _, logs = t.compute_losses(batch)
    assert len(calls) == 1 and logs["pattern_ce"] > 0
    total.backward()
    assert t.model.pattern_head.fc[0].weight.grad is not None


def test_perception_alone_trains_without_running_the_restoration(tmp_path, data_dirs):
    t = Trainer(_cfg(tmp_path, data_dirs, trainable=["pattern_head", "router"], steps=4), progress=False)
    assert t.train_perception and t.perception_only
    ran = []
    t.model.intro.register_forward_hook(lambda *a: ran.append(1))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    logs = [t.train_step() for _ in range(3)]
    assert not ran  # the restoration never ran
    assert all(np.isfinite(r["total"]) and r["pattern_ce"] > 0 and "psnr" not in r for r in logs)
    after = t.model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.startswith(("pattern_head.", "router.")) for k in moved)
    out = t.fit()  # the last step, the files and the loss curve without image terms
    assert load_model(out).config == t.model.config
    assert not Trainer(_cfg(tmp_path / "b", data_dirs, trainable=["pattern_head", "decoders"]),
                       progress=False).perception_only


def _mixed_pairs(tmp_path, pairs):
    """A pair folder of the two heavy pairs of ``pairs`` and one light pair (a copy named light_0)."""
    mixed = tmp_path / "mixed"
    for sub in ("rain", "gt"):
        (mixed / sub).mkdir(parents=True)
        for f in (pairs / sub).iterdir():  # heavy_0, heavy_1 and one light pair
            (mixed / sub / f.name).write_bytes(f.read_bytes())
        (mixed / sub / "light_0.png").write_bytes((pairs / sub / "heavy_0.png").read_bytes())
    return mixed


def test_layer_light_share_sets_light_vs_heavy_layer_draws(tmp_path, data_dirs):
    from cliprpn_core.data import RainLayerSource
    clean, pairs = data_dirs
    mixed = _mixed_pairs(tmp_path, pairs)
    gen = torch.Generator().manual_seed(0)
    for share, want in ((1.0, 0), (0.0, 1)):
        src = RainLayerSource([mixed], [clean], min_side=32, max_rotation=0, light_share=share)
        assert sorted(src.heavy) == [False, True, True]
        assert (src.batch(16, 32, gen, "cpu").expert == want).all()
    src = RainLayerSource([mixed], [clean], min_side=32, max_rotation=0, light_share=0.75)
    light = (src.batch(400, 32, gen, "cpu").expert == 0).float().mean().item()
    assert 0.68 < light < 0.82  # light is one layer of three, yet drawn 3/4 of the time
    only_heavy = RainLayerSource([pairs], [clean], min_side=32, max_rotation=0, light_share=1.0)
    assert (only_heavy.batch(8, 32, gen, "cpu").expert == 1).all()  # the only kind there is
    with pytest.raises(ValueError, match="light_share must be in"):
        RainLayerSource([mixed], [clean], min_side=32, light_share=1.5)


def test_pair_light_share_sets_light_vs_heavy_pair_draws(tmp_path, data_dirs):
    from cliprpn_core.data import PairedSource
    mixed = _mixed_pairs(tmp_path, data_dirs[1])
    gen = torch.Generator().manual_seed(0)
    uniform = PairedSource([mixed], min_side=32)
    light = (uniform.batch(600, 32, gen, "cpu").expert == 0).float().mean().item()
    assert 0.27 < light < 0.40  # one pair of three
    for share, want in ((1.0, 0), (0.0, 1)):
        assert (PairedSource([mixed], min_side=32, light_share=share).batch(16, 32, gen, "cpu").expert == want).all()
    src = PairedSource([mixed], min_side=32, light_share=0.75)
    light = (src.batch(600, 32, gen, "cpu").expert == 0).float().mean().item()
    assert 0.69 < light < 0.81
    only_heavy = PairedSource([data_dirs[1]], min_side=32, light_share=1.0)
    assert (only_heavy.batch(8, 32, gen, "cpu").expert == 1).all()
    with pytest.raises(ValueError, match="light_share must be in"):
        PairedSource([mixed], min_side=32, light_share=-0.1)
    t = Trainer(_cfg(tmp_path, (data_dirs[0], mixed), pair_fraction=1.0, pair_light_share=0.0), progress=False)
    paired = t.source.sources[-1] if hasattr(t.source, "sources") else t.source
    assert (paired.batch(16, 32, gen, "cpu").expert == 1).all()


def test_pair_vflip_flips_half_of_the_same_crops_upside_down(tmp_path, data_dirs):
    from cliprpn_core.data import PairedSource
    plain = PairedSource([data_dirs[1]], min_side=32).batch(64, 32, torch.Generator().manual_seed(5), "cpu")
    flip = PairedSource([data_dirs[1]], min_side=32, vflip=True).batch(64, 32, torch.Generator().manual_seed(5), "cpu")
    same = [(flip.rainy[i] == plain.rainy[i]).all().item() for i in range(64)]
    up = [(flip.rainy[i] == plain.rainy[i].flip(-2)).all().item() and (flip.clean[i] == plain.clean[i].flip(-2)).all().item()
          for i in range(64)]
    assert all(a or b for a, b in zip(same, up))  # each crop is the plain one, or it upside down (rain and clean alike)
    assert 16 < sum(up) < 48 and sum(same) > 16
    t = Trainer(_cfg(tmp_path, data_dirs, pair_fraction=1.0, pair_vflip=True), progress=False)
    paired = t.source.sources[-1] if hasattr(t.source, "sources") else t.source
    assert paired.vflip


def test_layer_mix_adds_a_second_layer_of_the_same_kind(tmp_path, data_dirs):
    from cliprpn_core.data import RainLayerSource
    clean, pairs = data_dirs
    kw = dict(min_side=32, max_rotation=0, gain=(1.0, 1.0))

    def draw(**extra):
        return RainLayerSource([pairs], [clean], **kw, **extra).batch(12, 32, torch.Generator().manual_seed(3), "cpu")

    base = draw()
    # mix off (and the default zoom written out) draws exactly what the source drew before the option existed
    same = draw(mix=0.0, scale=(0.8, 1.2))
    assert torch.equal(base.rainy, same.rainy) and torch.equal(base.clean, same.clean)
    mixed = draw(mix=1.0, mix_gain=(1.0, 1.0))
    again = draw(mix=1.0, mix_gain=(1.0, 1.0))
    assert torch.equal(mixed.rainy, again.rainy)  # seeded
    # every sample got a second layer: more rain over the same kind of draws (labels follow the first layer)
    assert (mixed.expert == base.expert).all()
    assert (mixed.rainy - mixed.clean).sum() > (base.rainy - base.clean).sum()
    with pytest.raises(ValueError, match="mix must be in"):
        RainLayerSource([pairs], [clean], **kw, mix=2.0)
    with pytest.raises(ValueError, match="scale must be"):
        RainLayerSource([pairs], [clean], **kw, scale=(1.2, 0.8))


def test_two_pass_training_from_a_one_pass_model(tmp_path, data_dirs):
    src = _save_tiny(tmp_path / "one.safetensors")
    assert src.config.passes == 1
    t = Trainer(_cfg(tmp_path, data_dirs, steps=2, init=str(tmp_path / "one.safetensors"), model={**TINY, "passes": 2},
                     pass_aux_weight=0.5), progress=False)
    x = torch.rand(2, 3, 32, 32)
    r = torch.eye(4)[:2]
    with torch.no_grad():  # same weights: its first pass is the 1-pass model, its second pass repeats it
        one = src.eval()(x, routing=r).image
        out = t.model.eval()(x, routing=r)
        torch.testing.assert_close(out.pass_images[0], one, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.image, src(one.clamp(0, 1), routing=r).image, atol=1e-5, rtol=0)
    t.model.train()
    batch = t.source.batch(3, 32, torch.Generator().manual_seed(0), t.device)
    total, terms, _ = t.compute_losses(batch)
    t.cfg.pass_aux_weight = 0.0
    _, final_only, _ = t.compute_losses(batch)
    out = t.model(batch.rainy, routing=torch.nn.functional.one_hot(batch.expert, 4).float())
    for k, fn in t.losses.items():  # aux weight 0.5: final-pass loss + 0.5 x first-pass loss
        torch.testing.assert_close(terms[k], final_only[k] + 0.5 * fn(out.pass_images[0].float(), batch.clean))
    t.cfg.pass_aux_weight = 0.5
    t.fit()
    assert load_model(tmp_path / "run" / "model.safetensors").config.passes == 2


def test_route_all_to_trains_one_expert_only(tmp_path, data_dirs):
    """The unrouted control: every sample through one expert; the other experts get no update."""
    t = Trainer(_cfg(tmp_path, data_dirs, steps=2, route_all_to=1, misroute_fraction=0.5), progress=False)
    before = {k: v.detach().clone() for k, v in t.model.state_dict().items() if k.startswith("experts.")}
    t.fit()
    after = t.model.state_dict()
    changed = {k.split(".")[1] for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == {"1"}
    with pytest.raises(ValueError, match="route_all_to must be -1"):
        Trainer(_cfg(tmp_path, data_dirs, route_all_to=9), progress=False)


def test_packed_pairs_read_as_clean_plus_layer(tmp_path):
    """A pair folder with layer/ instead of rain/ (scripts/pack_gpu_data.py --compact) is read as
    rainy = clean + layer, clipped to 8 bits, and gives the same rain layer as the original pair."""
    from PIL import Image

    from cliprpn_core.data import PairedSource
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 200, (100, 120, 3), dtype=np.uint8)
    layer = np.zeros_like(gt)
    layer[::7] = 90  # streaks, some clipped at 255
    rain = np.clip(gt.astype(int) + layer, 0, 255).astype(np.uint8)
    for name, sub, arr in (("orig", "rain", rain), ("orig", "gt", gt), ("packed", "layer", layer), ("packed", "gt", gt)):
        (tmp_path / name / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / name / sub / "x.png")
    orig, packed = PairedSource(tmp_path / "orig"), PairedSource(tmp_path / "packed")
    assert torch.equal(orig.rain[0], packed.rain[0]) and torch.equal(orig.gt[0], packed.gt[0])


def test_mask_anchor_holds_the_mask_scale_to_the_anchor_model(tmp_path, data_dirs):
    """mask_anchor: a run anchored to its own init has a zero anchor term at its first step; one anchored to another
    model has a positive one, and training on it moves the mean mask towards the anchor's."""
    from cliprpn_core.losses import MaskScaleLoss
    _save_tiny(tmp_path / "init.safetensors")
    init = str(tmp_path / "init.safetensors")
    t = Trainer(_cfg(tmp_path / "same", data_dirs, steps=1, init=init, model={}, mask_anchor=init,
                     mask_anchor_weight=1.0, pair_fraction=1.0), progress=False)
    assert t.train_step()["mask_anchor"] == pytest.approx(0.0, abs=1e-10)
    # an anchor whose masks are near 1 everywhere: the term is large and pulls the mean mask up
    far = load_model(init)
    with torch.no_grad():
        for n, p in far.mask_estimator.named_parameters():
            if n.endswith("bias"):
                p.fill_(6.0)
    from cliprpn_core.checkpoint import save_model
    save_model(far, tmp_path / "far.safetensors")
    t = Trainer(_cfg(tmp_path / "far", data_dirs, steps=1, init=init, model={}, mask_anchor=str(tmp_path / "far.safetensors"),
                     mask_anchor_weight=5.0, pair_fraction=1.0, lr=1e-2, warmup_steps=0, mask_weight=0.0),
                progress=False)
    x = torch.rand(2, 3, 32, 32)
    before = torch.sigmoid(t.model.estimate_mask(x)).mean()
    logs = [t.train_step() for _ in range(5)]
    assert logs[0]["mask_anchor"] > 0.1
    assert torch.sigmoid(t.model.estimate_mask(x)).mean() > before
    assert MaskScaleLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)) == 0


def test_mask_anchor_refuses_a_missing_anchor_or_another_scope(tmp_path, data_dirs):
    with pytest.raises(ValueError, match="needs mask_anchor"):
        Trainer(_cfg(tmp_path, data_dirs, steps=1, mask_anchor_weight=1.0), progress=False)
    _save_tiny(tmp_path / "init.safetensors")
    from cliprpn_core.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="expert scope"):
        Trainer(_cfg(tmp_path, data_dirs, steps=1, model={**TINY, "expert_scope": "network"},
                     mask_anchor=str(tmp_path / "init.safetensors"), mask_anchor_weight=1.0), progress=False)
