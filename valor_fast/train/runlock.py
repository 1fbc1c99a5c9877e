"""An exclusive lock on a run folder, so two runs with the same name never write into each
other's checkpoints, temp folders or config.yaml.

`RunLock(run_dir).acquire()` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `run_dir/.valor-fast.lock`
and writes the holder (pid, host, start time, command) into it.  A second run fails at once
with RunLockedError naming the holder.  The kernel drops a flock when its holder dies, so
after a kill -9 the next run simply takes the lock (and logs the previous holder it replaces).
A lock still held while its recorded pid is dead on this host (an orphaned child process
inherited the descriptor) is stale: the file is unlinked and a fresh one locked, with a log
line.  A holder on another host cannot be checked and is always respected.

flock works on local filesystems and on NFSv4 (Linux maps it to byte-range locks); some
parallel filesystems need their flock mount option (Lustre: -o flock).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from ..utils.log import get_logger

log = get_logger(__name__)
LOCK_NAME = ".valor-fast.lock"


class RunLockedError(RuntimeError):
    """The run folder is in use by another live process."""


def _proc_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _proc_start(pid)
    return started is None or now is None or now == started


def _describe(h: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"])) if isinstance(h.get("time"), (int, float)) else "?"
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')} since {when} ({h.get('cmd', '?')})"


class RunLock:
    """Context manager: `with RunLock(run_dir): ...`; or acquire() / release()."""

    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def _read(self, fd: int) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            h = json.loads(raw.decode() or "{}")
            return h if isinstance(h, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self, h: dict) -> bool:
        pid = h.get("pid")
        return h.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid, h.get("proc_start"))

    def _try_once(self) -> Optional[bool]:
        """True: locked; None: the file changed under us (retry); raises when held."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OSError(e.errno, f"cannot lock run folder {self.run_dir}: {e.strerror}") from None
            if self._stale(holder):
                self._break(holder)
                return None
            raise RunLockedError(f"run folder {self.run_dir} is in use by {_describe(holder)}: wait for that run, "
                                 f"stop it, or pick another --train.run_name") from None
        if not self._is_current(fd):
            os.close(fd)   # unlinked or replaced between open and flock: lock the current file
            return None
        prev = self._read(fd)
        if prev.get("pid") is not None:
            log.info("run folder %s: previous holder %s ended without releasing it; taking over",
                     self.run_dir, _describe(prev))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
              "proc_start": _proc_start(os.getpid()), "cmd": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        if not self._is_current(fd):   # broken as stale before our record landed: start over
            os.close(fd)
            return None
        self._fd = fd
        return True

    def _is_current(self, fd: int) -> bool:
        """Is the file at self.path the one `fd` holds (not unlinked or replaced meanwhile)?"""
        try:
            cur = os.stat(self.path)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        return (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino)

    def _break(self, holder: dict) -> None:
        """Unlink a stale lock file -- after a pause, and only if it still names the same dead
        holder (a live run that has just taken the flock writes its own record first)."""
        time.sleep(0.2)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            again = self._read(fd)
        finally:
            os.close(fd)
        if again != holder:
            return
        log.warning("run folder %s: taking over the stale lock of %s (that process is gone; a child of it "
                    "still held the lock file)", self.run_dir, _describe(holder))
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(5):
            if self._try_once():
                return self
        raise RunLockedError(f"run folder {self.run_dir}: could not lock {self.path} (it kept being replaced)")

    def release(self) -> None:
        """Unlink the lock file (while still holding it, and only if it is still ours), unlock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            st, cur = os.fstat(fd), os.stat(self.path)
            if (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


RUN_ID_NAME = ".valor-fast-run.json"


def run_identity(run_dir: str) -> str:
    """This run folder's id (created on first use, kept across resumes): CheckpointManager's
    `run_id`, so keep-k pruning removes only checkpoints of this run.  Call it holding the
    RunLock.  A copied run folder keeps its id (the copy is the same run's history)."""
    import uuid
    from ..utils.fs import atomic_write_json
    path = os.path.join(run_dir, RUN_ID_NAME)
    try:
        with open(path) as f:
            rid = json.load(f).get("run_id")
        if isinstance(rid, str) and rid:
            return rid
        raise ValueError("no run_id")
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as e:
        raise RuntimeError(f"{path} is unreadable ({e}); it names this run's checkpoints: restore it, or delete it "
                           f"to treat every existing checkpoint as another run's (none of them is then pruned)") from None
    rid = uuid.uuid4().hex
    atomic_write_json(path, {"run_id": rid, "created": time.time(), "host": socket.gethostname()}, "run id")
    return rid
