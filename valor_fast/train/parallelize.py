"""Parallelism as functions applied in a fixed order (torchtitan's `parallelize` pattern):
activation checkpointing -> torch.compile per block -> FSDP2 `fully_shard` per block and root
(or plain DDP for small models).  The model keeps its architecture; these only wrap it."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from ..utils.log import get_logger

log = get_logger(__name__)


def transformer_blocks(model: nn.Module) -> List[nn.ModuleList]:
    """The per-block ModuleLists of any family's model (`model.transformer_blocks()`: VALOR's
    BERT layers, vision and AST blocks; CoAVT's vision, audio, joint, text and query layers;
    VLSA's shared transformer)."""
    if not hasattr(model, "transformer_blocks"):
        raise TypeError(f"{type(model).__name__} defines no transformer_blocks(): parallelize cannot find its blocks")
    return list(model.transformer_blocks())


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> int:
    """Wrap every transformer block (mode 'full') or every other one ('selective') so its
    activations are recomputed in backward.  Returns the number of wrapped blocks."""
    if mode in ("", "none", None):
        return 0
    if mode not in ("full", "selective"):
        raise ValueError(f"train.activation_checkpointing must be none|full|selective, got {mode!r}")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    n = 0
    for blocks in transformer_blocks(model):
        for i, blk in enumerate(blocks):
            if mode == "selective" and i % 2:
                continue
            blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False)
            n += 1
    return n


def apply_compile(model: nn.Module, mode: Optional[str] = None) -> int:
    """torch.compile each block (repeated blocks share one compiled graph; dynamic=False keeps
    shapes static so CUDA graphs can apply: mode="reduce-overhead" records them).  fullgraph=True
    makes a graph break an error rather than a silent slow path."""
    n = 0
    for blocks in transformer_blocks(model):
        for i, blk in enumerate(blocks):
            blocks[i] = torch.compile(blk, fullgraph=True, dynamic=False, mode=mode)
            n += 1
    return n


def mixed_precision_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision in ("bf16", "fp16"):
        dt = torch.bfloat16 if precision == "bf16" else torch.float16
        # bf16 params/compute, fp32 gradient reduction
        return MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(root: nn.Module, model: nn.Module, mesh, precision: str = "fp32",
               reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard every transformer block of `model`, then `root` (which keeps the rest:
    embeddings, heads, patch embeddings).  With a 2-D mesh this is HSDP."""
    from torch.distributed.fsdp import fully_shard
    mp = mixed_precision_policy(precision)
    for blocks in transformer_blocks(model):
        for blk in blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return root


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    # find_unused_parameters: some heads sit idle depending on the loss form (the coarse AV
    # fusion in fine mode, the token-weight MLPs in coarse mode)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def parallelize(root: nn.Module, model: nn.Module, info, parallel: str, ac: str, compile: bool,
                precision: str) -> nn.Module:
    """Apply AC, compile, then sharding, in that order, to the blocks of `model`; `root` (the
    task module whose forward runs the whole step) becomes the FSDP/DDP root.  Returns the
    module to train."""
    n_ac = apply_activation_checkpointing(model, ac)
    n_c = apply_compile(model) if compile else 0
    if info.distributed:
        if parallel == "fsdp":
            apply_fsdp(root, model, info.mesh, precision)
        elif parallel == "ddp":
            root = apply_ddp(root, info.device)
        else:
            raise ValueError(f"train.parallel must be fsdp or ddp, got {parallel!r}")
    log.info("parallelize: %d blocks checkpointed, %d compiled, %s over %d ranks", n_ac, n_c,
             parallel if info.distributed else "no sharding", info.world)
    return root
