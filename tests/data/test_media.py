"""Data backends and bad media: the DALI pipeline (its CPU operators here) against the CPU path,
the batched device fbank against Kaldi, and a dataset with planted bad files."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from valor_fast.config import DataConfig
from valor_fast.data.dataset import VideoAudioTextDataset, collate
from valor_fast.data.media import BadMediaError, BadMediaTracker, ReplacementOrder
from valor_fast.utils import deps

HAS_DALI = deps.HAS_DALI
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed (pip install nvidia-dali-cuda130)")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.environ.get("VALOR_FAST_GOLDEN", os.path.join(REPO, "..", "shared", "golden", "fbank"))
SIZE = 32
# one 8-bit level of a frame, in CLIP-normalised units (the smallest channel std is 0.26)
LEVEL = 1.0 / 255 / 0.26


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from valor_fast.data.synth import generate
    root = str(tmp_path_factory.mktemp("m") / "synth")
    generate(root, seed=11, clips_per_combo=1, image_size=SIZE, seconds=1.0, progress=False)
    return root


def _train_ids(root):
    return [json.loads(l)["video_id"] for l in open(os.path.join(root, "train.jsonl")) if l.strip()]


# -- planted bad files ----------------------------------------------------------------------
BAD = ("zero_video", "truncated_video", "random_video", "missing_video", "zero_audio", "truncated_audio")
GOOD_ODD = ("missing_audio", "short_clip", "audio_22k")


@pytest.fixture(scope="module")
def planted(synth_root, tmp_path_factory):
    """A copy of the synthetic set whose first train clips have planted problems: {kind: id}."""
    from valor_fast.data.synth import write_wav, write_webm
    root = str(tmp_path_factory.mktemp("bad") / "ds")
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns(".cache"))
    ids = _train_ids(root)
    kinds = dict(zip(BAD + GOOD_ODD, ids[3:3 + len(BAD) + len(GOOD_ODD)]))
    v = lambda k: os.path.join(root, "videos", kinds[k] + ".webm")
    a = lambda k: os.path.join(root, "audios", kinds[k] + ".wav")
    open(v("zero_video"), "wb").close()
    data = open(v("truncated_video"), "rb").read()
    open(v("truncated_video"), "wb").write(data[:len(data) * 2 // 5])
    open(v("random_video"), "wb").write(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    os.remove(v("missing_video"))
    open(a("zero_audio"), "wb").close()
    wav = open(a("truncated_audio"), "rb").read()
    open(a("truncated_audio"), "wb").write(wav[:len(wav) // 2])
    os.remove(a("missing_audio"))
    # 0.2 s: 2 frames at 8 fps (fewer than the 4 asked) and 3,200 samples (under one slice)
    rng = np.random.default_rng(1)
    write_webm(v("short_clip"), rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8), 8)
    write_wav(a("short_clip"), (rng.standard_normal(3200) * 3000).astype(np.int16), 16000)
    t = np.arange(22050) / 22050
    write_wav(a("audio_22k"), (np.sin(2 * np.pi * 660 * t) * 8000).astype(np.int16), 22050)
    return root, kinds


def _gen(i):
    return torch.Generator().manual_seed(1000 + i)


def _run_cpu(root, cache, train=True, **over):
    cfg = DataConfig(root=root, cache=cache, **over)
    ds = VideoAudioTextDataset(cfg, "train", SIZE, train=train, seed=0)
    tr = BadMediaTracker(1.0, len(ds))
    tr.add_scan(ds.scan_bad, ds.scanned)
    out = []
    for b0 in range(0, len(ds), 8):
        batch = collate([ds.get(i, _gen(i) if train else None) for i in range(b0, min(len(ds), b0 + 8))])
        tr.update(batch)
        out.append(batch)
    return ds, tr, out


def _run_dali(root, train=True, **over):
    from valor_fast.data.dali_loader import DaliLoader
    cfg = DataConfig(root=root, backend="dali", **over)
    ds = VideoAudioTextDataset(cfg, "train", SIZE, train=train, seed=0, cache=False)
    keys = [[(i, _gen(i) if train else None) for i in range(b0, min(len(ds), b0 + 8))] for b0 in range(0, len(ds), 8)]
    tr = BadMediaTracker(1.0, len(ds))
    out = []
    for batch in DaliLoader(ds, keys, prefetch=1):
        tr.update(batch)
        out.append(batch)
    return ds, tr, out


def _check_planted(root, kinds, ds, tr, batches):
    bad_ids = {kinds[k] for k in BAD}
    # every bad id reported, nothing else
    assert set(tr.bad) == bad_ids, (set(tr.bad) ^ bad_ids)
    for vid in bad_ids:
        assert vid in tr.bad and tr.bad[vid]
    # counts: one replaced sample per bad requested index, every sample delivered
    assert tr.replaced == len(bad_ids) and tr.seen == len(ds)
    assert sum(b["n_bad"] for b in batches) == len(bad_ids)
    recs = {r["video_id"]: r for r in ds.records}
    got = [vid for b in batches for vid in b["video_id"]]
    assert not set(got) & bad_ids
    for b in batches:
        for k, vid in enumerate(b["video_id"]):
            # captions stay with their clip: the caption and index are the delivered clip's own
            assert b["caption"][k] in recs[vid]["captions"]
            assert ds.records[int(b["index"][k])]["video_id"] == vid
            assert b["text_ids"][k, 0] == 101   # [CLS] of its own tokenised caption
        assert torch.isfinite(b["video"]).all() and torch.isfinite(b["audio"]).all()
    has = {vid: bool(h) for b in batches for vid, h in zip(b["video_id"], b["has_audio"])}
    assert has[kinds["missing_audio"]] is False
    assert has[kinds["short_clip"]] is True and has[kinds["audio_22k"]] is True
    assert sum(not h for h in has.values()) == 1
    return got


def test_planted_bad_media_cpu(planted):
    root, kinds = planted
    runs = {}
    for cache in (False, True):
        ds, tr, batches = _run_cpu(root, cache)
        runs[cache] = _check_planted(root, kinds, ds, tr, batches)
        if cache:   # the start-up decode found them all before the first batch
            assert set(ds.scan_bad) == {kinds[k] for k in BAD}
    # the replacement is a function of (seed, index) and the bad set, not of when it was found
    assert runs[False] == runs[True]
    # and of the seed: another seed's permutation picks other stand-ins
    n = len(runs[True])
    assert ReplacementOrder(n, 0).perm != ReplacementOrder(n, 1).perm


@needs_dali
def test_planted_bad_media_dali(planted):
    root, kinds = planted
    ds, tr, batches = _run_dali(root)
    got = _check_planted(root, kinds, ds, tr, batches)
    _, _, cpu = _run_cpu(root, False)
    assert got == [v for b in cpu for v in b["video_id"]]


def test_bad_rate_stops_with_a_report(planted):
    root, kinds = planted
    ds = VideoAudioTextDataset(DataConfig(root=root, cache=False), "train", SIZE, train=True)
    tr = BadMediaTracker(0.02, len(ds))
    with pytest.raises(BadMediaError) as ei:
        for b0 in range(0, len(ds), 8):
            tr.update(collate([ds.get(i, _gen(i)) for i in range(b0, min(len(ds), b0 + 8))]))
    msg = str(ei.value)
    for k in BAD:
        assert kinds[k] in msg
    assert ei.value.report["replaced"] == len(BAD) and "max_bad_rate=0.02" in msg
    # 0 stops at the first bad file; a start-up scan is judged at once
    tr0 = BadMediaTracker(0.0, len(ds))
    with pytest.raises(BadMediaError):
        tr0.update(collate([ds.get(i, None) for i in range(len(ds))]))
    with pytest.raises(BadMediaError, match="start-up"):
        BadMediaTracker(0.05, 10).add_scan({"a": "x"}, 10)
    with pytest.raises(ValueError, match="max_bad_rate"):
        BadMediaTracker(1.5, 10)


def test_eval_split_drops_bad_clips(planted):
    root, kinds = planted
    # the planted train split read as an evaluation split: bad clips are left out (logged)
    cfg = DataConfig(root=root, cache=False, test_ann="train.jsonl")
    ds = VideoAudioTextDataset(cfg, "test", SIZE, train=False)
    ids = [r["video_id"] for r in ds.records]
    assert not {kinds[k] for k in BAD} & set(ids)
    assert len(ids) == len(_train_ids(root)) - len(BAD)
    assert len(ds.caption_ids) == len(ids)


def test_missing_audio_can_be_bad(planted):
    root, kinds = planted
    cfg = DataConfig(root=root, cache=False, allow_missing_audio=False)
    ds = VideoAudioTextDataset(cfg, "train", SIZE, train=True)
    i = [r["video_id"] for r in ds.records].index(kinds["missing_audio"])
    s = ds.get(i, _gen(i))
    assert s["n_bad"] == 1 and s["video_id"] != kinds["missing_audio"]
    assert "allow_missing_audio" in dict(s["bad_media"])[kinds["missing_audio"]]


def test_trainer_stops_on_bad_rate_and_keeps_a_checkpoint(planted, tmp_path):
    from valor_fast.config import load_config
    from valor_fast.train.trainer import train
    root, _ = planted
    o = {"data.root": root, "model.image_size": str(SIZE), "model.patch_size": "8", "train.steps": "6",
         "train.batch_size": "8", "train.out_dir": str(tmp_path), "train.run_name": "b", "train.log_every": "3",
         "data.synth": "false", "data.cache": "false", "data.max_bad_rate": "0.0", "train.final_eval": "false"}
    with pytest.raises(BadMediaError):
        train(load_config(None, o))
    run = tmp_path / "b"
    rep = json.loads((run / "bad_media_rank0.json").read_text())
    assert rep["replaced"] >= 1 and rep["bad"]
    # judged at the first log step (3): that step's weights are checkpointed, complete
    steps = [p for p in run.rglob("step_*") if p.is_dir() and not p.name.endswith(".tmp")]
    assert [p.name for p in steps] == ["step_00000003"], steps
    assert (steps[0] / "meta.json").exists()


# -- DALI CPU pipeline vs the CPU path ---------------------------------------------------------
@needs_dali
@pytest.mark.parametrize("train,over", [(False, {}), (True, {}),
                                        (True, {"hflip": True, "crop_scale_min": 0.6, "video_dtype": "bf16"})])
def test_dali_matches_cpu_path(synth_root, train, over):
    from valor_fast.data.dali_loader import DaliLoader
    cfg = DataConfig(root=synth_root, **over)
    cpu = VideoAudioTextDataset(cfg, "test", SIZE, train=train, cache=False)
    dal = VideoAudioTextDataset(cfg, "test", SIZE, train=train, cache=False)
    idx = list(range(0, len(cpu), 5))[:6] + [len(cpu) - 1]
    keys = [(i, _gen(i) if train else None) for i in idx]
    a = DaliLoader(dal, [keys], prefetch=0).make_batch(keys)
    b = collate([cpu.get(i, _gen(i) if train else None) for i in idx])
    # identical structure: keys, shapes, dtypes; identical draws: ids, captions
    assert set(a) == set(b)
    for k in a:
        if torch.is_tensor(b[k]):
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        else:
            assert a[k] == b[k], k
    assert torch.equal(a["text_ids"], b["text_ids"]) and torch.equal(a["has_audio"], b["has_audio"])
    # frames: the decoders agree within a level or two (shared YUV->RGB conversion, resize
    # round-off); the crop is cut from the full frame by DALI and from the cached square on the
    # CPU path, which blurs edges a little more
    d = (a["video"].float() - b["video"].float()).abs()
    if "crop_scale_min" in over:
        assert d.mean() < 3 * LEVEL, d.mean()
    else:
        assert d.max() <= 3 * LEVEL + (0.02 if over.get("video_dtype") == "bf16" else 0), d.max()
    # audio: same slices, fbank within the CPU path's fp16 storage
    torch.testing.assert_close(a["audio"], b["audio"], atol=3e-3, rtol=0)


@needs_dali
def test_dali_frame_folders_match_cpu_path(synth_root, tmp_path):
    """VALOR's layout of pre-extracted JPEG frames, decoded by DALI's image decoder and the CPU
    path."""
    from valor_fast.data.dali_loader import DaliLoader
    from valor_fast.data.tools import write_frame_folders
    root = str(tmp_path / "frames")
    recs = [json.loads(l) for l in open(os.path.join(synth_root, "test.jsonl")) if l.strip()][:5]
    src = str(tmp_path / "src")
    os.makedirs(os.path.join(src, "videos"))
    for f in ("train.jsonl", "val.jsonl"):
        shutil.copy(os.path.join(synth_root, f), src)
    shutil.copytree(os.path.join(synth_root, "audios"), os.path.join(src, "audios"))
    for r in recs:
        shutil.copy(os.path.join(synth_root, "videos", r["video_id"] + ".webm"), os.path.join(src, "videos"))
    assert write_frame_folders(src, root) == 5
    assert sorted(os.listdir(os.path.join(root, "videos", recs[0]["video_id"])))[0] == "00000.jpg"
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    cfg = DataConfig(root=root)
    cpu = VideoAudioTextDataset(cfg, "test", SIZE, train=False, cache=False)
    dal = VideoAudioTextDataset(cfg, "test", SIZE, train=False, cache=False)
    keys = [(i, None) for i in range(len(recs))]
    a = DaliLoader(dal, [keys], prefetch=0).make_batch(keys)
    b = collate([cpu.get(i) for i in range(len(recs))])
    assert a["video"].shape == b["video"].shape == (5, 4, 3, SIZE, SIZE)
    # JPEG decoders differ in IDCT and chroma upsampling by a few levels
    assert (a["video"] - b["video"]).abs().mean() < 2 * LEVEL
    assert (a["video"] - b["video"]).abs().max() < 12 * LEVEL


def test_data_check_cli(planted, tmp_path):
    from valor_fast.cli import main
    root, kinds = planted
    out = tmp_path / "rep.json"
    assert main(["data", "check", root, "--out", str(out), "--workers", "1"]) == 1   # bad files: rc 1
    rep = json.loads(out.read_text())
    tr = rep["splits"]["train"]
    found = set(tr["bad_video"]) | set(tr["bad_audio"])
    assert found == {kinds[k] for k in BAD}
    assert set(tr["bad_audio"]) == {kinds["zero_audio"], kinds["truncated_audio"]}
    assert "truncated" in tr["bad_audio"][kinds["truncated_audio"]]
    assert tr["missing_audio"] == [kinds["missing_audio"]]
    assert 22050 in tr["sample_rates"] and rep["bad"] == len(BAD)
    assert not rep["splits"]["test"]["bad_video"]


@needs_dali
def test_dali_backend_trains(synth_root, tmp_path):
    """`--data.backend dali` end to end (DALI's CPU operators here; the trainer's loader, the
    final evaluation's loader)."""
    from valor_fast.config import load_config
    from valor_fast.train.trainer import train
    o = {"data.root": synth_root, "model.image_size": str(SIZE), "model.patch_size": "8", "train.steps": "4",
         "train.batch_size": "8", "train.out_dir": str(tmp_path), "train.run_name": "d", "train.log_every": "2",
         "data.synth": "false", "data.backend": "dali", "eval.max_len": "4", "eval.beam": "1"}
    m = train(load_config(None, o))
    hist = json.loads((tmp_path / "d" / "history.json").read_text())
    assert len(hist) == 4 and all(np.isfinite(h["loss"]) for h in hist)
    assert 0.0 <= m["retrieval/t2av/R@1"] <= 1.0


# -- WebDataset tar shards ---------------------------------------------------------------------
def test_tar_shards_match_folders_and_report_bad_members(planted, tmp_path):
    """The planted set packed into tar shards (media + <id>.json captions) gives the same batches
    as the folder layout: same ids, captions, frames and fbank, same bad ids reported; a shard
    cut mid-member turns that member into a truncated file, not a crash."""
    from valor_fast.data.shards import ShardIndex, expand_shards, sample_key
    from valor_fast.data.tools import write_shards
    root, kinds = planted
    write_shards(root, os.path.join(root, "shards"), per_shard=7, prefix="train", video_dir="videos",
                 audio_dir="audios", ann="train.jsonl")
    assert sample_key("a/b.c.MP4") == ("a/b", ".c.mp4")
    # media from shards, annotations from the JSONL: same batches as the folders
    _, tr_f, folder = _run_cpu(root, cache=False)
    hidden = os.path.join(root, "videos_off")
    os.rename(os.path.join(root, "videos"), hidden)      # the shards must be what is read
    try:
        ds, tr_s, shard = _run_cpu(root, cache=False, shards="shards/train-*.tar", video_dir="none")
        assert ds.shards is not None and all("::" in ds.paths(i)[0] for i in range(len(ds)) if i not in ds.bad)
        _check_planted(root, kinds, ds, tr_s, shard)
        assert set(tr_s.bad) == set(tr_f.bad)
        for a, b in zip(folder, shard):
            assert a["video_id"] == b["video_id"] and a["caption"] == b["caption"]
            torch.testing.assert_close(a["video"], b["video"], atol=0, rtol=0)
            torch.testing.assert_close(a["audio"], b["audio"], atol=0, rtol=0)
        # captions from the shards' .json members too (annotations = shards:<glob>)
        cfg = DataConfig(root=root, train_ann="shards:shards/train-*.tar", video_dir="none", cache=False)
        ds2 = VideoAudioTextDataset(cfg, "train", SIZE, train=True)
        assert [r["video_id"] for r in ds2.records] == [r["video_id"] for r in ds.records]
        assert [r["captions"] for r in ds2.records] == [r["captions"] for r in ds.records]
        if HAS_DALI:
            dds, dtr, dal = _run_dali(root, shards="shards/train-*.tar", video_dir="none")
            _check_planted(root, kinds, dds, dtr, dal)
        # a shard cut inside its last member's data: that member reads as truncated and is
        # reported; the members before it still decode
        last = sorted(expand_shards(root, "shards/train-*.tar"))[0]
        idx = ShardIndex([last])
        name, (off, size) = max(((n, loc) for (s, n), loc in idx.members.items() if n.endswith(".wav")),
                                key=lambda t: t[1][0])
        cut = os.path.join(root, "cut")
        os.makedirs(cut)
        with open(last, "rb") as f:
            open(os.path.join(cut, "c.tar"), "wb").write(f.read(off + size // 3))
        cidx = ShardIndex([os.path.join(cut, "c.tar")])
        key, ext = sample_key(name)
        got = cidx.find(key, (ext,))
        from valor_fast.data.media import probe_audio
        from valor_fast.data.video import DecodeError
        assert got is not None and cidx.members[(os.path.join(cut, "c.tar"), name)] == (off, size // 3)
        with pytest.raises(DecodeError, match="truncated"):
            probe_audio(got)
        whole = idx.find(key, (ext,))
        assert probe_audio(whole).n_samples > 0          # the same member, whole, is fine
    finally:
        os.rename(hidden, os.path.join(root, "videos"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shards(root, "nope-*.tar")
    open(os.path.join(root, "x.tar.gz"), "wb").close()
    with pytest.raises(ValueError, match="uncompressed"):
        expand_shards(root, "x.tar.gz")
    open(os.path.join(root, "junk.tar"), "wb").write(b"\x01" * 1000)
    with pytest.raises(ValueError, match="junk.tar"):
        ShardIndex([os.path.join(root, "junk.tar")])


@pytest.mark.parametrize("train", [True, False])
def test_uncached_path_decodes_only_planned_frames_and_matches_cache(synth_root, train, monkeypatch):
    """cache=False probes, draws the plan and decodes only the planned frames; the batch equals
    the cached path's (all frames decoded once, then indexed) exactly."""
    import valor_fast.data.video as V
    over = {"hflip": True, "crop_scale_min": 0.5} if train else {}
    cached = VideoAudioTextDataset(DataConfig(root=synth_root, **over), "test", SIZE, train=train)
    seen = []
    real = V.decode_video
    monkeypatch.setattr("valor_fast.data.dataset.decode_video",
                        lambda p, idx=None: (seen.append(idx), real(p, idx))[1])
    plain = VideoAudioTextDataset(DataConfig(root=synth_root, cache=False, **over), "test", SIZE, train=train)
    idx = [0, 3, 7, len(plain) - 1]
    a = collate([cached.get(i, _gen(i) if train else None) for i in idx])
    b = collate([plain.get(i, _gen(i) if train else None) for i in idx])
    assert len(seen) == len(idx) and all(s is not None and len(s) == plain.n_frames() for s in seen)
    assert a["video_id"] == b["video_id"] and a["caption"] == b["caption"]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    # repeated indices (a clip shorter than the frames asked) come back in order
    path = plain.paths(0)[0]
    full = real(path)
    torch.testing.assert_close(torch.from_numpy(real(path, [5, 1, 5])), torch.from_numpy(full[[5, 1, 5]]))
    with pytest.raises(V.DecodeError, match="ended after"):
        real(path, [len(full) + 3])
