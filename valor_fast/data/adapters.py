"""Annotation adapters for the downstream benchmarks: each turns a benchmark's own annotation file
into our records {"video_id", "captions", "qa", "attrs"} (media are looked up as
`<data.root>/<data.video_dir>/<video_id>.<ext>` and `<data.audio_dir>/<video_id>.wav|flac`).

format       file (data.*_ann)                         notes
msrvtt       MSRVTT_data.json / train_val_videodatainfo.json   {"videos": [{video_id, split}],
             "sentences": [{video_id, caption}]}; `file#train` keeps one split (train|validate|test)
msrvtt_1ka   MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence)   the 1k-A test: one caption a video
vatex        vatex_training_v1.0.json / vatex_validation_v1.0.json   [{videoID, enCap: [10]}]
audiocaps    train.csv / val.csv / test.csv (audiocap_id,youtube_id,start_time,caption)   clips named
             by youtube_id; val/test have 5 captions a clip
valor32k     desc_*.json / .jsonl   [{"video_id": "<YTID>_<start>.000_<end>.000", "desc"}]
msrvtt_qa    train_qa.json / val_qa.json / test_qa.json   [{video_id (int or "videoN"), question, answer}];
             captions are the questions (QA does not use them)
"""
from __future__ import annotations

import collections
import csv
import os
from typing import Dict, List

from .jsonio import load_json, load_json_or_lines

FORMATS = ("msrvtt", "msrvtt_1ka", "vatex", "audiocaps", "valor32k", "msrvtt_qa")


def _records(caps: Dict[str, List[str]], qa: Dict[str, List[dict]] = None) -> List[dict]:
    qa = qa or {}
    return [{"video_id": vid, "captions": c, "qa": qa.get(vid, []), "attrs": {}} for vid, c in caps.items()]


def _load_json_or_lines(path: str):
    return load_json_or_lines(path)   # malformed: AnnotationError naming path:line:col


def read_msrvtt(path: str) -> List[dict]:
    split = None
    if "#" in os.path.basename(path):
        path, split = path.rsplit("#", 1)
    d = load_json(path)
    if not isinstance(d, dict) or "sentences" not in d:
        keys = sorted(d)[:5] if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: not an MSRVTT annotation file (no 'sentences' key; keys: {keys})")
    keep = None
    if split is not None:
        keep = {v["video_id"] for v in d.get("videos", []) if v.get("split") == split}
        if not keep:
            raise ValueError(f"{path}: no videos in split {split!r}")
    caps: Dict[str, List[str]] = collections.OrderedDict()
    for s in d["sentences"]:
        if keep is None or s["video_id"] in keep:
            caps.setdefault(s["video_id"], []).append(s["caption"])
    return _records(caps)


def read_msrvtt_1ka(path: str) -> List[dict]:
    caps: Dict[str, List[str]] = collections.OrderedDict()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["video_id"], []).append(row["sentence"])
    return _records(caps)


def read_vatex(path: str) -> List[dict]:
    caps: Dict[str, List[str]] = collections.OrderedDict()
    for r in _load_json_or_lines(path):
        en = r.get("enCap")
        if not en:
            raise ValueError(f"{path}: VATEX record {r.get('videoID')!r} has no enCap")
        caps[r["videoID"]] = list(en)
    return _records(caps)


def read_audiocaps(path: str) -> List[dict]:
    caps: Dict[str, List[str]] = collections.OrderedDict()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["youtube_id"], []).append(row["caption"])
    return _records(caps)


def read_valor32k(path: str) -> List[dict]:
    caps: Dict[str, List[str]] = collections.OrderedDict()
    for r in _load_json_or_lines(path):
        caps.setdefault(str(r["video_id"]), []).append(r["desc"])
    return _records(caps)


def read_msrvtt_qa(path: str) -> List[dict]:
    qa: Dict[str, List[dict]] = collections.OrderedDict()
    for r in _load_json_or_lines(path):
        vid = r["video_id"]
        vid = f"video{vid}" if isinstance(vid, int) or str(vid).isdigit() else str(vid)
        qa.setdefault(vid, []).append({"question": r["question"], "answer": str(r["answer"])})
    return _records({vid: [q["question"] for q in qs] for vid, qs in qa.items()}, qa)


READERS = {"msrvtt": read_msrvtt, "msrvtt_1ka": read_msrvtt_1ka, "vatex": read_vatex,
           "audiocaps": read_audiocaps, "valor32k": read_valor32k, "msrvtt_qa": read_msrvtt_qa}


def read_benchmark(fmt: str, path: str) -> List[dict]:
    if fmt not in READERS:
        raise ValueError(f"data.ann_format must be auto, jsonl, valor or one of {FORMATS}; got {fmt!r}")
    if not os.path.exists(path.rsplit("#", 1)[0]):
        raise FileNotFoundError(f"{fmt} annotations {path!r} not found")
    recs = READERS[fmt](path)
    if not recs:
        raise ValueError(f"{path}: no clips read as {fmt}")
    return recs
