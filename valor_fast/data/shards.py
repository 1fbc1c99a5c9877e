"""Media and captions inside tar shards (WebDataset layout: the files of one sample share a key,
the member name up to the first dot of its base name: `clips/abc.mp4`, `clips/abc.wav`,
`clips/abc.json` are sample `clips/abc`).

A shard is read in place, never unpacked: one pass over its tar headers gives each member's
data offset and size (a 1 GB shard of 10 s clips has ~2,000 members; its headers read in well
under a second), and the index is cached under `<root>/.cache/shards/`, keyed by each shard's
size and mtime.  A member is named by a *media path* `"<shard path>::<member name>"`; the
`media_*` helpers below take either such a path or a plain file path, so every decoder (PyAV,
soundfile, DALI's encoded-bytes input) reads both.  Only uncompressed tars can be read in
place (`.tar`); a compressed one (`.tar.gz`) is refused with a message saying so.

Member names are data: one that is absolute, holds `..`, a NUL byte or `::` (paths.id_problem)
is skipped when the shard is indexed (counted and logged, in `ShardIndex.unsafe`), so it never
becomes a clip id, a media path or a cache name."""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

from ..utils.log import get_logger
from .errors import DecodeError
from .paths import SHARD_SEP, dataset_cache, id_problem, write_private

log = get_logger(__name__)

SEP = SHARD_SEP   # "<shard path>::<member name>"
INDEX_VERSION = 1
_INDEXES: Dict[tuple, "ShardIndex"] = {}   # per process: one index per (root, globs)


def is_member(path: Optional[str]) -> bool:
    return bool(path) and SEP in path


def split_member(path: str) -> Tuple[str, str]:
    shard, _, name = path.partition(SEP)
    return shard, name


def _locate(path: str) -> Tuple[str, int, int]:
    """(shard, data offset, size) of a member path; raises FileNotFoundError when the shard or
    member does not exist."""
    shard, name = split_member(path)
    idx = ShardIndex.for_shard(shard)
    loc = idx.members.get((shard, name))
    if loc is None:
        raise FileNotFoundError(f"{name!r} is not a member of shard {shard!r}")
    return shard, loc[0], loc[1]


def media_exists(path: str) -> bool:
    if not is_member(path):
        return os.path.exists(path)
    try:
        _locate(path)
        return True
    except FileNotFoundError:
        return False


def media_size(path: str) -> int:
    if not is_member(path):
        return os.path.getsize(path)
    return _locate(path)[2]


# A clip's members are read several times in a row (probe, then decode; the audio header check,
# then the samples): the last few members read stay in memory so each is read from disk once.
_RECENT: "OrderedDict[Tuple[str, int, int], bytes]" = OrderedDict()
_RECENT_MAX = 8
_RECENT_LOCK = threading.Lock()


def media_bytes(path: str) -> bytes:
    """The whole file (or member).  A member shorter on disk than its header says (a cut shard)
    comes back short, so the decoders see it as the truncated file it is."""
    if not is_member(path):
        with open(path, "rb") as f:
            return f.read()
    key = _locate(path)
    with _RECENT_LOCK:
        data = _RECENT.get(key)
        if data is not None:
            _RECENT.move_to_end(key)
            return data
    shard, off, size = key
    with open(shard, "rb") as f:
        f.seek(off)
        data = f.read(size)
    with _RECENT_LOCK:
        _RECENT[key] = data
        while len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)
    return data


def media_open(path: str) -> Union[str, io.BytesIO]:
    """What PyAV / soundfile / PIL open: the path itself for a plain file, an in-memory copy of a
    member (clips are a few MB, and a BytesIO seeks freely, which containers need)."""
    return io.BytesIO(media_bytes(path)) if is_member(path) else path


def require_media(path: str, what: str) -> None:
    """Raise DecodeError naming `path` when it (file or member) is missing or has 0 bytes."""
    if not media_exists(path):
        raise DecodeError(f"{what} {path!r} does not exist")
    if media_size(path) == 0:
        raise DecodeError(f"{what} {path!r} is empty (0 bytes)")


def media_stat(path: str) -> Tuple[int, int]:
    """(size, mtime) for cache keys: a member's own size with its shard's mtime."""
    if not is_member(path):
        return os.path.getsize(path), int(os.path.getmtime(path))
    shard, _, size = _locate(path)
    return size, int(os.path.getmtime(shard))


def sample_key(member: str) -> Tuple[str, str]:
    """WebDataset's rule: key = directory + base name up to its first dot; the rest (lower case)
    is the extension.  `a/b.c.mp4` -> (`a/b`, `.c.mp4`)."""
    d, base = os.path.split(member)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), (dot + ext).lower()


def expand_shards(root: str, patterns: str) -> List[str]:
    """Comma-separated globs (relative to `root` unless absolute) -> sorted shard paths.  Raises
    FileNotFoundError for a pattern that matches nothing, ValueError for a compressed tar."""
    out: List[str] = []
    for pat in (p.strip() for p in patterns.split(",")):
        if not pat:
            continue
        full = pat if os.path.isabs(pat) else os.path.join(root, pat)
        hits = sorted(glob.glob(full))
        if not hits:
            raise FileNotFoundError(f"shard pattern {pat!r} matches no file under {root!r}")
        for h in hits:
            if not h.endswith(".tar"):
                raise ValueError(f"shard {h!r}: only uncompressed .tar shards can be read in place "
                                 f"(re-pack with `tar -cf`); compressed media gains nothing from gzip")
        out += [h for h in hits if h not in out]
    return out


