"""Annotation readers: JSONL ({"video_id", "captions" | "caption" | "desc", "qa"?}) and VALOR's
own layout (ids JSON ["video0", ...] + txt_mapper.json {id: [captions]}; QA {id: [{question, answer}]})."""
from __future__ import annotations

import json
import os
from typing import List, Optional


def _record(obj: dict, where: str) -> dict:
    vid = obj.get("video_id", obj.get("id", obj.get("clip_id")))
    if vid is None:
        raise ValueError(f"{where}: no video_id")
    caps = obj.get("captions", obj.get("caption", obj.get("desc")))
    if isinstance(caps, str):
        caps = [caps]
    if not caps or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"{where}: video {vid!r} has no captions (keys: {sorted(obj)})")
    return {"video_id": str(vid), "captions": list(caps), "qa": obj.get("qa", []), "attrs": obj.get("attrs", {})}


def read_jsonl(path: str) -> List[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            out.append(_record(obj, f"{path}:{n}"))
    return out


def read_valor(ids_path: str, txt_mapper: str, qa_mapper: Optional[str] = None) -> List[dict]:
    with open(ids_path) as f:
        ids = json.load(f)
    with open(txt_mapper) as f:
        caps = json.load(f)
    qa = {}
    if qa_mapper:
        with open(qa_mapper) as f:
            qa = json.load(f)
    out = []
    for vid in ids:
        if vid not in caps:
            raise ValueError(f"{txt_mapper}: no captions for id {vid!r} listed in {ids_path}")
        c = caps[vid]
        out.append({"video_id": vid, "captions": [c] if isinstance(c, str) else list(c), "qa": qa.get(vid, []),
                    "attrs": {}})
    return out


def read_annotations(root: str, name: str) -> List[dict]:
    """`name` is a JSONL file, a VALOR ids JSON with txt_mapper.json beside it, or
    `<format>:<file>` for a benchmark's own annotations (data/adapters.py: msrvtt, msrvtt_1ka,
    vatex, audiocaps, valor32k, msrvtt_qa), e.g. `vatex:annotations/vatex_training_v1.0.json`."""
    fmt, sep, rest = name.partition(":")
    if sep and fmt == "shards":
        from .shards import ShardIndex
        recs = ShardIndex.load(root, rest).records()
        if not recs:
            raise ValueError(f"annotations {name!r}: no sample in those shards has a .json or .txt caption")
        return recs
    if sep and not os.path.isabs(name):
        from .adapters import FORMATS, read_benchmark
        if fmt not in FORMATS:
            raise ValueError(f"annotations {name!r}: unknown format {fmt!r}; choose one of {FORMATS}")
        return read_benchmark(fmt, rest if os.path.isabs(rest) else os.path.join(root, rest))
    path = name if os.path.isabs(name) else os.path.join(root, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"annotations {path!r} not found")
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    mapper = os.path.join(os.path.dirname(path), "txt_mapper.json")
    if not os.path.exists(mapper):
        raise FileNotFoundError(f"{path!r} looks like VALOR ids JSON but {mapper!r} is missing")
    qa = os.path.join(os.path.dirname(path), "qa_mapper.json")
    return read_valor(path, mapper, qa if os.path.exists(qa) else None)
