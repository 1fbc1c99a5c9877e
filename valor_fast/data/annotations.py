"""Annotation readers: JSONL ({"video_id", "captions" | "caption" | "desc", "qa"?}) and VALOR's
own layout (ids JSON ["video0", ...] + txt_mapper.json {id: [captions]}; QA {id: [{question, answer}]}).

`check_splits` reads the annotation files of every split a run will use before any work starts
(the trainer, `valor-fast eval`): a missing file is a FileNotFoundError naming the split and
the path, a malformed one an AnnotationError (a ValueError) naming the file and the line:column
or record at fault -- not an error found after hours of training when the test split is read."""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

from .jsonio import AnnotationError, load_json, loads_at


def _record(obj: dict, where: str) -> dict:
    vid = obj.get("video_id", obj.get("id", obj.get("clip_id")))
    if not isinstance(obj, dict):
        raise AnnotationError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if vid is None:
        raise AnnotationError(f"{where}: no video_id")
    caps = obj.get("captions", obj.get("caption", obj.get("desc")))
    if isinstance(caps, str):
        caps = [caps]
    if not caps or not all(isinstance(c, str) for c in caps):
        raise AnnotationError(f"{where}: video {vid!r} has no captions (keys: {sorted(obj)})")
    return {"video_id": str(vid), "captions": list(caps), "qa": obj.get("qa", []), "attrs": obj.get("attrs", {})}


def read_jsonl(path: str) -> List[dict]:
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    out.append(_record(loads_at(line.rstrip("\r\n"), path, n), f"{path}:{n}"))
        except UnicodeDecodeError as e:
            raise AnnotationError(f"{path}:{len(out) + 1}: not UTF-8 text: {e.reason}") from None
    return out


def read_valor(ids_path: str, txt_mapper: str, qa_mapper: Optional[str] = None) -> List[dict]:
    ids, caps = load_json(ids_path), load_json(txt_mapper)
    qa = load_json(qa_mapper) if qa_mapper else {}
    if not isinstance(ids, list):
        raise AnnotationError(f"{ids_path}: a VALOR ids file is a JSON list of ids, got {type(ids).__name__}")
    if not isinstance(caps, dict):
        raise AnnotationError(f"{txt_mapper}: a txt_mapper is a JSON object {{id: captions}}, got {type(caps).__name__}")
    out = []
    for vid in map(str, ids):           # JSON object keys are strings; ids may be listed as numbers
        if vid not in caps:
            raise AnnotationError(f"{txt_mapper}: no captions for id {vid!r} listed in {ids_path}")
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
            raise AnnotationError(f"annotations {name!r}: no sample in those shards has a .json or .txt caption")
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


SPLITS = ("train", "val", "test")


def run_splits(cfg) -> Tuple[str, ...]:
    """The splits a training run (`cfg`: the run's Config) reads: train; val when
    train.eval_every > 0; test when train.final_eval."""
    tc = cfg.train
    return ("train",) + (("val",) if tc.eval_every else ()) + (("test",) if tc.final_eval else ())


def check_splits(data_cfg, splits: Iterable[str] = SPLITS) -> Dict[str, int]:
    """Read the annotations of every split in `splits` now -> {split: records}.  Raises
    FileNotFoundError naming the split, its data.<split>_ann and the path when a file is
    missing; AnnotationError (ValueError) naming the split and file:line:col (or the record)
    when one is malformed or holds no record."""
    out: Dict[str, int] = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        ann = getattr(data_cfg, f"{split}_ann")
        where = f"{split} split (data.{split}_ann={ann!r}, data.root={data_cfg.root!r})"
        try:
            recs = read_annotations(data_cfg.root, ann)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: {e.args[-1] if e.args else e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise AnnotationError(f"{where}: {e}") from None
        if not recs:
            raise AnnotationError(f"{where}: the annotations hold no clip")
        out[split] = len(recs)
    return out
