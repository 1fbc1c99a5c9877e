"""A run folder is used by one run at a time; a resume with another model or loss is refused."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from valor_fast.config import load_config, to_dict
from valor_fast.train.resume_check import resume_config_diff
from valor_fast.train.runlock import LOCK_NAME, RunLock, RunLockedError, run_identity

_TRY = textwrap.dedent('''
    import sys
    from valor_fast.train.runlock import RunLock, RunLockedError
    try:
        RunLock(sys.argv[1]).acquire()
        print("LOCKED")
    except RunLockedError as e:
        print("REFUSED", e)
''')


def _other_process(run_dir):
    p = subprocess.run([sys.executable, "-c", _TRY, str(run_dir)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip()


def test_second_run_fails_fast_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(str(run)) as lock:
        assert lock.held
        out = _other_process(run)
        assert out.startswith("REFUSED") and f"pid {os.getpid()}" in out and socket.gethostname() in out
        assert str(run) in out and "--train.run_name" in out
        with pytest.raises(RunLockedError):          # a second lock in the same process too
            RunLock(str(run)).acquire()
    assert not (run / LOCK_NAME).exists()
    assert _other_process(run) == "LOCKED"           # released (and that process's exit freed it again)


@pytest.fixture
def lock_log():
    """Messages of the runlock logger (the package logger does not propagate to pytest's)."""
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())
    h = Keep()
    lg = logging.getLogger("valor_fast.train.runlock")
    lg.addHandler(h)
    yield h.lines
    lg.removeHandler(h)


def test_dead_holder_is_taken_over(tmp_path, lock_log):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    rec = {"pid": pid, "host": socket.gethostname(), "time": 0, "cmd": "valor-fast pretrain"}
    (run / LOCK_NAME).write_text(json.dumps(rec))
    # 1) the file names a dead process and nobody holds the flock (a kill -9)
    lock = RunLock(str(run)).acquire()
    assert any(f"pid {pid}" in m and "taking over" in m for m in lock_log), lock_log
    lock.release()
    # 2) an orphan child still holds the flock, the recorded holder is dead: stale, taken over
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f'''
        import fcntl, json, os, sys, time
        fd = os.open({str(run / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, json.dumps({rec!r}).encode(), 0)
        print("HELD", flush=True)
        time.sleep(120)
    ''')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        lock_log.clear()
        lock = RunLock(str(run)).acquire()
        assert any("stale lock" in m and f"pid {pid}" in m for m in lock_log), lock_log
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_run_identity_is_stable(tmp_path):
    rid = run_identity(str(tmp_path))
    assert rid == run_identity(str(tmp_path)) and len(rid) == 32
    (tmp_path / ".valor-fast-run.json").write_text("{broken")
    with pytest.raises(RuntimeError, match="unreadable"):
        run_identity(str(tmp_path))


def test_resume_refused_on_model_or_loss_change():
    base = {"model.size": "tiny", "train.steps": 10}
    saved = to_dict(load_config(None, base))
    same = to_dict(load_config(None, dict(base, **{"train.steps": 40, "train.lr": 3e-5, "train.log_every": 1,
                                                   "eval.beam": 1, "model.temperature": "0.05"})))
    d = resume_config_diff(saved, same)
    assert not d and {k for k, _, _ in d.allowed} == {"train.steps", "train.lr", "train.log_every", "eval.beam",
                                                      "model.temperature"}
    new = to_dict(load_config(None, dict(base, **{"model.text_layers": 4, "loss.mga_mode": "coarse",
                                                  "train.task": "caption", "train.steps": 20})))
    d = resume_config_diff(saved, new)
    assert [k for k, _, _ in d.unsafe] == ["loss.mga_mode", "model.text_layers", "train.task"]
    msg = d.message("runs/x")
    assert "model.text_layers: 2 -> 4" in msg and "loss.mga_mode: 'fine' -> 'coarse'" in msg and "\n" not in msg
    assert "train.steps" not in msg and "train.steps" in d.notes()
    assert not resume_config_diff(saved, new, allow=("loss.*", "model.text_layers", "train.task"))


def test_resume_check_tolerates_yaml_round_trip_and_new_fields():
    saved = to_dict(load_config(None, {}))
    saved["train"]["betas"] = list(saved["train"]["betas"])        # YAML gives lists
    saved["model"]["temperature"] = 0.07
    new = to_dict(load_config(None, {}))
    new["train"]["betas"] = tuple(new["train"]["betas"])
    assert not resume_config_diff(saved, new) and not resume_config_diff(saved, new).allowed
    old = json.loads(json.dumps(saved))
    del old["loss"]["grouped_decoder"]                              # written before the field existed
    defaults = to_dict(load_config(None, {}))
    assert not resume_config_diff(old, new, defaults=defaults)
    new["loss"]["grouped_decoder"] = False
    assert [k for k, _, _ in resume_config_diff(old, new, defaults=defaults).unsafe] == ["loss.grouped_decoder"]
    assert resume_config_diff(old, new).unsafe[0][1] == "<absent>"
