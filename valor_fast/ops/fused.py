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
float64).  The choice is logged once per (op, backend, reason); the switch is
valor_fast.ops.backend.BackendSwitch, shared with attention and contrastive.

The torch backends: eager references for add + LayerNorm and bias + GELU (torch.compile fuses
those itself); for the LM head the chunked torch implementation, so the (N, V) logits are never
materialised on any backend.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import valor_fast.kernels.add_layer_norm as _k_aln
import valor_fast.kernels.bias_gelu as _k_gelu
import valor_fast.kernels.lm_head_ce as _k_lm
from valor_fast.utils.deps import HAS_TRITON, INSTALL_HINTS

from .backend import BackendSwitch, triton_device_reason

BACKENDS = ("triton", "torch", "eager")
_ENV = "VALOR_FAST_FUSED"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _probe():
    return {"triton": (True, "installed") if HAS_TRITON else
            (False, f"triton not installed ({INSTALL_HINTS['triton']})"),
            "torch": (True, "torch"), "eager": (True, "torch, unfused (forced only)")}


def _check(backend: str, device: torch.device, unsupported: Optional[str] = None) -> Optional[str]:
    # a forced triton takes any input its device allows: an unsupported one is left to the
    # kernel's own error, which names it
    return triton_device_reason(device) if backend == "triton" else None


def _auto(device: torch.device, unsupported: Optional[str] = None) -> Tuple[str, str]:
    if device.type != "cuda":
        return "torch", f"{device.type} tensors"
    if not HAS_TRITON:
        return "torch", f"triton not installed ({INSTALL_HINTS['triton']})"
    if unsupported is not None:
        return "torch", unsupported
    return "triton", "CUDA"


SWITCH = BackendSwitch("fused", _ENV, BACKENDS, _probe, _auto, _check)
set_backend = SWITCH.set_backend
use_backend = SWITCH.use_backend
get_forced_backend = SWITCH.forced


def available_backends():
    """{backend: (usable, why)} as probed once."""
    return SWITCH.available()


def fused_enabled() -> bool:
    """False when the unfused "eager" baseline is forced: the model then skips these ops."""
    return get_forced_backend() != "eager"


def _choose(op: str, device: torch.device, unsupported: Optional[str]) -> str:
    """`unsupported`: why the Triton kernel cannot take these inputs, or None."""
    return SWITCH.choose(op, device=device, unsupported=unsupported)


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
