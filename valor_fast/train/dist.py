"""Process-group setup for one process, several CPU processes (gloo) or GPUs (NCCL), under
torchrun (single or multi-node: torchrun's rendezvous sets RANK/WORLD_SIZE/LOCAL_RANK)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..utils.log import get_logger

log = get_logger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Optional[object] = None   # DeviceMesh: 1-D (FSDP) or 2-D ("replicate", "shard") for HSDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto", hsdp_replicas: int = 0, timeout_s: int = 1800) -> DistInfo:
    """Initialise from torchrun's environment; a plain `python` launch is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device!r} but no CUDA device is visible")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local, dev)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        from torch.distributed.device_mesh import init_device_mesh
        if hsdp_replicas and hsdp_replicas > 1:
            if world % hsdp_replicas:
                raise ValueError(f"world size {world} is not divisible by hsdp_replicas={hsdp_replicas}")
            # replicate across nodes, shard within a node
            info.mesh = init_device_mesh(dev.type, (hsdp_replicas, world // hsdp_replicas),
                                         mesh_dim_names=("replicate", "shard"))
        else:
            info.mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("shard",))
        log.info("rank %d/%d on %s (%s)", rank, world, dev, dist.get_backend())
    return info


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
