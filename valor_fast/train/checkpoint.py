"""Model checkpoints: safetensors files written atomically (temp file + rename), so a crash
mid-save never leaves a truncated checkpoint where a good one was."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


def save_model(model: nn.Module, path: str, metadata: Optional[Dict[str, str]] = None) -> str:
    # tied weights (LM head <-> word embeddings) are one tensor here, so the state dict has no
    # aliases; contiguous copies keep safetensors happy with views
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def load_model(model: nn.Module, path: str, strict: bool = True) -> Dict[str, list]:
    """Load a safetensors (or weights_only torch) checkpoint; returns missing/unexpected keys."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # untrusted: tensors only
    res = model.load_state_dict(sd, strict=strict)
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ---------------- sharded training checkpoints (torch.distributed.checkpoint) ----------------

import random as _random
import shutil as _shutil

import numpy as _np

from ..utils.log import get_logger as _get_logger

_log = _get_logger(__name__)
_PREFIX = "step_"


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


class CheckpointManager:
    """Sharded checkpoints under `root/step_00000123/`.

    A save writes every rank's shards into `step_N.tmp/`, then rank 0 writes `meta.json` and
    renames the folder: a crash mid-save leaves only a `.tmp` folder, which is never a resume
    point (and is cleared at the next save).  The newest `keep` complete checkpoints are kept.
    `load_latest` falls back to an older checkpoint if the newest does not load (on every rank
    together, so ranks never resume from different steps).
    """

    def __init__(self, root: str, keep: int = 3, rank: int = 0, world: int = 1, async_save: bool = False):
        self.root, self.keep, self.rank, self.world, self.async_save = root, keep, rank, world, async_save
        self._pending = None   # (future, tmp, final, meta) of an async save
        self._pg = None
        import torch.distributed as dist
        if async_save and dist.is_available() and dist.is_initialized() and world > 1:
            # the background save runs collectives while training runs its own: a separate
            # gloo group keeps the two streams of collectives apart
            self._pg = dist.new_group(backend="gloo")
        os.makedirs(root, exist_ok=True)

    # -- listing --
    def complete(self) -> list:
        """Complete checkpoints, newest first: (step, path)."""
        out = []
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            if name.startswith(_PREFIX) and not name.endswith(".tmp") and os.path.exists(os.path.join(p, "meta.json")):
                try:
                    out.append((int(name[len(_PREFIX):]), p))
                except ValueError:
                    continue
        return sorted(out, reverse=True)

    # -- save --
    def save(self, step: int, app_state: dict, extra: Optional[dict] = None) -> str:
        """app_state: {"model": sd, "optim": sd} (DCP-sharded); extra: small per-rank state."""
        import torch.distributed.checkpoint as dcp
        from .dist import barrier
        self.wait()
        final = os.path.join(self.root, f"{_PREFIX}{step:08d}")
        tmp = final + ".tmp"
        if self.rank == 0:
            if os.path.exists(tmp):
                _shutil.rmtree(tmp)
            os.makedirs(tmp)
        barrier()
        torch.save({"rng": rng_state(), **(extra or {})}, os.path.join(tmp, f"rank{self.rank:05d}.pt"))
        meta = {"step": step, "world": self.world}
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
            write_json(os.path.join(tmp, "meta.json"), meta)
            if os.path.exists(final):
                _shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in self.complete()[self.keep:]:
                _shutil.rmtree(old, ignore_errors=True)
            for name in os.listdir(self.root):   # leftovers of crashed saves
                if name.endswith(".tmp") and os.path.join(self.root, name) != tmp:
                    _shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        barrier()

    # -- load --
    def load(self, path: str, app_state: dict) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
        # every model tensor must be in the checkpoint; optimiser state may be partial (AdamW
        # keeps no state for parameters that never had a gradient, e.g. the coarse-only fusion
        # layer in fine mode, while a fresh optimiser's state dict lists them)
        saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        want = {f"model.{k}" for k in app_state.get("model", {})}
        lost = sorted(want - saved)
        if lost:
            raise KeyError(f"checkpoint {path!r} lacks model tensors {lost[:5]} ({len(lost)} in all)")
        dcp.load(app_state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        own = os.path.join(path, f"rank{self.rank:05d}.pt")
        if not os.path.exists(own):
            raise FileNotFoundError(f"{own} missing: checkpoint written with another world size?")
        extra = torch.load(own, map_location="cpu", weights_only=True)
        with open(os.path.join(path, "meta.json")) as f:
            extra["meta"] = json.load(f)
        return extra

    def load_latest(self, make_state, before: Optional[int] = None):
        """Try complete checkpoints newest first.  `make_state()` returns a fresh app_state to
        load into (so a failed partial load leaves nothing behind).  Returns
        (step, app_state, extra) or None if there is nothing to resume."""
        from .dist import all_reduce_
        for step, path in self.complete():
            if before is not None and step >= before:
                continue
            state = make_state()
            err = None
            try:
                extra = self.load(path, state)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # corrupt or partial: fall back to the previous checkpoint
                # (DCP's CheckpointException derives from BaseException, not Exception)
                err = e
            bad = all_reduce_(torch.tensor([0 if err is None else 1]))
            if int(bad) == 0:
                _log.info("resumed from %s (step %d)", path, step)
                return step, state, extra
            _log.warning("checkpoint %s does not load (%s); falling back to an older one", path,
                         err if err is not None else "failed on another rank")
        return None


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
                    spec: str) -> Optional[int]:
    """Load the checkpoint `spec` names (auto: the newest complete one, falling back to older
    ones; else a checkpoint folder) into `task` and `opt` and restore the RNG states.  Returns
    the step it holds, or None when auto finds nothing to resume."""
    if spec == "auto":
        res = ckpts.load_latest(lambda: app_state(task, opt))
    else:
        st = app_state(task, opt)
        extra = ckpts.load(spec, st)
        res = (extra["meta"]["step"], st, extra)
    if res is None:
        _log.info("resume=auto: no complete checkpoint in %s, starting fresh", ckpts.root)
        return None
    step, st, extra = res
    load_app_state(task, opt, st)
    set_rng_state(extra["rng"])
    return step


def full_model_state(task: nn.Module) -> Dict[str, torch.Tensor]:
    """Unsharded model weights (every rank takes part; all of them on CPU) for the safetensors
    export: the task's `model.` entries with the prefix dropped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(task, options=opts)
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}


def export_weights(sd: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> str:
    """Write `sd` to a safetensors file atomically (temp file + rename)."""
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path
