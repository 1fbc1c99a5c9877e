"""Walking a (model + optimiser) app_state: flatten it, copy it, check it is finite.

An app_state is what `torch.distributed.checkpoint.state_dict.get_state_dict` returns, nested:
{"model": {fqn: Tensor | DTensor}, "optim": {"state": {fqn: {"exp_avg": ..., "step": ...}},
"param_groups": [{"lr": float, "betas": (float, float), ...}]}}.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator, List, Optional, Tuple

import torch


class NonFiniteStateError(FloatingPointError):
    """A state about to be saved (or just loaded) holds NaN or Inf."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def flatten_state(state: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, leaf) pairs in a fixed order (dict insertion order, list index)."""
    if isinstance(state, dict):
        for k, v in state.items():
            yield from flatten_state(v, f"{prefix}{k}.")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from flatten_state(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], state


def clone_state(state: Any) -> Any:
    """A deep copy whose tensors are fresh clones on the same device (DTensors keep their mesh
    and placements), so loading into it cannot touch the live model or optimiser.  Costs one
    extra copy of this rank's model + optimiser shards for as long as it lives."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return type(state)((k, clone_state(v)) for k, v in state.items())
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    if isinstance(state, tuple):
        return tuple(clone_state(v) for v in state)
    return copy.deepcopy(state)


def _reduce_device() -> torch.device:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_flags(state: Any) -> Tuple[List[str], torch.Tensor]:
    """Keys of every floating tensor and float leaf, and a (n,) bool CPU tensor: not finite.
    Each tensor's flag is computed on its own device and stacked there; each device's stack
    reaches the host in one copy (the one sync for a GPU state), python floats are judged on
    the host.  Order: tensors of each device in flatten order, then floats."""
    keys: dict = {}
    flags: dict = {}
    host_keys, host_flags = [], []
    for key, v in flatten_state(state):
        if isinstance(v, torch.Tensor):
            t = _local(v)
            if (t.is_floating_point() or t.is_complex()) and t.numel():
                keys.setdefault(t.device, []).append(key)
                flags.setdefault(t.device, []).append((~torch.isfinite(t)).any())
        elif isinstance(v, float):
            host_keys.append(key)
            host_flags.append(not math.isfinite(v))
    out_keys, parts = [], []
    for dev, fl in flags.items():
        out_keys += keys[dev]
        parts.append(torch.stack(fl).cpu())
    parts.append(torch.tensor(host_flags, dtype=torch.bool))
    return out_keys + host_keys, torch.cat(parts)


def first_nonfinite(state: Any, collective: bool = True) -> Optional[str]:
    """The first key (flatten order per device, see _local_flags) of a floating tensor or
    float holding NaN/Inf, or None.  collective: on any rank -- every rank calls it and gets
    the same answer (one tiny all-reduce); else this rank's own shards only.  One host sync
    (a GPU state's flags reaching the host) when everything is finite."""
    import torch.distributed as dist
    keys, flags = _local_flags(state)
    dist_on = collective and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist_on else (0, 1)
    bad_rank = torch.tensor([rank if bool(flags.any()) else world])
    if dist_on:
        bad_rank = bad_rank.to(_reduce_device())
        dist.all_reduce(bad_rank, op=dist.ReduceOp.MIN)
    r = int(bad_rank)
    if r >= world:
        return None
    name = None
    if r == rank:
        name = keys[int(flags.nonzero()[0, 0])]
        name = name if world == 1 else f"{name} (rank {rank})"
    if dist_on:
        box = [name]
        dist.broadcast_object_list(box, src=r)
        name = box[0]
    return name
