import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from safetensors.torch import save_file  # noqa: E402

from cliprpn_core import Derainer  # noqa: E402
from cliprpn_core.patterns import NUM_CLASSES, PATTERN_DIM  # noqa: E402
from cliprpn_core.perceiver import CLIPMissingError, load_clip, prompt_texts  # noqa: E402

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip_files(tmp_path_factory):
    """A tiny random open_clip model (never real perception) saved in both supported forms."""
    d = tmp_path_factory.mktemp("clip")
    (d / "tiny-rpn-test.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d / "tiny-rpn-test.json")
    torch.manual_seed(0)
    m = open_clip.create_model("tiny-rpn-test", pretrained=None)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    f = d / "tiny-rpn-test__random.safetensors"
    save_file(sd, str(f))
    folder = d / "tiny_folder"
    folder.mkdir()
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    return f, folder


def test_both_forms_give_identical_embeddings(tiny_clip_files):
    f, folder = tiny_clip_files
    a, b = load_clip(f), load_clip(folder)
    assert torch.equal(a.text, b.text)
    x = torch.rand(2, 3, 40, 60)
    assert torch.equal(a.probs(x), b.probs(x))
    assert a.name == "tiny-rpn-test/random"


def test_probs_per_attribute(tiny_clip_files):
    p = load_clip(tiny_clip_files[0]).probs(torch.rand(3, 3, 50, 50))
    assert p.shape == (3, PATTERN_DIM)
    for c in p.split(list(NUM_CLASSES), -1):
        torch.testing.assert_close(c.sum(-1), torch.ones(3))


def test_text_embeddings_cached_once(tiny_clip_files, monkeypatch):
    per = load_clip(tiny_clip_files[0])
    calls = []
    monkeypatch.setattr(per.clip, "encode_text", lambda *a: calls.append(1))
    per.probs(torch.rand(1, 3, 32, 32))
    assert calls == []
    assert per.text.shape[0] == PATTERN_DIM == len(prompt_texts())
    assert all(len(t) >= 5 for t in prompt_texts())  # several templates per class


def test_derainer_reports_clip(tiny_clip_files, tiny_model):
    d = Derainer(tiny_model, perceiver=load_clip(tiny_clip_files[0]))
    r = d.derain(torch.rand(1, 3, 24, 24))
    assert r.perceived_by == "clip:tiny-rpn-test/random"


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(CLIPMissingError, match=str(tmp_path)):
        load_clip(tmp_path / "ViT-B-32__laion2b_s34b_b79k.safetensors")
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(CLIPMissingError, match="safetensors"):
        load_clip(tmp_path / "x.bin")
    (tmp_path / "noarch.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="architecture"):
        load_clip(tmp_path / "noarch.safetensors")
    empty = tmp_path / "folder"
    empty.mkdir()
    with pytest.raises(CLIPMissingError, match="open_clip_config.json"):
        load_clip(empty)


def test_wrong_architecture_named(tiny_clip_files, tmp_path):
    import shutil
    wrong = tmp_path / "ViT-B-32__x.safetensors"
    shutil.copy(tiny_clip_files[0], wrong)
    with pytest.raises(ValueError, match="does not fit architecture ViT-B-32"):
        load_clip(wrong)


def test_download_clip_reports_progress_and_stops_before_writing(tmp_path, monkeypatch):
    """download_clip's progress callback follows the bytes (the ComfyUI loader's bar) and is called once with
    the whole file before the copy: an exception there (Cancel) leaves nothing in the destination."""
    import huggingface_hub

    from cliprpn_core.perceiver import download_clip
    blob = tmp_path / "hub" / "open_clip_model.safetensors"
    blob.parent.mkdir()
    blob.write_bytes(b"x" * 10)
    asked = []

    def fake_download(repo_id, filename, cache_dir=None, tqdm_class=None):
        asked.append(repo_id)
        if tqdm_class is not None:
            with tqdm_class(total=10, disable=True) as bar:  # disabled console bar: still counted
                bar.update(4)
                bar.update(6)
        return str(blob)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    seen = []
    out = download_clip("ViT-B-32 LAION-2B", tmp_path / "dest", progress=lambda d, n: seen.append((d, n)))
    assert out == tmp_path / "dest" / "ViT-B-32__laion2b_s34b_b79k.safetensors" and out.read_bytes() == b"x" * 10
    assert seen == [(4, 10), (10, 10), (10, 10)] and len(asked) == 1  # the bytes, then the whole file once more

    class Cancelled(Exception):
        pass

    def cancel(d, n):
        if d == n:
            raise Cancelled
    with pytest.raises(Cancelled):
        download_clip("ViT-B-32 OpenAI", tmp_path / "dest2", progress=cancel)
    assert not list((tmp_path / "dest2").glob("*.safetensors"))
    assert download_clip("ViT-B-32 LAION-2B", tmp_path / "dest3").exists()  # no callback: the hub's own bar
