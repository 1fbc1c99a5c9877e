"""Data-parallel gathering for the losses: the one path by which negatives cross ranks.

Full gather (what tasks/mga.py does): every rank all-gathers the features of all ranks
(`gather_features`, or `gather_with_grad` / `gather_no_grad`) and computes the same full-batch
loss L.  In backward, rank r receives dL/d(all features) from its own copy of L; the gradients
are summed over ranks (each rank's copy of L contributes the same dL/df_r) and rank r keeps its
slice, so it holds N * dL/df_r.  Data-parallel gradient averaging (DDP / FSDP divide by N) then
leaves exactly dL/dθ: the same as one process on the concatenated batch.

Local loss (open_clip's local_loss): `gather_negatives` returns the gathered features as a
`Negatives`, passed to `valor_fast.ops.grouped_contrastive_loss(..., negatives=...)` next to this
rank's own features.  Rank r then scores only its own B rows against all N*B gathered columns
(labels offset by r*B), L_r, and L = mean_r L_r is the full-batch loss.  The gathered columns'
gradients are again summed over ranks, so rank r holds sum_r' dL_r'/df_r = N * dL/df_r: the same
contract, so it composes with DDP / FSDP averaging the same way, at 1/N of the loss compute (at
B = 65536 over 64 ranks, 1024 x 65536 logits per rank instead of 65536 x 65536).  A replicated
parameter that enters the loss directly (the temperature) gets dL/dτ on every rank without the
local loss and dL_r/dτ with it; averaging over ranks gives dL/dτ in both cases.  Do not also
scale the loss by N, and do not gather when gradients are summed (not averaged) over ranks.

`all_reduce_sum` sums a tensor over ranks outside autograd (token / sample counts), no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

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


@dataclass
class Negatives:
    """All ranks' features for the local loss, made by `gather_negatives` (rank-major rows)."""

    text: torch.Tensor                          # (N*B, D) coarse, (N*B, T_max, D) fine
    groups: Dict[str, Any]                      # the group specs, every tensor gathered
    offset: int                                 # this rank's first row: rank * B
    world: int                                  # N, the loss's scale (mean over ranks = full batch)
    text_weight: Optional[torch.Tensor] = None  # (N*B, T_max) fine
    text_mask: Optional[torch.Tensor] = None    # (N*B, T_max) fine
    valid: Dict[str, torch.Tensor] = field(default_factory=dict)  # group -> (N*B,) bool
    text_floor: Optional[torch.Tensor] = None   # (N*B,) bool fine: upstream's padded max per text


def _gather_spec(spec):
    if isinstance(spec, torch.Tensor):
        return gather_features(spec)
    if isinstance(spec, tuple) and spec and all(isinstance(s, str) for s in spec):
        return spec  # a concatenation of other groups, by name
    return tuple(None if t is None else gather_features(t) for t in spec)


def gather_negatives(text: torch.Tensor, groups: Dict[str, Any], *, text_weight: Optional[torch.Tensor] = None,
                     text_mask: Optional[torch.Tensor] = None,
                     valid: Optional[Dict[str, torch.Tensor]] = None,
                     text_floor: Optional[torch.Tensor] = None) -> Negatives:
    """Gather the arguments of `grouped_contrastive_loss` (this rank's B samples) for the local
    loss.  Fine text is padded on its token axis to the longest over ranks (padding masked), its
    text_floor (B,) bool gathered with it.  In one process it holds this process's own tensors,
    offset 0, world 1."""
    if text.dim() == 3:
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if text_weight is None:
            text_weight = torch.zeros(text.shape[:2], dtype=torch.float32, device=text.device)
        text_weight = gather_features(text_weight, pad_dim=1)
        text_mask = gather_features(text_mask, pad_dim=1, pad_value=False)
        text_all = gather_features(text, pad_dim=1)
    else:
        text_all = gather_features(text)
    return Negatives(text=text_all, groups={n: _gather_spec(s) for n, s in groups.items()},
                     offset=rank() * text.shape[0], world=world(), text_weight=text_weight, text_mask=text_mask,
                     valid={n: gather_features(v) for n, v in (valid or {}).items()},
                     text_floor=None if text_floor is None else gather_features(text_floor))
