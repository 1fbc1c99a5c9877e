"""Synthetic dataset, annotations, decoding, loader output."""
import json
import os

import pytest
import torch

from valor_fast.config import DataConfig
from valor_fast.data import build_loader, collate, generate, get_tokenizer
from valor_fast.data.annotations import read_annotations
from valor_fast.data.dataset import VideoAudioTextDataset
from valor_fast.data.synth import audio_combos, split_combos, video_combos
from valor_fast.data.video import CLIP_MEAN, CLIP_STD, sample_indices


@pytest.fixture(scope="module")
def ds_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d") / "synth")
    generate(root, seed=5, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    return root


def test_split_design():
    train, test, val = split_combos()
    assert len(test) == 48 and len(train) == 96 and not set(train) & set(test)
    assert set(val) <= set(train)
    vcs, acs = video_combos(), audio_combos()
    for pos, values in ((0, "color"), (1, "shape"), (2, "motion")):
        assert {vcs[v][pos] for v, _ in train} == {c[pos] for c in vcs}
    for pos in (0, 1):
        assert {acs[a][pos] for _, a in train} == {c[pos] for c in acs}
    per_v, per_a = {}, {}
    for v, a in test:
        per_v.setdefault(v, set()).add(a)
        per_a.setdefault(a, set()).add(v)
    assert all(len(s) == 2 for s in per_v.values()) and all(len(s) == 8 for s in per_a.values())


def test_generation_is_deterministic(ds_root, tmp_path):
    again = str(tmp_path / "again")
    other = str(tmp_path / "other")
    generate(again, seed=5, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    generate(other, seed=6, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    for split in ("train", "val", "test"):
        a = open(os.path.join(ds_root, f"{split}.jsonl")).read()
        assert a == open(os.path.join(again, f"{split}.jsonl")).read()
    assert open(os.path.join(ds_root, "train.jsonl")).read() != open(os.path.join(other, "train.jsonl")).read()
    d1 = VideoAudioTextDataset(DataConfig(root=ds_root, cache=False), "test", 32, False)
    d2 = VideoAudioTextDataset(DataConfig(root=again, cache=False), "test", 32, False)
    torch.testing.assert_close(d1[3]["video"], d2[3]["video"])
    torch.testing.assert_close(d1[3]["audio"], d2[3]["audio"])
    assert not os.path.exists(again + ".tmp")


def test_captions_name_both_modalities(ds_root):
    recs = read_annotations(ds_root, "test.jsonl")
    for r in recs:
        a = r["attrs"]
        assert a["color"] in r["captions"][0] and a["pitch"] in r["captions"][0]
        assert len(r["captions"]) >= 4 and len(set(r["captions"])) == len(r["captions"])
        assert {q["answer"] for q in r["qa"]} >= {a["color"], a["shape"], a["pitch"], a["rhythm"]}


def test_loader_shapes_and_normalisation(ds_root):
    cfg = DataConfig(root=ds_root, frames_train=3, frames_test=4)
    loader = build_loader(cfg, "test", 32, 5, False)
    b = next(iter(loader))
    assert b["video"].shape == (5, 4, 3, 32, 32) and b["video"].dtype == torch.float32
    assert b["audio"].shape == (5, 1, 512, 64)
    assert b["text_ids"].shape == b["text_mask"].shape and b["text_ids"].dtype == torch.int64
    assert (b["text_ids"][:, 0] == 101).all() and b["has_audio"].all()
    assert ((b["text_ids"] == 102).sum(1) == 1).all()
    # the background corner of a synthetic frame is grey (r = g = b = level in [85, 140]):
    # undo CLIP normalisation and compare within VP9/yuv420 decode tolerance
    px = b["video"][0, 0, :, 1, 1] * torch.tensor(CLIP_STD) + torch.tensor(CLIP_MEAN)
    assert (px.max() - px.min()) * 255 < 6 and 80 / 255 < float(px.mean()) < 145 / 255
    recs = read_annotations(ds_root, "test.jsonl")
    assert b["video_id"] == [r["video_id"] for r in recs[:5]]
    assert b["caption"][0] == recs[0]["captions"][0]


def test_frame_sampling():
    assert sample_indices(32, 4, False) == [3, 11, 19, 27]
    assert sample_indices(2, 4, False) == [0, 0, 1, 1]    # short videos repeat frames
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = sample_indices(32, 4, True, g)
        assert all(8 * s <= i < 8 * (s + 1) for s, i in enumerate(idx))


def test_tokenizer_real_vocab():
    tok = get_tokenizer()
    assert tok("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]
    assert tok.vocab_size == 30522
    from valor_fast.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id) == (CLS_ID, SEP_ID, MASK_ID, PAD_ID)


def test_valor_layout_and_missing_audio(tmp_path, ds_root):
    import shutil
    root = tmp_path / "valor"
    shutil.copytree(ds_root, root)
    recs = read_annotations(str(root), "test.jsonl")[:3]
    (root / "ids_test.json").write_text(json.dumps([r["video_id"] for r in recs]))
    (root / "txt_mapper.json").write_text(json.dumps({r["video_id"]: r["captions"] for r in recs}))
    os.remove(root / "audios" / (recs[1]["video_id"] + ".wav"))
    cfg = DataConfig(root=str(root), test_ann="ids_test.json", cache=False)
    ds = VideoAudioTextDataset(cfg, "test", 32, False)
    assert len(ds) == 3 and ds.records[2]["captions"] == recs[2]["captions"]
    b = collate([ds[i] for i in range(3)])
    assert b["has_audio"].tolist() == [True, False, True]
    assert (b["audio"][1] == 0).all()
    # the fbank has the model's mel bins (model.audio_mel_bins, passed in), the silent clip's zeros too
    b128 = collate([VideoAudioTextDataset(cfg, "test", 32, False, mel_bins=128)[i] for i in range(3)])
    assert b128["audio"].shape == (3, 1, 512, 128) and (b128["audio"][1] == 0).all()
    assert b128["audio"][0].abs().sum() > 0


def test_bad_annotation_line_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"video_id": "a", "captions": ["x"]}\n{"video_id": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_annotations(str(tmp_path), "bad.jsonl")
