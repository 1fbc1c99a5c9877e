"""Attention entry point and backend dispatcher.

`attention(q, k, v, key_padding_mask=None, causal=False, scale=None, bias=None)`: q (B, H, Lq, Dh),
k/v (B, H, Lk, Dh), key_padding_mask (B, Lk) bool True = attend, causal only with Lq == Lk; returns
(B, H, Lq, Dh) in q's dtype.  bias: an additive score bias (Swin's relative position bias plus the
shifted-window mask), (H, Lq, Lk) for every batch item or (nB, H, Lq, Lk) with B % nB == 0, batch
item b using bias[b % nB]; differentiable (the relative position table learns through it).  Every backend gives the same answer, including for rows with nothing
to attend to (all keys padded, or causal with only padded keys before the query): zeros, with
zero gradients, never NaN.

Backends:
  flash_attn  flash-attn 2 (CUDA, fp16/bf16, Dh <= 256): `flash_attn_func`, or the varlen API
              over the unpadded keys when there is a key-padding mask (not with causal: varlen
              causal aligns bottom-right per sequence, which is not a padded causal mask).  Takes
              no arbitrary bias: skipped by auto when one is given, an error when forced.
  xformers    `xformers.ops.memory_efficient_attention` (CUDA), masks as an additive bias.
  sdpa        `torch.nn.functional.scaled_dot_product_attention`; without a mask it reaches
              torch's flash / cuDNN kernels, with one the memory-efficient or math kernels.
  triton      ours, `valor_fast.kernels.flash_attention` (CUDA, or the CPU under TRITON_INTERPRET=1).
  math        the eager reference `attention_ref` (any dtype, float64 included).

Choice, per call:
  1. a backend forced in code (`set_backend` / `use_backend`, for tests and benchmarks),
  2. else the env var VALOR_FAST_ATTN=flash_attn|xformers|sdpa|triton|math|auto (read per call),
  3. else auto: CPU tensors -> sdpa (Triton cannot run there; the interpreter is for tests only);
     CUDA fp16/bf16 -> flash_attn when installed and the input fits, else sdpa when there is no
     mask (its flash/cuDNN kernels need none), else triton, else xformers, else sdpa; with a bias
     (Swin windows): triton, else xformers, else sdpa;
     CUDA fp32 / fp64 -> sdpa.  The order is a default to be revised by bench/bench_attention.py.
A forced backend is strict: if it is not available or cannot take the inputs, the call raises
and says why, rather than silently measuring something else.  Availability is probed once and
logged once; each (backend, reason) choice is logged once (valor_fast.ops.backend.BackendSwitch,
shared with the fused and contrastive ops).
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import valor_fast.kernels.flash_attention as _k_fa
from valor_fast.utils import deps

from .backend import BackendSwitch, triton_device_reason

BACKENDS = ("flash_attn", "xformers", "sdpa", "triton", "math")
_ENV = "VALOR_FAST_ATTN"
_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# availability (probed once, at import: the optional imports must not happen inside a
# torch.compile trace)
# ----------------------------------------------------------------------------------------------
def _probe() -> Dict[str, Tuple[bool, str]]:
    avail: Dict[str, Tuple[bool, str]] = {"sdpa": (True, "torch"), "math": (True, "torch")}
    if not deps.HAS_TRITON:
        avail["triton"] = (False, "triton not installed (" + deps.INSTALL_HINTS["triton"] + ")")
    else:
        avail["triton"] = (True, "triton installed (runs on CUDA, or the CPU with TRITON_INTERPRET=1)")
    for name, has, mod in (("flash_attn", deps.HAS_FLASH_ATTN, "flash_attn"),
                           ("xformers", deps.HAS_XFORMERS, "xformers.ops")):
        if not has:
            avail[name] = (False, f"not installed or disabled ({deps.INSTALL_HINTS[name]})")
        elif not torch.cuda.is_available():
            avail[name] = (False, "installed, but no CUDA device")
        else:
            try:  # a wheel built for another torch / CUDA fails here, not at the first step
                __import__(mod)
                avail[name] = (True, "installed")
            except Exception as e:  # noqa: BLE001 - any import failure means unusable
                avail[name] = (False, f"import failed: {type(e).__name__}: {e}")
    return avail


# ----------------------------------------------------------------------------------------------
# validation and choice
# ----------------------------------------------------------------------------------------------
def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                  causal: bool, scale: Optional[float], bias: Optional[Tensor] = None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, L, Dh), got shape {tuple(t.shape)}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"attention: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: "
                         f"k must be (B, H, Lk, Dh) = ({B}, {H}, Lk, {D})")
    if v.shape != k.shape:
        raise ValueError(f"attention: v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v devices differ: q {q.device}, k {k.device}, v {v.device}")
    Lk = k.shape[2]
    if causal and Lq != Lk:
        raise ValueError(f"attention: causal=True needs Lq == Lk, got Lq={Lq} (q) and Lk={Lk} (k)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"attention: key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"attention: key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"attention: key_padding_mask must be (B, Lk) = ({B}, {Lk}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    if bias is not None:
        _k_fa.check_bias(bias, B, H, Lq, Lk, who="attention")
        if bias.device != q.device:
            raise ValueError(f"attention: bias on {bias.device}, q on {q.device}")


def _check(backend: str, q: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
           bias: Optional[Tensor] = None) -> Optional[str]:
    """Input / device reasons `backend` cannot take this call (availability is the probe's)."""
    if bias is not None and backend == "flash_attn":  # first: true wherever flash-attn is installed
        return "an additive attention bias (flash-attn takes none; use triton, xformers or sdpa)"
    dev, dt, d = q.device, q.dtype, q.shape[-1]
    if backend == "triton":
        if triton_device_reason(dev) is not None:
            return triton_device_reason(dev)
        if dt not in (torch.float32,) + _HALF:
            return f"dtype {dt} (fp32/fp16/bf16 only)"
        if d > _k_fa.MAX_HEAD_DIM:
            return f"head dim {d} > {_k_fa.MAX_HEAD_DIM}"
    elif backend == "flash_attn":
        if dev.type != "cuda":
            return f"{dev.type} tensors"
        if dt not in _HALF:
            return f"dtype {dt} (fp16/bf16 only)"
        if d > 256:
            return f"head dim {d} > 256"
        if causal and key_padding_mask is not None:
            return "causal with a key-padding mask (varlen causal aligns bottom-right per sequence)"
    elif backend == "xformers":
        if dev.type != "cuda":
            return f"{dev.type} tensors"
        if dt not in (torch.float32,) + _HALF:
            return f"dtype {dt}"
    return None


def unsupported_reason(backend: str, q: Tensor, key_padding_mask: Optional[Tensor],
                       causal: bool, bias: Optional[Tensor] = None) -> Optional[str]:
    """Why `backend` cannot take these inputs here, or None if it can."""
    return SWITCH.why_not(backend, q=q, key_padding_mask=key_padding_mask, causal=causal, bias=bias)


def _auto(q: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
          bias: Optional[Tensor] = None) -> Tuple[str, str]:
    if q.device.type != "cuda":
        return "sdpa", f"{q.device.type} tensors"
    ok = lambda b: unsupported_reason(b, q, key_padding_mask, causal, bias) is None  # noqa: E731
    if bias is not None:
        # flash-attn takes no bias; SDPA with a float mask leaves its flash / cuDNN kernels, so our
        # kernel (bias tiles loaded next to the scores, never an expanded (B, H, L, L) mask) first
        for b in ("triton", "xformers"):
            if q.dtype in _HALF and ok(b):
                return b, "CUDA fp16/bf16 with an attention bias"
        return "sdpa", f"CUDA {q.dtype} with an attention bias"
    if q.dtype in _HALF:
        if ok("flash_attn"):
            return "flash_attn", "CUDA fp16/bf16"
        if key_padding_mask is None:
            return "sdpa", "CUDA fp16/bf16 without mask (torch flash / cuDNN kernels)"
        for b in ("triton", "xformers"):
            if ok(b):
                return b, "CUDA fp16/bf16 with key-padding mask"
    return "sdpa", f"CUDA {q.dtype}"


SWITCH = BackendSwitch("attention", _ENV, BACKENDS, _probe, _auto, _check)  # probes now, at import
set_backend = SWITCH.set_backend
use_backend = SWITCH.use_backend
get_forced_backend = SWITCH.forced


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """{backend: (usable, why)} as probed at import (device-independent facts only)."""
    return dict(SWITCH.available())


def choose_backend(q: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                   bias: Optional[Tensor] = None) -> str:
    """The backend `attention` would use for these inputs (raises if a forced one cannot)."""
    return SWITCH.choose("attention", q=q, key_padding_mask=key_padding_mask, causal=causal, bias=bias)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def _allowed_and_alive(key_padding_mask: Tensor, causal: bool, lq: int, lk: int) -> Tuple[Tensor, Tensor]:
    """allowed: bool (B, 1, 1|Lq, Lk) True = attend, with rows that have nothing to attend to
    unmasked entirely (finite softmax, no NaN in forward or backward); alive (B, 1, 1|Lq, 1): the
    rows whose output is kept (the others are zeroed)."""
    allowed = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=key_padding_mask.device).tril()
        allowed = allowed & tri  # (B, 1, Lq, Lk)
    alive = allowed.any(dim=-1, keepdim=True)
    return allowed | ~alive, alive


