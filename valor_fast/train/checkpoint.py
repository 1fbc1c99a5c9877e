"""Model and training checkpoints, written so that nothing is lost and nothing runs on a load.

* Files are written atomically (temp file + fsync + rename): a crash, kill -9 or full disk
  mid-save never leaves a truncated file where a good one was.
* Nothing non-finite is ever written: every save and export checks every floating tensor
  first (on the device, one sync) and refuses, naming the step and the first bad tensor.
* Loads never unpickle unrestricted: safetensors, `torch.load(weights_only=True)`, and DCP
  through `dcp_io` (restricted `.metadata` unpickler, weights_only non-tensor entries).
"""
from __future__ import annotations

import json
import os
import random as _random
import re as _re
import shutil as _shutil
import time as _time
from typing import Dict, Optional

import numpy as _np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..utils.fs import atomic_write, atomic_write_json, owner_record
from ..utils.fs import check_owned as _check_owned, fsync_dir as _fsync_dir, manifest as _manifest
from ..utils.fs import remove_owned_tree as _remove_owned
from ..utils.log import get_logger as _get_logger
from ..utils.safe_pickle import UnsafePickleError as _UnsafePickleError
from .state_utils import NonFiniteStateError, first_nonfinite

_log = _get_logger(__name__)


class NonFiniteCheckpointError(NonFiniteStateError):
    """A save or export refused: the state holds NaN/Inf."""


def export_model_state(sd: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None,
                       what: str = "model export") -> str:
    """Write `sd` as safetensors at `path`: refused (NonFiniteCheckpointError, nothing written)
    when a tensor is not finite; temp + fsync + rename, so a failure (a full disk) leaves any
    previous file intact and raises OSError naming `path`.  Not collective: call it on the
    rank that holds the full state dict."""
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    for k, v in sd.items():
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()):
            raise NonFiniteCheckpointError(f"refusing to write {what} {path!r}: tensor {k!r} holds NaN/Inf")
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta), what)


def save_model(model: nn.Module, path: str, metadata: Optional[Dict[str, str]] = None) -> str:
    # tied weights (LM head <-> word embeddings) are one tensor here, so the state dict has no
    # aliases; contiguous copies keep safetensors happy with views
    return export_model_state(model.state_dict(), path, metadata)


def load_model(model: nn.Module, path: str, strict: bool = True) -> Dict[str, list]:
    """Load a safetensors (or weights_only torch) checkpoint; returns missing/unexpected keys.
    strict: any missing / unexpected tensor or shape mismatch is a CheckpointMismatchError
    naming them; not strict: the tensors that fit load and every difference is logged."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # untrusted: tensors only
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(sd) & set(own)
                    if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        if strict:
            raise CheckpointMismatchError(path, missing, unexpected, shapes)
        _log.warning("partial load of %s: %s", path, describe_fit(missing, unexpected, shapes, limit=None))
        sd = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(sd, strict=False)
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": shapes}


def write_json(path: str, obj) -> None:
    atomic_write_json(path, obj)


# ---------------- sharded training checkpoints (torch.distributed.checkpoint) ----------------

_PREFIX = "step_"
_COMPLETE = _re.compile(r"^step_(\d+)$")          # step_00000123: a committed checkpoint
_WRITING = _re.compile(r"^step_(\d+)\.tmp$")      # being written (or left by a crashed save)
_KIND = "checkpoint"
# what a checkpoint folder holds besides meta.json: DCP shards and metadata (and its temp
# name), our per-rank extra state, and our own atomic-write temp files
_CKPT_FILES = ("__*_*.distcp", ".metadata", ".metadata.tmp", "__*.metadata", "rank*.pt", "*.tmp.*")


def rng_state() -> dict:
    """RNG states as tensors and plain numbers, so `torch.load(weights_only=True)` reads them."""
    np_state = _np.random.get_state()
    py = _random.getstate()
    st = {"torch": torch.get_rng_state(), "python_version": py[0],
          "python_state": torch.tensor(py[1], dtype=torch.int64), "python_gauss": py[2] if py[2] is not None else "none",
          "numpy_keys": torch.from_numpy(np_state[1].astype(_np.int64)), "numpy_pos": int(np_state[2]),
          "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    gauss = None if st["python_gauss"] == "none" else st["python_gauss"]
    _random.setstate((st["python_version"], tuple(int(x) for x in st["python_state"].tolist()), gauss))
    _np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(_np.uint32), st["numpy_pos"],
                          st["numpy_has_gauss"], st["numpy_gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


class CheckpointLoadError(RuntimeError):
    """A checkpoint folder did not load.  `reason` is a short slug -- unsafe (a pickle or a
    storage path a load must not follow), nonfinite, unreadable -- that names
    the folder it is set aside as."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"checkpoint {path} does not load ({reason}): {detail}")
        self.path, self.reason, self.detail = path, reason, detail


