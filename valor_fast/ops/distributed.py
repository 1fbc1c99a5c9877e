"""All-gather of contrastive features with the gradient returned to the owning rank.

Every rank gathers the features of all ranks and computes the same full-batch loss L.  In
backward, rank r receives dL/d(all features) from its own copy of L; the gradients are summed
over ranks (each rank's copy of L contributes the same dL/df_r) and rank r keeps its slice, so
it holds N * dL/df_r.  Data-parallel gradient averaging (DDP / FSDP divide by N) then leaves
exactly dL/dθ: the same as one process on the concatenated batch.

local_loss (open_clip's trick, `valor_fast.ops.contrastive_loss(..., gather=True,
local_loss=True)`): rank r scores only its own B rows against all N*B gathered columns (labels
offset by r*B), L_r, and L = mean_r L_r is the full-batch loss.  The gathered columns' gradients
are again summed over ranks, so rank r holds sum_r' dL_r'/df_r = N * dL/df_r: the same contract,
so it composes with DDP / FSDP averaging the same way, at 1/N of the loss compute.  A replicated
parameter that enters the loss directly (the temperature) gets dL/dτ on every rank without
local_loss and dL_r/dτ with it; averaging over ranks gives dL/dτ in both cases.  Do not also
scale the loss by N, and do not gather when gradients are summed (not averaged) over ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_features(x: torch.Tensor, *, pad_dim: Optional[int] = None, pad_value=0) -> torch.Tensor:
    """(B, ...) on each rank -> (N*B, ...) rank-major, with the gradient returned to the owning
    rank (see the module docstring for the scaling); `pad_dim` is first padded to its largest size
    over ranks (text token axes differ per rank).  Identity in one process; tensors that do not
    need a gradient (masks) are gathered without the autograd node."""
    if world() == 1:
        return x
    if pad_dim is not None:
        x = pad_to_global_max(x, pad_dim, pad_value)
    if x.requires_grad and torch.is_grad_enabled():
        return gather_with_grad(x)
    return gather_no_grad(x)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (N*B, ...), rank-major; identity in one process.  Every rank
    must pass the same B (the trainer splits the global batch evenly)."""
    if world() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks, outside autograd (MGC's token counts, MGA's valid-sample counts):
    every rank gets the same tensor, and no value reaches the host.  Identity (detached) in one
    process."""
    t = t.detach()
    if world() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def pad_to_global_max(x: torch.Tensor, dim: int, value=0) -> torch.Tensor:
    """Pad `dim` to its largest size over ranks (text lengths differ per rank's batch)."""
    if world() == 1:
        return x
    n = torch.tensor([x.shape[dim]], device=x.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    extra = int(n) - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim)