def expand_bias(bias: Tensor, B: int) -> Tensor:
    """(H, Lq, Lk) or (nB, H, Lq, Lk) -> a (B, H, Lq, Lk) view or copy, item b = bias[b % nB]
    (for the backends that take a per-item mask; differentiable)."""
    if bias.dim() == 3:
        return bias.unsqueeze(0).expand(B, *bias.shape)
    nb = bias.shape[0]
    if nb == B:
        return bias
    return bias.unsqueeze(0).expand(B // nb, *bias.shape).reshape(B, *bias.shape[1:])


def _sdpa_bias(q, k, v, key_padding_mask, causal, scale, bias):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if key_padding_mask is None and not causal:
        if bias.dim() == 4 and bias.shape[0] not in (1, B):
            # (B/nB, nB, H, L, Dh) against the (nB, H, L, L) bias: SDPA broadcasts the leading
            # dims, so the bias is never copied out per batch item
            nb = bias.shape[0]
            out = F.scaled_dot_product_attention(*(t.reshape(B // nb, nb, *t.shape[1:]) for t in (q, k, v)),
                                                 attn_mask=bias.to(q.dtype), scale=scale)
            return out.reshape(B, H, Lq, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    kpm = key_padding_mask if key_padding_mask is not None else torch.ones(B, Lk, dtype=torch.bool, device=q.device)
    allowed, alive = _allowed_and_alive(kpm, causal, Lq, Lk)
    mask = expand_bias(bias, B).to(q.dtype).masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(~alive, 0.0)


def _sdpa(q, k, v, key_padding_mask, causal, scale, bias=None):
    if bias is not None:
        return _sdpa_bias(q, k, v, key_padding_mask, causal, scale, bias)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    # SDPA turns a row whose boolean mask is all False into NaN: see _allowed_and_alive
    allowed, alive = _allowed_and_alive(key_padding_mask, causal, q.shape[2], k.shape[2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out.masked_fill(~alive, 0.0)


def _xformers(q, k, v, key_padding_mask, causal, scale, bias=None):
    import xformers.ops as xops

    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, Dh): xformers' layout
    alive = None
    if bias is not None:
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        lk_pad = (Lk + 7) // 8 * 8  # 16-byte aligned rows, as below
        full = torch.zeros((B, H, Lq, lk_pad), dtype=q.dtype, device=q.device)[..., :Lk]
        full = full + expand_bias(bias, B).to(q.dtype)  # differentiable: dbias flows back
        if key_padding_mask is not None or causal:
            kpm = key_padding_mask if key_padding_mask is not None else torch.ones(B, Lk, dtype=torch.bool,
                                                                                    device=q.device)
            allowed, alive = _allowed_and_alive(kpm, causal, Lq, Lk)
            full = full.masked_fill(~allowed, float("-inf"))
        out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=full, scale=scale).transpose(1, 2)
        return out if alive is None else out.masked_fill(~alive, 0.0)
    if key_padding_mask is None:
        bias = xops.LowerTriangularMask() if causal else None
    else:
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        allowed, alive = _allowed_and_alive(key_padding_mask, causal, Lq, Lk)
        # xformers wants the bias' row stride 16-byte aligned: allocate a padded row, slice it
        lk_pad = (Lk + 7) // 8 * 8
        bias = torch.zeros((B, H, Lq, lk_pad), dtype=q.dtype, device=q.device)[..., :Lk]
        bias.masked_fill_(~allowed, float("-inf"))
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=scale).transpose(1, 2)
    return out if alive is None else out.masked_fill(~alive, 0.0)


def _flash_attn(q, k, v, key_padding_mask, causal, scale, bias=None):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    qf, kf, vf = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, Dh): flash-attn's layout
    if key_padding_mask is None:
        return flash_attn_func(qf, kf, vf, softmax_scale=scale, causal=causal).transpose(1, 2)
    # varlen: every query kept (B sequences of Lq), keys gathered to the unpadded ones
    seqlens = key_padding_mask.sum(dim=-1, dtype=torch.int32)  # (B,)
    max_k = int(seqlens.max())  # host sync: the varlen API takes the max length as an int
    if max_k == 0:
        return torch.zeros_like(q) + 0.0 * (q.sum() + k.sum() + v.sum())  # keep the graph connected
    cu_k = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
    idx = key_padding_mask.reshape(-1).nonzero().squeeze(1)  # (nnz,)
    k_un = kf.reshape(B * Lk, H, D).index_select(0, idx)
    v_un = vf.reshape(B * Lk, H, D).index_select(0, idx)
    out = flash_attn_varlen_func(qf.reshape(B * Lq, H, D), k_un, v_un, cu_q, cu_k, Lq, max_k,
                                 softmax_scale=scale, causal=False)
    out = out.view(B, Lq, H, D).transpose(1, 2)
    return out.masked_fill((seqlens == 0)[:, None, None, None], 0.0)


def _triton(q, k, v, key_padding_mask, causal, scale, bias=None):
    return _k_fa.flash_attention(q, k, v, key_padding_mask, causal, scale, bias=bias)


def _math(q, k, v, key_padding_mask, causal, scale, bias=None):
    return _k_fa.attention_ref(q, k, v, key_padding_mask, causal, scale, bias=bias)


_IMPLS = {"flash_attn": _flash_attn, "xformers": _xformers, "sdpa": _sdpa, "triton": _triton,
          "math": _math}


def attention(q, k, v, key_padding_mask=None, causal=False, scale=None, bias=None):
    """softmax(q k^T * scale + bias, masked) v.  q (B, H, Lq, Dh), k/v (B, H, Lk, Dh) -> (B, H, Lq, Dh).

    key_padding_mask (B, Lk) bool, True = attend; causal=True needs Lq == Lk; scale defaults to
    Dh ** -0.5; bias (H, Lq, Lk) or (nB, H, Lq, Lk) with B % nB == 0 (item b uses bias[b % nB]).
    Rows with nothing to attend to give zeros.  The backend is chosen per call (see the module
    docstring); `use_backend(name)` / VALOR_FAST_ATTN force one."""
    causal = bool(causal)
    _check_inputs(q, k, v, key_padding_mask, causal, scale, bias)
    backend = choose_backend(q, key_padding_mask, causal, bias)
    scale = None if scale is None else float(scale)
    if bias is None:
        return _IMPLS[backend](q, k, v, key_padding_mask, causal, scale)
    return _IMPLS[backend](q, k, v, key_padding_mask, causal, scale, bias)


__all__ = ["attention", "expand_bias", "BACKENDS", "available_backends", "choose_backend", "get_forced_backend",
           "set_backend", "use_backend", "unsupported_reason"]

# `valor_fast.ops.attention` is this function (the package re-exports it over the submodule's
# name), so the controls are reachable from it too: valor_fast.ops.attention.use_backend("triton").
attention.use_backend = use_backend
attention.set_backend = set_backend
attention.get_forced_backend = get_forced_backend
attention.choose_backend = choose_backend
attention.available_backends = available_backends
attention.BACKENDS = BACKENDS