class CheckpointWorldSizeError(RuntimeError):
    """The checkpoint was written by another number of ranks (its per-rank state cannot map)."""


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's model tensors do not fit the configured model: names missing on one
    side, or shapes that differ.  Not corruption: the folder is left where it is, and the
    resume stops (train.resume_partial loads what fits, printing every difference)."""

    def __init__(self, path: str, missing: list, unexpected: list, shapes: list):
        self.path, self.missing, self.unexpected, self.shapes = path, missing, unexpected, shapes
        super().__init__(f"checkpoint {path} does not fit the configured model: {describe_fit(missing, unexpected, shapes)}. "
                         f"Resume with the run's model config, or pass --train.resume_partial true to load the "
                         f"tensors that fit (every difference is printed)")


def describe_fit(missing: list, unexpected: list, shapes: list, limit: Optional[int] = 8) -> str:
    """`missing` (ours, not in the checkpoint), `unexpected` (in it, not ours), `shapes`
    ("key (ckpt) vs (ours)") as one line; `limit` None lists every key."""
    def some(xs):
        shown = xs if limit is None else xs[:limit]
        return ", ".join(shown) + ("" if len(shown) == len(xs) else f" ... (+{len(xs) - len(shown)})")
    parts = [f"{len(xs)} {what} [{some(xs)}]" for xs, what in
             ((missing, "model tensor(s) not in the checkpoint"), (unexpected, "checkpoint tensor(s) the model lacks"),
              (shapes, "shape mismatch(es), checkpoint vs model")) if xs]
    return "; ".join(parts) or "no differences"


def model_fit(path: str, model_state: dict) -> tuple:
    """(missing, unexpected, shape mismatches) of a DCP checkpoint's model tensors against
    `model_state` ({fqn: tensor}, the app_state's "model"), from its .metadata (read safely)."""
    from .dcp_io import read_dcp_metadata
    md = read_dcp_metadata(path).state_dict_metadata
    saved = {k[len("model."):]: tuple(getattr(v, "size", ())) for k, v in md.items() if k.startswith("model.")}
    ours = {k: tuple(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    shapes = sorted(f"{k} {saved[k]} vs {ours[k]}" for k in set(ours) & set(saved) if saved[k] != ours[k])
    return missing, unexpected, shapes


def _one_line(e: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException (a BaseException carrying every
    failing rank's exception and traceback) gives its first rank's exception."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = sorted(failures.items())[0]
        return f"rank {rank}: {_one_line(pair[0] if isinstance(pair, tuple) else pair)}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def _reason(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        pair = sorted(failures.items())[0][1]
        return _reason(pair[0] if isinstance(pair, tuple) else pair)
    if isinstance(e, _UnsafePickleError):
        return "unsafe"
    if isinstance(e, NonFiniteStateError):
        return "nonfinite"
    return "unreadable"


def validate_keep(keep) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"train.keep_ckpts must be an integer >= 1 (how many of the newest complete checkpoints "
                         f"are kept; allowed: 1, 2, 3, ...), got {keep!r}")
    return keep


class CheckpointManager:
    """Sharded checkpoints under `root/step_00000123/`.

    A save first checks every floating tensor of the state (refused when any is NaN/Inf),
    writes every rank's shards into `step_N.tmp/` (its meta.json, state "writing", marks it as
    ours from the start), then rank 0 rewrites meta.json with the manifest of the folder's files
    and renames the folder: a crash mid-save leaves only a `.tmp` folder, never a resume point,
    cleared at the next save when it is provably ours (else renamed aside, never deleted).

    Keep-k: the newest `keep` checkpoints this manager can prove it wrote (meta.json: writer,
    run_id when the manager has one, and every file matching the manifest) are kept, counting
    the one just written; only older ones are removed.  Checkpoints it cannot prove (another
    run's, an older version's, edited ones), set-aside ones and checkpoints of later steps than
    the one just written (another timeline) are never counted and never removed.

    `load_latest` loads into scratch copies of the state, newest checkpoint first, on every
    rank together; one that fails to load (or holds NaN/Inf) is renamed
    `step_N.corrupt-<reason>`, reported and skipped.  Nothing loads: None, and the live
    model and optimiser still hold exactly the weights they were built with.
    """

    def __init__(self, root: str, keep: int = 3, rank: int = 0, world: int = 1, async_save: bool = False,
                 run_id: Optional[str] = None):
        self.keep = validate_keep(keep)
        self.root, self.rank, self.world, self.async_save, self.run_id = root, rank, world, async_save, run_id
        self.set_aside: list = []   # (path, new path, reason, detail) for every checkpoint set aside here
        self._pending = None   # (future, tmp, final, meta) of an async save
        self._pg = None
        self._told_unproven = False
        import torch.distributed as dist
        if async_save and dist.is_available() and dist.is_initialized() and world > 1:
            # the background save runs collectives while training runs its own: a separate
            # gloo group keeps the two streams of collectives apart
            self._pg = dist.new_group(backend="gloo")
        os.makedirs(root, exist_ok=True)

    # -- listing --
    def complete(self) -> list:
        """Committed checkpoints (step_N with a meta.json), newest first: (step, path)."""
        out = []
        for name in os.listdir(self.root):
            m = _COMPLETE.match(name)
            p = os.path.join(self.root, name)
            if m and os.path.isdir(p) and not os.path.islink(p) and os.path.exists(os.path.join(p, "meta.json")):
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def owns(self, path: str) -> Optional[str]:
        """None when `path` is provably a checkpoint of this manager's run, else why not."""
        return _check_owned(path, _KIND, self.run_id, marker="meta.json")

    # -- save --
    def save(self, step: int, app_state: dict, extra: Optional[dict] = None) -> str:
        """app_state: {"model": sd, "optim": sd} (DCP-sharded); extra: small per-rank state.
        Collective.  Raises NonFiniteCheckpointError (on every rank, nothing written) when
        the state holds NaN/Inf."""
        import torch.distributed.checkpoint as dcp
        from .dist import barrier
        self.wait()
        bad = first_nonfinite(app_state)
        if bad is not None:
            last = self.complete()
            raise NonFiniteCheckpointError(
                f"refusing to save checkpoint step {step}: {bad} holds NaN/Inf; nothing was written "
                f"(newest complete checkpoint: {last[0][1] if last else '(none)'})")
        final = os.path.join(self.root, f"{_PREFIX}{step:08d}")
        tmp = final + ".tmp"
        meta = {"step": step, "world": self.world}
        if self.rank == 0:
            if os.path.lexists(tmp):
                self._remove_stale(tmp)
            os.makedirs(tmp)
            atomic_write_json(os.path.join(tmp, "meta.json"), owner_record(_KIND, self.run_id, {}, state="writing", **meta))
        barrier()
        torch.save({"rng": rng_state(), **(extra or {})}, os.path.join(tmp, f"rank{self.rank:05d}.pt"))
        if self.async_save:
            fut = dcp.async_save(app_state, checkpoint_id=tmp, process_group=self._pg)
            self._pending = (fut, tmp, final, meta)
            return final
        dcp.save(app_state, checkpoint_id=tmp)
        self._commit(tmp, final, meta)
        return final

    def wait(self) -> None:
        """Finish an asynchronous save (commit it)."""
        if self._pending is not None:
            fut, tmp, final, meta = self._pending
            self._pending = None
            fut.result()
            self._commit(tmp, final, meta)

    def _commit(self, tmp: str, final: str, meta: dict) -> None:
        from .dist import barrier
        barrier()   # every rank's shards are on disk
        if self.rank == 0:
            files = _manifest(tmp, skip=("meta.json",))
            atomic_write_json(os.path.join(tmp, "meta.json"),
                              owner_record(_KIND, self.run_id, files, state="complete", **meta))
            if os.path.lexists(final):
                self._clear_way(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune(meta["step"])
            for name in os.listdir(self.root):   # leftovers of crashed saves
                if _WRITING.match(name):
                    self._remove_stale(os.path.join(self.root, name))
        barrier()

    # -- what may be removed --
    def _aside(self, path: str, tag: str) -> Optional[str]:
        """Rename `path` to `path.<tag>` (a free name); never deletes.  None when it cannot."""
        new, i = f"{path}.{tag}", 2
        while os.path.lexists(new):
            new, i = f"{path}.{tag}.{i}", i + 1
        try:
            os.rename(path, new)
        except OSError as e:
            _log.error("could not set %s aside as %s (%s); it stays where it is", path, new, e)
            return None
        _fsync_dir(self.root)
        return new

    def _remove_stale(self, tmp: str) -> None:
        """A `.tmp` folder of a crashed save: removed when provably ours, else renamed aside."""
        why = _check_owned(tmp, _KIND, self.run_id, marker="meta.json", patterns=_CKPT_FILES)
        if why is None:
            _shutil.rmtree(tmp)
            return
        new = self._aside(tmp, f"foreign-{int(_time.time())}")
        _log.warning("%s is in the way but not provably ours (%s): kept, renamed to %s", tmp, why, new)

    def _clear_way(self, final: str) -> None:
        """An older checkpoint of the same step (resumed from before it): ours is replaced,
        anything else renamed aside."""
        why = self.owns(final)
        if why is None:
            _remove_owned(final, _KIND, self.run_id, marker="meta.json")
        else:
            new = self._aside(final, f"replaced-{int(_time.time())}")
            _log.warning("%s is not provably ours (%s): kept, renamed to %s", final, why, new)

    def _prune(self, step: int) -> None:
        """Keep the newest `keep` provably-own checkpoints, counting the one just written at
        `step`; remove older own ones.  Nothing unproven, set aside or later is touched."""
        mine, unproven = [], []
        for s, p in self.complete():
            if s < step:
                (mine if self.owns(p) is None else unproven).append((s, p))
        for _, p in mine[self.keep - 1:]:
            try:
                _remove_owned(p, _KIND, self.run_id, marker="meta.json")
            except (OSError, RuntimeError) as e:
                _log.warning("keep_ckpts: %s not removed (%s)", p, e)
        if unproven and not self._told_unproven:
            self._told_unproven = True
            _log.info("keep_ckpts: %d checkpoint(s) in %s are not provably this run's (e.g. %s: %s); kept and "
                      "not counted", len(unproven), self.root, unproven[0][1], self.owns(unproven[0][1]))

    # -- load --
    def _read_meta(self, path: str) -> dict:
        try:
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
                raise ValueError("meta.json is not a checkpoint record (no integer 'step')")
        except (OSError, ValueError) as e:
            raise CheckpointLoadError(path, "unreadable", _one_line(e)) from None
        world = meta.get("world", self.world)
        if world != self.world:
            raise CheckpointWorldSizeError(
                f"checkpoint {path} was written by {world} rank(s), this run has {self.world}: resume it with "
                f"{world} processes (e.g. --nproc {world}), or start from its weights with --train.init")
        return meta

    def load(self, path: str, app_state: dict) -> dict:
        """Load the checkpoint folder `path` into `app_state` in place (collective).  Every model
        tensor must be in the checkpoint; optimiser state may be partial (AdamW keeps no state
        for parameters that never had a gradient, e.g. the coarse-only fusion layer in fine
        mode, while a fresh optimiser's state dict lists them).  Raises CheckpointLoadError
        (one line naming the folder) for anything unreadable, unsafe or non-finite on this rank."""
        meta = self._read_meta(path)
        try:
            extra = self._load_dcp(path, app_state)
        except (KeyboardInterrupt, SystemExit, CheckpointLoadError, CheckpointMismatchError,
                torch.cuda.OutOfMemoryError):
            raise
        except BaseException as e:   # DCP's CheckpointException derives from BaseException
            raise CheckpointLoadError(path, _reason(e), _one_line(e)) from None
        bad = first_nonfinite(app_state, collective=False)   # per rank: load_latest agrees after
        if bad is not None:
            raise CheckpointLoadError(path, "nonfinite", f"{bad} holds NaN/Inf")
        extra["meta"], extra["path"] = meta, path
        return extra

    def _load_dcp(self, path: str, app_state: dict) -> dict:
        import torch.distributed.checkpoint as dcp
        from .dcp_io import SafeFileSystemReader, SafeLoadPlanner
        missing, unexpected, shapes = model_fit(path, app_state.get("model", {}))
        if missing or unexpected or shapes:   # every rank reads the same .metadata: all raise together
            raise CheckpointMismatchError(path, missing, unexpected, shapes)
        dcp.load(app_state, storage_reader=SafeFileSystemReader(path),
                 planner=SafeLoadPlanner(allow_partial_load=True))
        own = os.path.join(path, f"rank{self.rank:05d}.pt")
        if not os.path.exists(own):
            raise CheckpointLoadError(path, "unreadable", f"{own} missing")
        return torch.load(own, map_location="cpu", weights_only=True)

    def load_latest(self, make_state, before: Optional[int] = None, scratch: bool = True):
        """Try complete checkpoints newest first (all ranks together, so ranks never resume
        from different steps).  `make_state()` returns the app_state to load into; with
        scratch (the default) the load goes into a clone of it, so a failed or partial load
        leaves the live model and optimiser untouched -- the caller applies the returned state
        (set_state_dict).  Returns (step, state, extra), or None when nothing loads: then the
        model still holds its initial weights.  Failed checkpoints are set aside (see
        `set_aside`) and never tried or counted again."""
        from .dist import all_reduce_
        from .state_utils import _reduce_device, clone_state
        tried = 0
        for step, path in self.complete():
            if before is not None and step >= before:
                continue
            tried += 1
            state = make_state()
            if scratch:
                state = clone_state(state)
            err = None
            try:
                extra = self.load(path, state)
            except CheckpointLoadError as e:
                err = e
            bad = all_reduce_(torch.tensor([0 if err is None else 1], device=_reduce_device()))
            if int(bad) == 0:
                _log.info("resumed from %s (step %d)", path, step)
                return step, state, extra
            del state
            reason, detail = (err.reason, err.detail) if err is not None else ("other-rank", "failed on another rank")
            new = self._set_aside(path, reason, detail)
            _log.warning("checkpoint %s does not load (%s: %s); set aside as %s; falling back to an older one",
                         path, reason, detail, new or "(could not rename)")
        if tried:
            _log.warning("no checkpoint in %s loads: starting from the initial weights", self.root)
        return None

    def _set_aside(self, path: str, reason: str, detail: str) -> Optional[str]:
        from .dist import barrier, broadcast_object
        new = self._aside(path, f"corrupt-{reason}") if self.rank == 0 else None
        new = broadcast_object(new)
        barrier()
        self.set_aside.append((path, new, reason, detail))
        return new


# ---------------- the training state of a task + optimiser ----------------

def app_state(task: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """{"model": ..., "optim": ...} state dicts of the (possibly sharded) task and optimiser."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(task, opt)
    return {"model": msd, "optim": osd}


def load_app_state(task: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(task, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def resume_training(ckpts: CheckpointManager, task: nn.Module, opt: torch.optim.Optimizer,
                    spec: str, partial: bool = False) -> Optional[tuple]:
    """Load the checkpoint `spec` names (auto: the newest complete one, falling back to older
    ones that do not load; else a checkpoint folder) into `task` and `opt` and restore the RNG
    states.  Returns (step, checkpoint path), or None when auto finds nothing to resume (the
    model then holds its initial weights).  A checkpoint whose model tensors do not fit raises
    CheckpointMismatchError, unless `partial`: then the tensors that fit load (every
    difference logged), the optimiser starts fresh, and the step and RNG states resume."""
    try:
        if spec == "auto":
            res = ckpts.load_latest(lambda: app_state(task, opt))
        else:
            st = clone_app_state(task, opt)
            extra = ckpts.load(spec, st)
            res = (extra["meta"]["step"], st, extra)
    except CheckpointMismatchError as e:
        if not partial:
            raise
        return load_partial(ckpts, task, e)
    if res is None:
        _log.info("resume=auto: no checkpoint in %s to resume: starting from the initial weights", ckpts.root)
        return None
    step, st, extra = res
    load_app_state(task, opt, st)
    set_rng_state(extra["rng"])
    return step, extra["path"]


def clone_app_state(task: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """A scratch copy of the app state to load into (a failed load leaves the live one as it was)."""
    from .state_utils import clone_state
    return clone_state(app_state(task, opt))


def load_partial(ckpts: CheckpointManager, task: nn.Module, e: "CheckpointMismatchError") -> tuple:
    """train.resume_partial: the model tensors of `e.path` whose name and shape fit, loaded into
    a scratch copy and then applied (strict=False); everything else stays at its initial value,
    the optimiser starts fresh.  Every missing / unexpected tensor and shape mismatch is logged."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from .dcp_io import SafeFileSystemReader, SafeLoadPlanner
    from .state_utils import clone_state
    _log.warning("train.resume_partial: %s: %s", e.path, describe_fit(e.missing, e.unexpected, e.shapes, limit=None))
    meta = ckpts._read_meta(e.path)
    skip = set(e.missing) | {s.split(" ", 1)[0] for s in e.shapes}
    sub = {"model": clone_state({k: v for k, v in get_model_state_dict(task).items() if k not in skip})}
    try:
        dcp.load(sub, storage_reader=SafeFileSystemReader(e.path), planner=SafeLoadPlanner(allow_partial_load=True))
        extra = torch.load(os.path.join(e.path, f"rank{ckpts.rank:05d}.pt"), map_location="cpu", weights_only=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        raise CheckpointLoadError(e.path, _reason(err), _one_line(err)) from None
    bad = first_nonfinite(sub)
    if bad is not None:
        raise CheckpointLoadError(e.path, "nonfinite", f"{bad} holds NaN/Inf")
    set_model_state_dict(task, sub["model"], options=StateDictOptions(strict=False))
    set_rng_state(extra["rng"])
    _log.warning("train.resume_partial: loaded %d model tensor(s) from %s; %d left at their initial values; the "
                 "optimiser starts fresh", len(sub["model"]), e.path, len(skip))
    return meta["step"], e.path


def full_model_state(task: nn.Module) -> Dict[str, torch.Tensor]:
    """Unsharded model weights (every rank takes part; all of them on CPU) for the safetensors
    export: the task's `model.` entries with the prefix dropped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(task, options=opts)
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
