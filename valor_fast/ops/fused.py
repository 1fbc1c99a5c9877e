"""Dispatch for the fused ops: add + LayerNorm, bias + GELU, masked LM head + cross-entropy.

Backend choice, per call:
  1. a backend forced in code (`set_backend` / `use_backend`, for tests and benchmarks),
  2. else the env var VALOR_FAST_FUSED=triton|torch|auto (read per call, so it can be flipped),
  3. else auto: Triton for CUDA tensors when triton is installed, torch otherwise (always torch on
     CPU; forcing triton on CPU requires TRITON_INTERPRET=1, the interpreter CI uses).
  "eager" (forced only) is the unfused baseline of bench/train_step.py --impl eager: the model
  takes its plain nn.Linear / F.gelu / nn.LayerNorm path (`fused_enabled()` is False) and the LM
  head materialises the (N, V) logits before F.cross_entropy, as an unfused model does.
Auto also falls back to torch for inputs the kernels do not cover (LayerNorm rows wider than 8192,
float64).  The choice is logged once per (op, backend, reason).

The torch backends: eager references for add + LayerNorm and bias + GELU (torch.compile fuses
those itself); for the LM head the chunked torch implementation, so the (N, V) logits are never
materialised on any backend.
"""
import contextlib
import os
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import valor_fast.kernels.add_layer_norm as _k_aln
import valor_fast.kernels.bias_gelu as _k_gelu
import valor_fast.kernels.lm_head_ce as _k_lm
from valor_fast.utils.deps import HAS_TRITON, INSTALL_HINTS
from valor_fast.utils.log import log_once

BACKENDS = ("triton", "torch", "eager")
_ENV = "VALOR_FAST_FUSED"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_forced: Optional[str] = None


def _validate(name: Optional[str], source: str) -> Optional[str]:
    if name is None or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source}: fused backend must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force 'triton' or 'torch' for every fused op (None or 'auto' = automatic choice)."""
    global _forced
    _forced = _validate(name, "set_backend")


def get_forced_backend() -> Optional[str]:
    """The backend forced in code or by the env var, or None for the automatic choice."""
    if _forced is not None:
        return _forced
    return _validate(os.environ.get(_ENV, "").strip().lower() or None, _ENV)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """`with use_backend("triton"): ...` forces a backend inside the block (restored on exit)."""
    global _forced
    prev = _forced
    _forced = _validate(name, "use_backend")
    try:
        yield
    finally:
        _forced = prev


def _log(op: str, backend: str, reason: str) -> None:
    # logging is not traceable with fullgraph=True; the eager first call logs it anyway
    if not torch.compiler.is_compiling():
        log_once(f"fused:{op}:{backend}:{reason}", f"fused {op}: {backend} backend ({reason})")


def fused_enabled() -> bool:
    """False when the unfused "eager" baseline is forced: the model then skips these ops."""
    return get_forced_backend() != "eager"


def _choose(op: str, device: torch.device, unsupported: Optional[str]) -> str:
    """`unsupported`: why the Triton kernel cannot take these inputs, or None."""
    forced = get_forced_backend()
    if forced == "eager":
        _log(op, "eager", "forced")
        return "eager"
    if forced == "torch":
        _log(op, "torch", "forced")
        return "torch"
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"fused {op}: backend 'triton' forced but triton is not installed "
                               f"({INSTALL_HINTS['triton']})")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"fused {op}: backend 'triton' forced for {device.type} tensors; "
                               "Triton runs on CUDA, or on the CPU only with TRITON_INTERPRET=1")
        # an unsupported input is left to the kernel's own error, which names it
        _log(op, "triton", "forced")
        return "triton"
    if device.type != "cuda":
        _log(op, "torch", f"auto: {device.type} tensors")
        return "torch"
    if not HAS_TRITON:
        _log(op, "torch", f"auto: triton not installed ({INSTALL_HINTS['triton']})")
        return "torch"
    if unsupported is not None:
        _log(op, "torch", f"auto: {unsupported}")
        return "torch"
    _log(op, "triton", "auto: CUDA")
    return "triton"


def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """(LayerNorm(x + residual), x + residual) over the last dim; residual may be None (then the
    second output is x).  Gradients flow into both outputs."""
    unsupported = None
    if x.shape[-1] > _k_aln.MAX_WIDTH:
        unsupported = f"width {x.shape[-1]} > {_k_aln.MAX_WIDTH}"
    elif x.dtype not in _TRITON_DTYPES:
        unsupported = f"dtype {x.dtype}"
    if _choose("add_layer_norm", x.device, unsupported) == "triton":
        return _k_aln.add_layer_norm(x, residual, weight, bias, eps)
    return _k_aln.add_layer_norm_ref(x, residual, weight, bias, eps)


def bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """gelu(x + bias); approximate "none" (erf, BERT), "tanh", or "quick" (CLIP x*sigmoid(1.702x))."""
    if approximate not in ("none", "tanh", "quick"):
        raise ValueError(f"bias_gelu: approximate must be 'none', 'tanh' or 'quick', got {approximate!r}")
    unsupported = None if x.dtype in _TRITON_DTYPES else f"dtype {x.dtype}"
    if _choose("bias_gelu", x.device, unsupported) == "triton":
        return _k_gelu.bias_gelu(x, bias, approximate)
    return _k_gelu.bias_gelu_ref(x, bias, approximate)


def quick_gelu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """CLIP quick GELU of x + bias."""
    return bias_gelu(x, bias, "quick")


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                          label_smoothing: float = 0.0, reduction: str = "mean",
                          ignore_index: int = -100,
                          chunk_size: int = _k_lm.DEFAULT_CHUNK) -> Tensor:
    """Cross-entropy of hidden (N, C) @ weight (V, C)^T + bias (V,) against labels (N,), computed
    in vocabulary chunks (memory O(N * chunk_size)); fp32 loss."""
    unsupported = None if hidden.dtype in _TRITON_DTYPES else f"dtype {hidden.dtype}"
    backend = _choose("lm_head_cross_entropy", hidden.device, unsupported)
    if backend == "eager":  # the unfused baseline: full (N, V) logits, fp32 loss
        logits = F.linear(hidden, weight, bias).float()
        return F.cross_entropy(logits, labels, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction)
    use_triton = backend == "triton"
    return _k_lm.lm_head_cross_entropy(hidden, weight, bias, labels, label_smoothing, reduction,
                                       ignore_index, chunk_size, use_triton=use_triton)
