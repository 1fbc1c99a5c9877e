"""The synthetic-data generator never deletes a folder it cannot prove it wrote: a real dataset
with its own meta.json, a non-empty folder given to `data synth`, a foreign leftover temp folder
are refused with an error naming the folder; its own sets are regenerated."""
import json
import os

import pytest

import valor_fast.data.synth as synth
from valor_fast.cli import main
from valor_fast.config import load_config
from valor_fast.data.synth import generate, prepare_data
from valor_fast.utils.fs import OWNER_MARKER, ForeignContentError


@pytest.fixture
def fast_clips(monkeypatch):
    """generate() with tiny stand-in media files (the layout and bookkeeping are what is tested)."""
    def clip(job):
        vid, _, _, root = job[:4]
        for sub, ext in (("videos", ".webm"), ("audios", ".wav")):
            with open(os.path.join(root, sub, vid + ext), "wb") as f:
                f.write(b"x")
    monkeypatch.setattr(synth, "_make_clip", clip)
    return lambda root, **kw: generate(str(root), clips_per_combo=1, progress=False, workers=1, **kw)


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _real_dataset(root):
    root.mkdir()
    (root / "train.jsonl").write_text('{"video_id": "v1", "captions": ["a dog"]}\n')
    (root / "meta.json").write_text(json.dumps({"name": "my corpus", "version": 7}))
    (root / "videos").mkdir()
    (root / "videos" / "v1.mp4").write_bytes(b"precious")
    return _tree(root)


def _cfg(root, **over):
    return load_config(None, dict({"data.root": str(root), "data.synth": "true"}, **over))


def test_real_folder_with_a_foreign_meta_json_is_never_deleted(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    before = _real_dataset(root)
    monkeypatch.setattr(synth, "generate", lambda *a, **k: pytest.fail("must not generate over a user's folder"))
    with pytest.raises(ForeignContentError) as ei:
        prepare_data(_cfg(root))
    msg = str(ei.value)
    assert str(root) in msg and "--data.synth false" in msg and "\n" not in msg
    assert _tree(root) == before
    # no annotations where the config looks, and other files there: not generated over either
    with pytest.raises(ForeignContentError, match="data.train_ann"):
        prepare_data(_cfg(root, **{"data.train_ann": "other.jsonl"}))
    assert _tree(root) == before
    prepare_data(_cfg(root, **{"data.synth": "false"}))   # used as the dataset it is
    assert _tree(root) == before


def test_data_synth_onto_a_non_empty_folder_refuses(tmp_path, capsys):
    root = tmp_path / "corpus"
    before = _real_dataset(root)
    assert main(["data", "synth", "--root", str(root), "--clips-per-combo", "1"]) == 2
    err = capsys.readouterr().err
    assert str(root) in err and "Traceback" not in err and "refusing" in err
    assert _tree(root) == before
    # a stray user file inside an otherwise empty folder is enough
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep")
    with pytest.raises(ForeignContentError):
        generate(str(other), progress=False)
    assert (other / "todo.txt").read_text() == "keep"


def test_own_sets_are_marked_and_regenerated(tmp_path, fast_clips, monkeypatch):
    root = tmp_path / "synth"
    root.mkdir()                                          # an empty folder is fine
    fast_clips(root, seed=1)
    marker = json.loads((root / OWNER_MARKER).read_text())
    assert marker["kind"] == synth.KIND and "train.jsonl" in marker["files"] and "meta.json" in marker["files"]
    (root / ".cache" / "32").mkdir(parents=True)          # the loaders' decode cache may be added later
    (root / ".cache" / "32" / "train0000.pt").write_bytes(b"cache")
    fast_clips(root, seed=2)                              # regenerated in place: ours, nothing foreign
    assert json.loads((root / "meta.json").read_text())["seed"] == 2 and not (root / ".cache").exists()
    # prepare_data regenerates a stale set of ours (other seed) and reuses a matching one
    calls = []
    monkeypatch.setattr(synth, "generate", lambda r, **kw: calls.append(kw["seed"]))
    prepare_data(_cfg(root, **{"data.synth_seed": "2", "data.synth_clips_per_combo": "1"}))
    assert calls == []
    prepare_data(_cfg(root, **{"data.synth_seed": "3", "data.synth_clips_per_combo": "1"}))
    assert calls == [3]
    # once a user's file is inside, it is no longer provably ours
    (root / "videos" / "mine.mp4").write_bytes(b"user")
    with pytest.raises(ForeignContentError, match="mine.mp4"):
        prepare_data(_cfg(root, **{"data.synth_seed": "4", "data.synth_clips_per_combo": "1"}))
    monkeypatch.undo()
    assert (root / "videos" / "mine.mp4").read_bytes() == b"user"


def test_leftover_temp_folder(tmp_path, fast_clips, monkeypatch):
    root = tmp_path / "synth"
    clip, n = synth._make_clip, []

    def crash_later(job):
        n.append(1)
        if len(n) > 5:
            raise RuntimeError("killed mid-generation")
        clip(job)
    monkeypatch.setattr(synth, "_make_clip", crash_later)
    with pytest.raises(RuntimeError, match="killed"):
        generate(str(root), clips_per_combo=1, progress=False, workers=1)
    assert (tmp_path / "synth.tmp").is_dir() and not root.exists()
    monkeypatch.setattr(synth, "_make_clip", clip)
    fast_clips(root)                                       # a partial set of ours: cleared, regenerated
    assert not (tmp_path / "synth.tmp").exists() and (root / "train.jsonl").exists()
    foreign = tmp_path / "other.tmp"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"user")
    with pytest.raises(ForeignContentError, match="other.tmp"):
        fast_clips(tmp_path / "other")
    assert (foreign / "data.bin").read_bytes() == b"user"
