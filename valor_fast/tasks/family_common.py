"""Data-parallel helpers the CoAVT and VLSA objectives share.

Draws are made for the whole global batch from the step's generator (the same on every rank)
and each rank keeps its rows, so a mask or a sampled negative depends on the sample, not on how
the global batch is split over ranks.  Token / patch means are taken over the global count, so
data-parallel gradient averaging gives exactly the gradient of the global batch's mean.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..ops.distributed import rank, world


def check_family_data(cfg) -> None:
    """The data settings fit the family model's embedding tables (ValueError naming the fields):
    data.frames_train / frames_test <= model.max_frames, data.audio_slices <= model.max_slices."""
    a, d = cfg.model, cfg.data
    for name in ("frames_train", "frames_test"):
        if getattr(d, name) > a.max_frames:
            raise ValueError(f"data.{name}={getattr(d, name)} exceeds model.max_frames={a.max_frames} "
                             f"(the {a.family} frame embedding's slots)")
    if d.audio_slices > a.max_slices:
        raise ValueError(f"data.audio_slices={d.audio_slices} exceeds model.max_slices={a.max_slices}")


def rank_rows(x: torch.Tensor, local: int) -> torch.Tensor:
    """Rows [rank * local, (rank + 1) * local) of a draw made for the global batch."""
    r = rank()
    if x.shape[0] != local * world():
        raise ValueError(f"global draw has {x.shape[0]} rows, expected {local} x {world()} ranks")
    return x[r * local:(r + 1) * local]


def global_rand(local: int, *shape: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniforms (local, *shape) on the host: this rank's rows of one draw for the global batch."""
    return rank_rows(torch.rand(local * world(), *shape, generator=generator), local)


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a mean over the global batch: local sum * world / global count, so
    the rank average is sum / count over every rank (and so is the averaged gradient).  A global
    count of zero gives 0 (the term is then absent this step, its key still present)."""
    count = count.detach().to(total.dtype)
    n = world()
    if n == 1:
        return total / count.clamp(min=1)
    c = count.clone()
    dist.all_reduce(c)
    return total * n / c.clamp(min=1)
