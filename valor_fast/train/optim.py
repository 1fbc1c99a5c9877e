"""AdamW with VALOR's parameter groups and the warmup + linear-decay schedule."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import TrainConfig


def no_decay(name: str, p: torch.Tensor) -> bool:
    # biases, norms, embeddings, the temperature and other 0/1-d parameters are not decayed
    return p.dim() < 2 or name.endswith(".bias") or ".ln" in name or "norm" in name or "embed" in name \
        or name.endswith((".cls", ".pos"))


def vision_parameters(root: nn.Module) -> set:
    """ids of the vision tower's parameters, found as the submodule named `vision` at any depth:
    the optimiser is built over the task (`model.vision.*`), wrapped or not, never the bare model."""
    out = set()
    for name, m in root.named_modules():
        if name.rsplit(".", 1)[-1] == "vision":
            out.update(id(p) for p in m.parameters())
    return out


def param_groups(model: nn.Module, cfg: TrainConfig) -> list:
    groups = {}
    vision_ids = vision_parameters(model) if cfg.vision_lr > 0 else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision = id(p) in vision_ids
        nd = no_decay(name, p)
        key = (vision, nd)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if nd else cfg.weight_decay,
                           "lr": cfg.vision_lr if vision else cfg.lr, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    out = []
    for g in groups.values():
        g["initial_lr"] = g["lr"]
        g.pop("names")
        out.append(g)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups`.  fused=None: the fused update (one kernel for the whole update,
    apex's FusedAdam role) on CUDA and on the CPU, where torch (>= 2.4) has one too (about a
    quarter of foreach's time for the tiny model's 5.6M parameters: bench/bench_cpu_step.py);
    other devices use foreach.  True / False force it."""
    kw = dict(betas=tuple(cfg.betas), eps=cfg.eps)
    if fused is None:
        fused = device.type in ("cuda", "cpu")
    if fused:
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(param_groups(model, cfg), **kw)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warmup over `warmup` of the steps, then linear decay to 0."""
    w = max(1, int(round(total * warmup))) if warmup > 0 else 0
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
