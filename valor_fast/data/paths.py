"""Paths built from dataset content (clip ids, shard member names) never leave the dataset.

A clip id comes from an annotation file or a shard and is joined onto a media folder
(`<video_dir>/<id>.<ext>`) and, hashed, onto the decode cache.  An id is refused when it is
empty, absolute, holds a `..` component, a NUL byte or the shard separator `::`
(`check_id`); a media path built from an id that passes is then resolved (symlinks followed)
and must lie inside one of its *bases* (`confine`): the real path of the data root or of the
configured media folder itself.  The folders the config names are the user's choice (a
`videos -> /mnt/disk2/videos` link is fine); what the data names is not, so a symlinked
subfolder or file inside them that points elsewhere is refused.  A refusal is an
`UnsafePathError` (a `DecodeError`): the bad-media machinery counts, logs and replaces the
clip like any other bad one, naming its id.

Files the data layer writes into the dataset (decode cache, shard index) go through
`write_private`: a fresh temporary name (O_EXCL, so a planted symlink at a predictable
`.tmp` name is never followed) renamed over the target (a rename replaces a symlink, it does
not write through it)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import BinaryIO, Callable, Iterable, Optional

from .errors import DecodeError

SHARD_SEP = "::"   # shards.SEP: "<shard>::<member>" names a member


class UnsafePathError(DecodeError):
    """A clip id or member name that would read or write outside its dataset."""


def id_problem(name: str) -> Optional[str]:
    """Why `name` (a clip id or a shard member name) cannot name a file under a folder, or
    None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if "\x00" in name:
        return "holds a NUL byte"
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return "is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "climbs out of its folder ('..')"
    if SHARD_SEP in name:
        return f"holds the shard separator {SHARD_SEP!r}"
    return None


def check_id(vid: str, what: str = "clip id") -> str:
    """`vid` when it is a safe relative name, else UnsafePathError naming it."""
    why = id_problem(vid)
    if why is not None:
        raise UnsafePathError(f"{what} {vid!r} {why}: refused (ids must be relative names inside the dataset)")
    return vid


def inside(path: str, base: str) -> bool:
    """Whether real path `path` is `base` or below it (both already resolved)."""
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def real_bases(*folders: Optional[str]) -> tuple:
    """The resolved folders a media path may lie in (None entries skipped, duplicates once)."""
    out = []
    for f in folders:
        if f:
            r = os.path.realpath(f)
            if r not in out:
                out.append(r)
    return tuple(out)


def confine(path: str, bases: Iterable[str], vid: str, what: str = "media") -> str:
    """The real path of `path` when it lies inside one of the resolved `bases`, else
    UnsafePathError naming the id and where the path leads."""
    real = os.path.realpath(path)
    bases = tuple(bases)
    if any(inside(real, b) for b in bases):
        return real
    raise UnsafePathError(f"{what} of clip {vid!r}: {path!r} resolves to {real!r}, outside the dataset "
                          f"({', '.join(repr(b) for b in bases)}); a symlink leading out is refused")


def dataset_cache(root: str) -> Optional[str]:
    """<root>/.cache when it resolves inside the data root, else None (logged once): a `.cache`
    symlink shipped with a dataset must not make us write elsewhere.  Everything the data layer
    caches (decoded clips, token ids, shard indexes) lives below it."""
    d = os.path.join(root, ".cache")
    if inside(os.path.realpath(d), os.path.realpath(root)):
        return d
    from ..utils.log import log_once
    log_once("cache-out:" + root, f"{d!r} resolves to {os.path.realpath(d)!r}, outside the data root: "
                                  f"nothing is cached on disk (decoded clips, token ids and shard indexes stay "
                                  f"in memory)")
    return None


def id_hash(vid: str) -> str:
    """A cache file name for clip `vid`: 32 hex digits of its SHA-256 (the id itself is stored
    inside the entry, so the cache stays readable)."""
    return hashlib.sha256(vid.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def write_private(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a fresh temporary file beside `path` (f: its binary file object), then
    rename it over `path`.  The temporary is created O_EXCL with a random name and written
    through the descriptor that created it, and the rename replaces whatever `path` was (a
    symlink included) instead of writing through it.  OSError on failure (the temporary is
    removed)."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
