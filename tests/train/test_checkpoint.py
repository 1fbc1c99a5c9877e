"""Checkpoints never run code, never hold NaN, never lose a user's folder, and a fallback that
starts fresh starts from the initial weights.  Real DCP checkpoints of a small model + AdamW
state (one process here; two FSDP2 ranks on gloo in test_two_rank_fsdp_checkpoint)."""
import errno
import glob
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from valor_fast.train import checkpoint as ckmod
from valor_fast.train.checkpoint import (CheckpointLoadError, CheckpointManager, NonFiniteCheckpointError,
                                         export_model_state)
from valor_fast.train.dcp_io import SafeFileSystemReader, UnsafeCheckpointError, read_dcp_metadata
from valor_fast.utils.safe_pickle import UnsafePickleError
from valor_fast.utils.fs import ForeignContentError, remove_owned_tree, write_owner_marker


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.n = nn.LayerNorm(7)
        self.b = nn.Linear(7, 3)

    def forward(self, x):
        return self.b(self.n(self.a(x)))


def _trained(seed=0, steps=1):
    torch.manual_seed(seed)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(steps):
        m(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def _state(m, opt):
    msd, osd = get_state_dict(m, opt)
    return {"model": msd, "optim": osd}


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class _Touch:
    """Unpickling this runs pathlib.Path(marker).touch(): the marker proves code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


# ---------------- never unpickled ----------------

def test_crafted_metadata_never_runs(tmp_path):
    m, opt = _trained()
    mgr = CheckpointManager(str(tmp_path / "ck"), keep=3)
    good = mgr.save(1, _state(m, opt))
    bad = mgr.save(2, _state(m, opt))
    marker = tmp_path / "pwned"
    with open(os.path.join(bad, ".metadata"), "wb") as f:
        pickle.dump(_Touch(str(marker)), f)
    # control: the stock reader runs the payload (so the test below can fail)
    from torch.distributed.checkpoint import FileSystemReader
    try:
        FileSystemReader(bad).read_metadata()
    except Exception:
        pass
    assert marker.exists(), "payload did not run under the stock reader: the test proves nothing"
    marker.unlink()

    with pytest.raises(UnsafePickleError) as ei:
        read_dcp_metadata(bad)
    assert "pathlib.Path.touch" in str(ei.value) and os.path.join(bad, ".metadata") in str(ei.value)
    with pytest.raises(CheckpointLoadError) as ei:
        mgr.load(bad, _state(m, opt))
    msg = str(ei.value)
    assert ei.value.reason == "unsafe" and bad in msg and "\n" not in msg
    assert not marker.exists()

    # resume=auto: set aside, falls back to the good one, the payload never ran
    res = mgr.load_latest(lambda: _state(m, opt))
    assert res is not None and res[0] == 1 and not marker.exists()
    assert os.path.isdir(bad + ".corrupt-unsafe") and not os.path.exists(bad)
    assert [s for s, _ in mgr.complete()] == [1] and good == mgr.complete()[0][1]


def test_crafted_state_entry_never_runs(tmp_path):
    """Non-tensor entries (the optimiser's param_groups) are unpickled by stock DCP with
    weights_only=False: a crafted one is refused here."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    marker = tmp_path / "pwned"
    mgr = CheckpointManager(str(tmp_path / "ck"))
    path = mgr.save(1, {"model": {"w": torch.ones(3)}, "extra": {"obj": _Touch(str(marker))}})
    assert not marker.exists()
    dcp.load({"model": {"w": torch.zeros(3)}, "extra": {"obj": 0}}, checkpoint_id=path,
             planner=DefaultLoadPlanner())
    assert marker.exists(), "payload did not run under the stock planner: the test proves nothing"
    marker.unlink()
    with pytest.raises(CheckpointLoadError) as ei:
        mgr.load(path, {"model": {"w": torch.zeros(3)}, "extra": {"obj": 0}})
    assert ei.value.reason == "unsafe" and "'extra.obj'" in str(ei.value) and path in str(ei.value)
    assert not marker.exists()


def test_storage_path_outside_the_folder_refused(tmp_path):
    m, opt = _trained()
    mgr = CheckpointManager(str(tmp_path / "ck"))
    path = mgr.save(1, _state(m, opt))
    md_path = os.path.join(path, ".metadata")
    with open(md_path, "rb") as f:
        md = pickle.load(f)   # our own file, written a line above
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../outside.distcp"
    with open(md_path, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint folder"):
        SafeFileSystemReader(path).read_metadata()


def test_real_checkpoint_loads_and_resumes_exactly(tmp_path):
    m, opt = _trained(seed=1, steps=2)
    want = _state(m, opt)
    want_model = _params(m)
    want_exp = {k: v["exp_avg"].clone() for k, v in want["optim"]["state"].items()}
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(2, want, {"step": 2})
    m2, opt2 = _trained(seed=2, steps=1)
    res = mgr.load_latest(lambda: _state(m2, opt2))
    step, st, extra = res
    assert step == 2 and extra["meta"]["step"] == 2 and extra["meta"]["writer"] == "valor-fast"
    assert not _same(_params(m2), want_model)        # scratch: the live model is not touched yet
    set_state_dict(m2, opt2, model_state_dict=st["model"], optim_state_dict=st["optim"])
    assert _same(_params(m2), want_model)
    got = _state(m2, opt2)["optim"]["state"]
    assert all(torch.equal(got[k]["exp_avg"], v) for k, v in want_exp.items())
    assert got and _state(m2, opt2)["optim"]["param_groups"][0]["lr"] == 1e-2


# ---------------- never non-finite ----------------

@pytest.mark.parametrize("where", ["model", "optim"])
def test_nonfinite_state_is_never_saved(tmp_path, where):
    m, opt = _trained()
    mgr = CheckpointManager(str(tmp_path / "ck"))
    first = mgr.save(1, _state(m, opt))
    with torch.no_grad():
        if where == "model":
            m.n.weight[3] = float("nan")
        else:
            opt.state[m.b.weight]["exp_avg"][0, 0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError) as ei:
        mgr.save(2, _state(m, opt))
    msg = str(ei.value)
    assert "step 2" in msg and first in msg
    assert ("model.n.weight" if where == "model" else "optim.state.b.weight.exp_avg") in msg
    assert sorted(os.listdir(mgr.root)) == ["step_00000001"]     # no folder, no .tmp


def test_nonfinite_checkpoint_on_disk_is_set_aside(tmp_path, monkeypatch):
    """A NaN checkpoint written by an older version is never the resume point."""
    m, opt = _trained()
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, _state(m, opt))
    with torch.no_grad():
        m.a.bias[0] = float("nan")
    monkeypatch.setattr(ckmod, "first_nonfinite", lambda state, collective=True: None)   # the old save path
    bad = mgr.save(2, _state(m, opt))
    monkeypatch.undo()
    res = mgr.load_latest(lambda: _state(*_trained(seed=5)))
    assert res[0] == 1 and os.path.isdir(bad + ".corrupt-nonfinite")
    assert mgr.set_aside[0][2] == "nonfinite" and "model.a.bias" in mgr.set_aside[0][3]


def test_export_refuses_nonfinite_and_survives_a_full_disk(tmp_path, monkeypatch):
    path = str(tmp_path / "model.safetensors")
    export_model_state({"w": torch.ones(2, 2)}, path, {"step": 1})
    before = open(path, "rb").read()
    with pytest.raises(NonFiniteCheckpointError, match="'w'"):
        export_model_state({"w": torch.tensor([1.0, float("nan")])}, path)

    def full_disk(sd, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckmod, "save_file", full_disk)
    with pytest.raises(OSError) as ei:
        export_model_state({"w": torch.zeros(2, 2)}, path)
    assert path in str(ei.value) and "No space left" in str(ei.value) and ei.value.errno == errno.ENOSPC
    assert open(path, "rb").read() == before                         # the last good export is intact
    assert os.listdir(tmp_path) == ["model.safetensors"]              # no temp file left


# ---------------- set aside, fresh means initial ----------------

def _truncate_half(path):
    for f in glob.glob(os.path.join(path, "*.distcp")):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def test_all_corrupt_starts_from_the_initial_weights_and_prunes_nothing_new(tmp_path):
    m, opt = _trained(seed=0, steps=2)
    mgr = CheckpointManager(str(tmp_path / "ck"), keep=2)
    for s in (7, 8):
        _truncate_half(mgr.save(s, _state(m, opt)))

    # control: a load in place leaves half-loaded weights (what "starting fresh" used to mean)
    fresh, fopt = _trained(seed=3, steps=1)
    init = _params(fresh)
    with pytest.raises(CheckpointLoadError):
        mgr.load(mgr.complete()[0][1], _state(fresh, fopt))
    assert not _same(_params(fresh), init), "a truncated checkpoint loaded nothing: the test proves nothing"

    fresh, fopt = _trained(seed=3, steps=1)
    init = _params(fresh)
    assert mgr.load_latest(lambda: _state(fresh, fopt)) is None
    assert _same(_params(fresh), init)                               # exactly the initial weights
    assert sorted(os.listdir(mgr.root)) == ["step_00000007.corrupt-unreadable", "step_00000008.corrupt-unreadable"]
    for s in (1, 2, 3):
        mgr.save(s, _state(fresh, fopt))
    assert sorted(os.listdir(mgr.root)) == ["step_00000002", "step_00000003", "step_00000007.corrupt-unreadable",
                                            "step_00000008.corrupt-unreadable"]
    assert mgr.load_latest(lambda: _state(fresh, fopt))[0] == 3


def test_prune_only_what_this_run_provably_wrote(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    old = root / "step_00000001"                    # an older version's checkpoint: no owner record
    old.mkdir()
    (old / "meta.json").write_text('{"step": 1, "world": 1}')
    (root / "notes.txt").write_text("mine")
    m, opt = _trained()
    other = CheckpointManager(str(root), keep=1, run_id="other-run")
    other.save(2, _state(m, opt))
    mgr = CheckpointManager(str(root), keep=2, run_id="this-run")
    mgr.save(3, _state(m, opt))
    edited = mgr.save(4, _state(m, opt))
    with open(os.path.join(edited, "README"), "w") as f:   # a user's file inside: not provably ours now
        f.write("keep me")
    later = mgr.save(9, _state(m, opt))             # then resumed from an earlier step
    for s in (5, 6, 7):
        mgr.save(s, _state(m, opt))
    names = sorted(os.listdir(root))
    assert names == ["notes.txt", "step_00000001", "step_00000002", "step_00000004", "step_00000006",
                     "step_00000007", "step_00000009"], names
    assert os.path.exists(later) and open(os.path.join(edited, "README")).read() == "keep me"


@pytest.mark.parametrize("keep", [0, -1, True, "3", 1.5])
def test_keep_ckpts_validated(tmp_path, keep):
    with pytest.raises(ValueError, match=r"train\.keep_ckpts must be an integer >= 1.*allowed"):
        CheckpointManager(str(tmp_path), keep=keep)


def test_crashed_tmp_cleared_foreign_tmp_kept(tmp_path, monkeypatch):
    m, opt = _trained()
    mgr = CheckpointManager(str(tmp_path / "ck"))
    import torch.distributed.checkpoint as dcp

    def crash(*a, **k):
        raise KeyboardInterrupt   # killed mid-write
    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(1, _state(m, opt))
    monkeypatch.undo()
    assert os.listdir(mgr.root) == ["step_00000001.tmp"]
    foreign = os.path.join(mgr.root, "step_00000005.tmp")
    os.makedirs(foreign)
    with open(os.path.join(foreign, "data.bin"), "w") as f:
        f.write("user data")
    mgr.save(2, _state(m, opt))
    names = sorted(os.listdir(mgr.root))
    assert names[0] == "step_00000002" and names[1].startswith("step_00000005.tmp.foreign-"), names
    assert len(names) == 2 and open(os.path.join(mgr.root, names[1], "data.bin")).read() == "user data"


def test_remove_owned_tree_refuses_foreign_content(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "a.txt").write_text("x")
    with pytest.raises(ForeignContentError, match="no valor-fast owner record"):
        remove_owned_tree(str(d), "synth")
    write_owner_marker(str(d), "synth")
    (d / "b.txt").write_text("user")
    with pytest.raises(ForeignContentError, match="'b.txt'"):
        remove_owned_tree(str(d), "synth")
    os.unlink(d / "b.txt")
    os.symlink("/etc", d / "link")
    with pytest.raises(ForeignContentError, match="symlink"):
        remove_owned_tree(str(d), "synth")
    os.unlink(d / "link")
    with pytest.raises(ForeignContentError, match="written as 'synth'"):
        remove_owned_tree(str(d), "other-kind")
    remove_owned_tree(str(d), "synth")
    assert not d.exists()


# ---------------- two FSDP2 ranks on gloo ----------------

_FSDP_SCRIPT = r'''
import os, sys, torch, torch.nn as nn, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from valor_fast.train.checkpoint import CheckpointManager, NonFiniteCheckpointError
dist.init_process_group("gloo")
rank = dist.get_rank()
def build(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 3))
    fully_shard(m[0]); fully_shard(m[2]); fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)
    m(torch.randn(4, 6)).square().mean().backward(); opt.step(); opt.zero_grad()
    return m, opt
def state(m, o):
    a, b = get_state_dict(m, o); return {"model": a, "optim": b}
def full(m):
    return {k: v.full_tensor().clone() for k, v in m.state_dict().items()}
m, o = build(0)
mgr = CheckpointManager(sys.argv[1], keep=2, rank=rank, world=2)
mgr.save(1, state(m, o))
want = full(m)
m2, o2 = build(1)
step, st, extra = mgr.load_latest(lambda: state(m2, o2))
set_state_dict(m2, o2, model_state_dict=st["model"], optim_state_dict=st["optim"])
got = full(m2)
assert step == 1 and all(torch.equal(want[k], got[k]) for k in want), "FSDP2 load differs"
with torch.no_grad():
    if rank == 1:
        m2[2].weight.to_local().fill_(float("nan"))   # only rank 1's shard is bad
try:
    mgr.save(2, state(m2, o2)); print("SAVED"); sys.exit(1)
except NonFiniteCheckpointError as e:
    assert "2.weight" in str(e) and "rank 1" in str(e), str(e)
dist.barrier()
if rank == 0:
    assert sorted(os.listdir(sys.argv[1])) == ["step_00000001"], os.listdir(sys.argv[1])
    print("FSDP-OK")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_rank_fsdp_checkpoint(tmp_path):
    script = tmp_path / "fsdp_ck.py"
    script.write_text(_FSDP_SCRIPT)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", "--master_addr=127.0.0.1", str(script), str(tmp_path / "ck")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "FSDP-OK" in p.stdout, (p.stdout[-2000:], p.stderr[-4000:])