class ShardIndex:
    """Members of a set of shards: `members[(shard, name)] = (offset, size)` and
    `samples[key] = {ext: media path}` (the first shard wins for a key found twice, logged)."""

    def __init__(self, shards: List[str], cache_dir: Optional[str] = None):
        self.shards = shards
        self.members: Dict[Tuple[str, str], Tuple[int, int]] = {}
        self.samples: Dict[str, Dict[str, str]] = {}
        dup, self.unsafe = 0, {}
        for shard in shards:
            for name, off, size in self._members(shard, cache_dir):
                why = id_problem(name)
                if why is not None:   # never a media path or a clip id: it names no place in the dataset
                    self.unsafe[f"{shard}{SEP}{name}"] = f"member name {name!r} {why}"
                    continue
                self.members[(shard, name)] = (off, size)
                key, ext = sample_key(name)
                exts = self.samples.setdefault(key, {})
                if ext in exts:
                    dup += 1
                    continue
                exts[ext] = shard + SEP + name
        if dup:
            log.warning("%d shard member(s) repeat a sample key and extension already seen; the first "
                        "one is used", dup)
        if self.unsafe:
            log.warning("%d shard member(s) skipped, their names lead out of the dataset: %s", len(self.unsafe),
                        "; ".join(f"{k}: {v}" for k, v in list(self.unsafe.items())[:10]))
        for s in shards:
            _BY_SHARD[s] = self

    @staticmethod
    def _members(shard: str, cache_dir: Optional[str]) -> List[Tuple[str, int, int]]:
        st = os.stat(shard)
        stamp = [INDEX_VERSION, os.path.abspath(shard), st.st_size, int(st.st_mtime)]
        cache = None
        if cache_dir:
            h = hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:16]
            cache = os.path.join(cache_dir, f"{os.path.basename(shard)}.{h}.json")
            if os.path.exists(cache):
                try:
                    with open(cache) as f:
                        d = json.load(f)
                    if d["stamp"] == stamp:
                        return [tuple(m) for m in d["members"]]
                except (OSError, ValueError, KeyError):
                    pass   # unreadable index: read the headers again
        rows = []
        try:
            with tarfile.open(shard, "r:") as tf:
                for ti in tf:
                    if ti.isfile():
                        # a shard cut inside a member's data: keep the bytes that are there, so
                        # the member probes as the truncated file it is
                        rows.append((ti.name, ti.offset_data, max(0, min(ti.size, st.st_size - ti.offset_data))))
        except tarfile.ReadError as e:
            # a shard cut mid-header still yields the members before the cut: keep them, say so
            if not rows:
                raise ValueError(f"shard {shard!r} is not a readable tar file: {e}") from e
            log.warning("shard %r is damaged after %d member(s) (%s); the rest of it is skipped",
                        shard, len(rows), e)
        if cache:
            try:
                os.makedirs(cache_dir, exist_ok=True)
                blob = json.dumps({"stamp": stamp, "members": rows}).encode()
                write_private(cache, lambda f: f.write(blob))
            except OSError:
                pass   # read-only dataset: index again next time
        return rows

    @classmethod
    def load(cls, root: str, patterns: str) -> "ShardIndex":
        shards = expand_shards(root, patterns)
        key = (os.path.abspath(root), tuple(shards))
        idx = _INDEXES.get(key)
        if idx is None:
            cache = dataset_cache(root)
            idx = _INDEXES[key] = cls(shards, os.path.join(cache, "shards") if cache else None)
            log.info("indexed %d shard(s): %d samples, %d members", len(shards), len(idx.samples),
                     len(idx.members))
        return idx

    @classmethod
    def for_shard(cls, shard: str) -> "ShardIndex":
        """The index holding `shard` (a worker process that only got a media path builds it)."""
        idx = _BY_SHARD.get(shard)
        if idx is None:
            if not os.path.exists(shard):
                raise FileNotFoundError(f"shard {shard!r} does not exist")
            idx = cls([shard])
        return idx

    def find(self, key: str, exts) -> Optional[str]:
        """Media path of sample `key` with the first of `exts` it has, or None."""
        have = self.samples.get(key)
        if not have:
            return None
        for e in exts:
            if e in have:
                return have[e]
        return None

    def records(self) -> List[dict]:
        """Annotation records from the samples' `.json` ({"captions": [...]} or {"caption": ...},
        optional "qa") or `.txt` (one caption per line) members, in shard order."""
        out = []
        for key, have in self.samples.items():
            if ".json" in have:
                try:
                    d = json.loads(media_bytes(have[".json"]).decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    raise ValueError(f"{have['.json']}: not valid JSON: {e}") from e
                caps = d.get("captions", d.get("caption"))
                caps = [caps] if isinstance(caps, str) else list(caps or [])
                qa = list(d.get("qa", []))
            elif ".txt" in have:
                caps = [c.strip() for c in media_bytes(have[".txt"]).decode("utf-8").splitlines() if c.strip()]
                qa = []
            else:
                continue   # media without text: usable only through separate annotations
            if not caps:
                raise ValueError(f"sample {key!r} in the shards has no caption")
            out.append({"video_id": key, "captions": caps, "qa": qa, "attrs": {}})
        return out


_BY_SHARD: Dict[str, ShardIndex] = {}
