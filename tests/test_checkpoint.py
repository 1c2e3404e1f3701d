import json

import pytest
import torch
from safetensors.torch import save_file

from cliprpn_core import CheckpointError, CLIPRPN, load_model, save_model, tiny_config
from cliprpn_core.checkpoint import describe, read_config


def test_roundtrip_identical_outputs(tiny_model, tiny_ckpt):
    m2 = load_model(tiny_ckpt)
    assert m2.config == tiny_model.config
    x = torch.rand(1, 3, 16, 24)
    r = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(tiny_model.restore(x, r)[0], m2.restore(x, r)[0])


def test_metadata_has_config_and_version(tiny_ckpt):
    from safetensors import safe_open
    with safe_open(str(tiny_ckpt), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "clip-rpn" and meta["format_version"] == "1"
    assert json.loads(meta["config"])["widths"] == [8, 16]
    assert read_config(tiny_ckpt) == tiny_config()


def test_truncated_file_rejected(tiny_ckpt, tmp_path):
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(tiny_ckpt.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(bad)


def test_garbage_file_rejected(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_model(bad)


def test_pickle_never_loaded(tmp_path):
    p = tmp_path / "model.pth"
    p.write_bytes(b"whatever")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_foreign_safetensors_rejected(tmp_path):
    p = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a CLIP-RPN checkpoint"):
        load_model(p)


def test_wrong_shape_and_missing_keys_named(tiny_model, tmp_path):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["intro.weight"] = torch.zeros(3, 3, 3, 3)
    del sd["outro.bias"]
    p = tmp_path / "edited.safetensors"
    save_file(sd, str(p), metadata={"format": "clip-rpn", "format_version": "1", "config": tiny_model.config.to_json()})
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    msg = str(e.value)
    assert "intro.weight" in msg and "outro.bias" in msg and "wrong shape" in msg


def test_nan_weights_rejected(tiny_model, tmp_path):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["outro.weight"][0, 0, 0, 0] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_file(sd, str(p), metadata={"format": "clip-rpn", "format_version": "1", "config": tiny_model.config.to_json()})
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(p)


def test_newer_format_rejected(tiny_model, tmp_path):
    p = tmp_path / "future.safetensors"
    save_model(tiny_model, p)
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(sd, str(p), metadata={"format": "clip-rpn", "format_version": "99", "config": tiny_model.config.to_json()})
    with pytest.raises(CheckpointError, match="newer"):
        load_model(p)


def test_save_is_atomic_no_partial_left(tiny_model, tmp_path, monkeypatch):
    import cliprpn_core.checkpoint as ck
    target = tmp_path / "m.safetensors"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_model, target)
    assert list(tmp_path.iterdir()) == []


def test_describe(tiny_ckpt):
    d = describe(tiny_ckpt)
    assert d["parameters"] == sum(p.numel() for p in CLIPRPN(tiny_config()).parameters())
    assert d["size_multiple"] == 4


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    # the temporary file of an atomic write is private; the finished file must not be
    import os
    import stat
    from cliprpn_core.imageio import _UMASK, save_image
    save_image(torch.zeros(3, 4, 4), tmp_path / "out.png")
    assert stat.S_IMODE(os.stat(tmp_path / "out.png").st_mode) == 0o666 & ~_UMASK
