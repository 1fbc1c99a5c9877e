"""Device, precision and seeding: what the trainer, the cli and inference all need, with nothing
of the trainer attached (cli.py and infer.py import this, never valor_fast.train)."""
from __future__ import annotations

import contextlib
import random
from typing import Callable, ContextManager, Tuple

import numpy as np
import torch

PRECISIONS = ("bf16", "fp16", "fp32")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when a CUDA device is visible, else cpu; a named CUDA device without CUDA
    is an error naming train.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is visible")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on a CUDA device that supports it, else fp32."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be auto|bf16|fp16|fp32, got {precision!r}")
    return precision


def autocast_ctx(precision: str, device: torch.device) -> Tuple[Callable[[], ContextManager], str]:
    """(a factory of the autocast context for `precision` on `device`, the resolved precision).
    fp32 gives a null context."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (identical initial weights on every
    rank; the training draws themselves come from their own seeded generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
