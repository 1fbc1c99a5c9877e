"""Training metrics: per-step records kept on the device, the run history, TensorBoard, the log line.

A step's loss terms stay device tensors until a log (or checkpoint) step, when every pending
record reaches the host in ONE all-reduce + transfer: the step itself never waits for the host.
The keys are fixed by the task (`Task.loss_keys()`), so every record is a vector of the same
length in the same order; a step that returns other keys is an error naming them.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..utils.log import get_logger, log_once
from .checkpoint import write_json
from .dist import all_reduce_

log = get_logger(__name__)


def memory_str(device: torch.device) -> str:
    """Peak memory: CUDA allocator peak, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    try:
        import resource
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB rss"
    except Exception:
        return "n/a"


class TensorBoard:
    """TensorBoard scalars when tensorboard is installed (logged once when it is not); `path`
    None writes nothing (ranks other than 0, train.tensorboard=false).  The writer opens at the
    first scalar, so a run that logs nothing writes nothing."""

    def __init__(self, path: Optional[str]):
        self.path, self.w = path, None

    def add(self, scalars: Dict[str, float], step: int) -> None:
        if self.path and self.w is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.w = SummaryWriter(self.path)
            except Exception as e:
                log_once("tb", f"TensorBoard scalars off ({e}); install: pip install tensorboard")
                self.path = None
        if self.w:
            for k, v in scalars.items():
                self.w.add_scalar(k, v, step)

    def close(self) -> None:
        if self.w:
            self.w.close()
            self.w = None


class MetricLogger:
    """Pending device-side step records -> the history (a list of {key: float, "step": int}).

    `keys`: the task's loss keys; every record adds "grad_norm".  `world`: records are averaged
    over ranks when flushed (per-rank MGC terms are shares of the global mean)."""

    def __init__(self, keys: Sequence[str], world: int = 1, tb_path: Optional[str] = None):
        self.keys: Tuple[str, ...] = tuple(keys) + ("grad_norm",)
        self.world = world
        self.pending: List[Tuple[int, torch.Tensor]] = []
        self.history: List[dict] = []
        self.tb = TensorBoard(tb_path)

    def record(self, step: int, losses: Dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Queue step `step`'s losses (device scalars) and gradient norm; no host sync."""
        if set(losses) != set(self.keys[:-1]):
            raise KeyError(f"step {step} returned loss keys {sorted(losses)}, the task declares "
                           f"{sorted(self.keys[:-1])}")
        vec = torch.stack([losses[k].float() for k in self.keys[:-1]] + [grad_norm.float()])
        self.pending.append((step, vec))

    def flush(self) -> Optional[dict]:
        """Bring every pending record to the host (one all-reduce, one transfer) into the
        history; returns the newest record, or None when nothing was pending.  Collective: every
        rank calls it at the same steps."""
        if not self.pending:
            return None
        vals = (all_reduce_(torch.stack([v for _, v in self.pending])) / self.world).cpu().tolist()
        for (step, _), v in zip(self.pending, vals):
            self.history.append(dict(zip(self.keys, v), step=step))
        self.pending.clear()
        return self.history[-1]

    def discard(self) -> None:
        """Drop pending records (steps after a non-finite value are never logged as good)."""
        self.pending.clear()

    def add(self, step: int, scalars: Dict[str, float]) -> None:
        """Merge `scalars` (validation metrics, ...) into the history record of `step` (appended
        if there is none yet)."""
        if self.history and self.history[-1]["step"] == step:
            self.history[-1].update(scalars)
        else:
            self.history.append(dict(scalars, step=step))

    def write(self, run_dir: str) -> None:
        write_json(os.path.join(run_dir, "history.json"), self.history)

    def close(self) -> None:
        self.tb.close()


def log_line(step: int, steps: int, rec: dict, lr: float, sps: float, tokens_per_s: float, tflops: float,
             mfu: str, mem: str, bad_media: int) -> str:
    """The metrics line of a log step."""
    terms = " ".join(f"{k}={v:.3f}" for k, v in rec.items() if "/" in k)
    return (f"step {step}/{steps} loss {rec['loss']:.4f} ({terms}) grad {rec['grad_norm']:.2f} lr {lr:.2e} | "
            f"{sps:.1f} samples/s {tokens_per_s:.0f} tok/s {tflops:.2f} TFLOP/s MFU {mfu} | mem {mem}"
            + (f" | bad media replaced {bad_media}" if bad_media else ""))
