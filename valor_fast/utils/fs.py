"""Files the project writes and the folders it may remove.

Atomic writes: every file is written to a temporary name in the same folder, flushed and
fsync'ed, then renamed over the target (and the folder fsync'ed), so a crash, a kill -9 or a
full disk leaves either the old file or the new one, never a truncated one.  A failed write
removes its temporary file and raises an OSError naming the target.

Ownership: a folder the project creates carries a marker file (`OWNER_MARKER`, JSON) naming
its kind, the run that wrote it and a manifest of every file it holds (relative path ->
size).  `check_owned` proves a folder is ours: the marker exists with the expected kind (and
run id, when given) and nothing in the folder is foreign -- every file is in the manifest with
its size, or matches one of the name patterns the caller names as its own (files written
after the marker, e.g. DCP shards in a checkpoint being written, a decode cache).  Symlinks
are always foreign.  `remove_owned_tree` deletes only a proven folder; anything else raises
ForeignContentError naming the folder and the first foreign entry.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
import time
from typing import Callable, Dict, Optional, Sequence

OWNER_MARKER = ".valor-fast-owner.json"
WRITER = "valor-fast"


class ForeignContentError(RuntimeError):
    """A folder the project was about to remove or overwrite is not provably its own."""


# ---------------- atomic writes ----------------

def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def atomic_write(path: str, write: Callable[[str], None], what: str = "file") -> str:
    """Call `write(tmp_path)` (which writes the whole file there), fsync it, rename it to
    `path`.  Any failure (ENOSPC, EIO, an exception of `write`) removes the temporary file and
    raises OSError naming `path`; a previous file at `path` is left as it was."""
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write {what} {path!r}: {e.strerror or e}") from None
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def atomic_write_bytes(path: str, data: bytes, what: str = "file") -> str:
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
    return atomic_write(path, w, what)


def atomic_write_json(path: str, obj, what: str = "file") -> str:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), what)


# ---------------- ownership ----------------

def manifest(folder: str, skip: Sequence[str] = ()) -> Dict[str, int]:
    """{relative path: size} of every regular file under `folder` (symlinks: size -1)."""
    out: Dict[str, int] = {}
    for dirpath, dirs, files in os.walk(folder, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, folder)
            if rel in skip:
                continue
            out[rel] = -1 if os.path.islink(p) else os.path.getsize(p)
    return out


def owner_record(kind: str, run_id: Optional[str] = None, files: Optional[Dict[str, int]] = None,
                 **extra) -> dict:
    return {"writer": WRITER, "kind": kind, "run_id": run_id, "host": socket.gethostname(),
            "pid": os.getpid(), "time": time.time(), "files": dict(files or {}), **extra}


def write_owner_marker(folder: str, kind: str, run_id: Optional[str] = None, with_manifest: bool = True,
                       marker: str = OWNER_MARKER, **extra) -> dict:
    """Mark `folder` as written by the project: the marker lists every file now in it (or
    none, with_manifest=False, for a folder about to be filled with files of known names)."""
    files = manifest(folder, skip=(marker,)) if with_manifest else {}
    rec = owner_record(kind, run_id, files, **extra)
    atomic_write_json(os.path.join(folder, marker), rec, "owner marker")
    return rec


def read_owner_marker(folder: str, marker: str = OWNER_MARKER) -> Optional[dict]:
    try:
        with open(os.path.join(folder, marker)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("writer") == WRITER else None


def check_owned(folder: str, kind: str, run_id: Optional[str] = None, marker: str = OWNER_MARKER,
                patterns: Sequence[str] = ()) -> Optional[str]:
    """None when `folder` is provably ours (see the module docstring), else the reason."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return f"{folder} is not a plain folder"
    rec = read_owner_marker(folder, marker)
    if rec is None:
        return f"{folder} has no valor-fast owner record ({marker})"
    if rec.get("kind") != kind:
        return f"{folder} was written as {rec.get('kind')!r}, not {kind!r}"
    if run_id is not None and rec.get("run_id") != run_id:
        return f"{folder} belongs to run {rec.get('run_id')!r}, not this run ({run_id!r})"
    listed = rec.get("files") or {}
    for rel, size in sorted(manifest(folder, skip=(marker,)).items()):
        if size < 0:
            return f"{folder} holds a symlink {rel!r}"
        if listed.get(rel) == size:
            continue
        if any(fnmatch.fnmatchcase(rel, p) for p in patterns):
            continue
        return f"{folder} holds {rel!r}, which valor-fast did not write there"
    return None


def remove_owned_tree(folder: str, kind: str, run_id: Optional[str] = None, marker: str = OWNER_MARKER,
                      patterns: Sequence[str] = ()) -> None:
    """Delete `folder` only when `check_owned` proves it ours; else ForeignContentError."""
    why = check_owned(folder, kind, run_id, marker, patterns)
    if why is not None:
        raise ForeignContentError(f"refusing to delete {folder}: {why}. Nothing was removed; move the "
                                  f"folder's contents elsewhere or choose another folder")
    shutil.rmtree(folder)
