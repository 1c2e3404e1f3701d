"""nodes/_host.py and nodes/__init__.py against small fakes of the few ComfyUI modules they use
(folder_paths, comfy.model_management, comfy.utils, comfy.model_patcher)."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from packutil import PACK_NAME, REPO, import_pack


class FakeInterrupt(BaseException):
    pass


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.supported_pt_extensions = {".ckpt", ".pt", ".pth", ".safetensors"}
    extra = tmp_path / "extra_clip_rpn"  # as if from extra_model_paths.yaml
    extra.mkdir()
    fp.folder_names_and_paths = {"clip_rpn": ([str(extra)], set())}

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = []
        for root in paths:
            for dirpath, _dirs, files in os.walk(root):
                for f in files:
                    if not exts or os.path.splitext(f)[1] in exts:
                        out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
        return sorted(set(out))

    fp.get_folder_paths, fp.get_filename_list = get_folder_paths, get_filename_list

    state = types.SimpleNamespace(interrupt=False, loaded=[], progress=[], previews=[])
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = FakeInterrupt
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.intermediate_dtype = lambda: torch.float32
    mm.should_use_fp16 = lambda *a, **k: False
    mm.should_use_bf16 = lambda *a, **k: False
    mm.is_oom = lambda e: "out of memory" in str(e)
    mm.soft_empty_cache = lambda *a, **k: None
    mm.load_models_gpu = lambda models, **kw: state.loaded.append((models, kw))

    def throw():
        if state.interrupt:
            state.interrupt = False
            raise FakeInterrupt()
    mm.throw_exception_if_processing_interrupted = throw

    cu = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.progress.append((value, total or self.total))
            if preview is not None:
                state.previews.append((value, preview))
    cu.ProgressBar = ProgressBar

    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
    mp.ModelPatcher = ModelPatcher

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    comfy.model_management, comfy.utils, comfy.model_patcher = mm, cu, mp
    for name, mod in {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": cu,
                      "comfy.model_patcher": mp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    import_pack()
    for m in [m for m in sys.modules if m.startswith(PACK_NAME + ".nodes.") and not m.endswith(".node_logic")]:
        monkeypatch.delitem(sys.modules, m)
    host = importlib.import_module(f"{PACK_NAME}.nodes._host")
    yield types.SimpleNamespace(host=host, fp=fp, state=state, extra=extra, tmp=tmp_path)
    for m in [m for m in sys.modules if m.startswith(PACK_NAME + ".nodes.") and not m.endswith(".node_logic")]:
        sys.modules.pop(m, None)


def test_model_folder_keeps_user_paths_and_adds_the_pack(fake_comfy):
    h, fp = fake_comfy.host, fake_comfy.fp
    h.register_model_folder()
    h.register_model_folder()  # idempotent
    paths, exts = fp.folder_names_and_paths["clip_rpn"]
    assert paths == [str(Path(fp.models_dir) / "clip_rpn"), str(fake_comfy.extra), str(REPO / "models")]
    assert exts == fp.supported_pt_extensions
    assert h.save_dir() == Path(fp.models_dir) / "clip_rpn"


def test_checkpoint_and_clip_options(fake_comfy):
    h = fake_comfy.host
    h.register_model_folder()
    (fake_comfy.extra / "a_finetune.safetensors").write_bytes(b"x")
    (fake_comfy.extra / "ViT-B-32-quickgelu__openai.safetensors").write_bytes(b"x")
    opts = h.checkpoint_options()
    assert opts[0] == "clip_rpn_default.safetensors" and "a_finetune.safetensors" in opts
    assert "ViT-B-32-quickgelu__openai.safetensors" not in opts
    clips = h.clip_options()
    assert clips[0].startswith("none") and "ViT-B-32-quickgelu__openai.safetensors" in clips
    assert "download: ViT-B-32 OpenAI" not in clips and "download: ViT-B-32 LAION-2B" in clips
    assert h.resolve("clip_rpn_default.safetensors", "checkpoint") == REPO / "models" / "clip_rpn_default.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        h.resolve("gone.safetensors", "CLIP-RPN checkpoint")
    assert str(fake_comfy.extra) in str(e.value) and "clip_rpn" in str(e.value)


def test_dtype_choice(fake_comfy):
    h = fake_comfy.host
    cpu = torch.device("cpu")
    assert h.pick_dtype("auto", cpu) == torch.float32
    assert h.pick_dtype("fp16", cpu) == torch.float16
    assert h.pick_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="MPS"):
        h.pick_dtype("bf16", torch.device("mps"))
    with pytest.raises(ValueError, match="unknown dtype"):
        h.pick_dtype("fp8", cpu)


def test_progress_is_a_cancel_checkpoint(fake_comfy):
    h, st = fake_comfy.host, fake_comfy.state
    bar = h.Progress(3)
    bar(1, 3)
    st.interrupt = True
    with pytest.raises(FakeInterrupt):
        bar(2, 3)
    assert st.progress == [(1, 3)]


def test_loader_puts_the_model_in_a_patcher_and_loads_it_through_comfy(fake_comfy, pack_core):
    h = fake_comfy.host
    node_logic = importlib.import_module(f"{PACK_NAME}.nodes.node_logic")
    m = pack_core.CLIPRPN(pack_core.tiny_config())
    handle = node_logic.ModelHandle(m, None, torch.float32, name="tiny")
    handle.patcher = h.make_patcher(handle.module, "auto")
    assert handle.patcher.model is handle.module and handle.patcher.load_device == torch.device("cpu")
    assert h.load_to_device(handle, 64 * 64) == torch.device("cpu")
    (models, kw), = fake_comfy.state.loaded
    assert models == [handle.patcher] and kw["force_full_load"] and kw["memory_required"] > 0
    out = h.output(torch.ones(2, 2, dtype=torch.float64))
    assert out.dtype == torch.float32


def test_a_broken_part_is_disabled_alone(fake_comfy, monkeypatch, caplog):
    nodes_pkg = importlib.import_module(f"{PACK_NAME}.nodes")
    monkeypatch.setattr(nodes_pkg, "PARTS", ("no_such_part",))
    with caplog.at_level(logging.WARNING, logger="CLIP-RPN"):
        assert nodes_pkg.load_nodes() == []
    assert any("'no_such_part' nodes are disabled" in r.getMessage() for r in caplog.records)
