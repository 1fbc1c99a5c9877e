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
logged once; each (backend, reason) choice is logged once.
"""
import contextlib
import os
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import valor_fast.kernels.flash_attention as _k_fa
from valor_fast.utils import deps
from valor_fast.utils.log import log_once

BACKENDS = ("flash_attn", "xformers", "sdpa", "triton", "math")
_ENV = "VALOR_FAST_ATTN"
_HALF = (torch.float16, torch.bfloat16)
_forced: Optional[str] = None


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


_AVAILABLE = _probe()


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """{backend: (usable, why)} as probed at import (device-independent facts only)."""
    return dict(_AVAILABLE)


def _log_probe() -> None:
    if torch.compiler.is_compiling():
        return  # logging does not trace; the eager first call logs it
    log_once("attn:probe", "attention backends: " + ", ".join(
        f"{n}={'yes' if ok else 'no'} ({why})" for n, (ok, why) in _AVAILABLE.items()))


# ----------------------------------------------------------------------------------------------
# forcing a backend
# ----------------------------------------------------------------------------------------------
def _validate_name(name: Optional[str], source: str) -> Optional[str]:
    if name is None or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source}: attention backend must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force one attention backend for every call (None or 'auto' = automatic choice)."""
    global _forced
    _forced = _validate_name(name, "set_backend")


def get_forced_backend() -> Optional[str]:
    """The backend forced in code or by VALOR_FAST_ATTN, or None for the automatic choice."""
    if _forced is not None:
        return _forced
    return _validate_name(os.environ.get(_ENV, "").strip().lower() or None, _ENV)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """`with use_backend("triton"): ...` forces a backend inside the block (restored on exit)."""
    global _forced
    prev = _forced
    _forced = _validate_name(name, "use_backend")
    try:
        yield
    finally:
        _forced = prev


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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(backend: str, q: Tensor, key_padding_mask: Optional[Tensor],
                       causal: bool, bias: Optional[Tensor] = None) -> Optional[str]:
    """Why `backend` cannot take these inputs here, or None if it can."""
    if bias is not None and backend == "flash_attn":  # first: true wherever flash-attn is installed
        return "an additive attention bias (flash-attn takes none; use triton, xformers or sdpa)"
    ok, why = _AVAILABLE[backend]
    if not ok:
        return why
    dev, dt, d = q.device, q.dtype, q.shape[-1]
    if backend == "triton":
        if dev.type != "cuda" and not _interpreting():
            return f"{dev.type} tensors: Triton runs on CUDA, or on the CPU only with TRITON_INTERPRET=1"
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


def _log_choice(backend: str, reason: str) -> None:
    if not torch.compiler.is_compiling():
        log_once(f"attn:{backend}:{reason}", f"attention: {backend} backend ({reason})")


def choose_backend(q: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                   bias: Optional[Tensor] = None) -> str:
    """The backend `attention` would use for these inputs (raises if a forced one cannot)."""
    _log_probe()
    forced = get_forced_backend()
    if forced is not None:
        why = unsupported_reason(forced, q, key_padding_mask, causal, bias)
        if why is not None:
            raise RuntimeError(f"attention: backend {forced!r} forced (use_backend / {_ENV}) but "
                               f"unusable: {why}")
        _log_choice(forced, "forced")
        return forced
    if q.device.type != "cuda":
        _log_choice("sdpa", f"auto: {q.device.type} tensors")
        return "sdpa"
    if bias is not None:
        # flash-attn takes no bias; SDPA with a float mask leaves its flash / cuDNN kernels, so our
        # kernel (bias tiles loaded next to the scores, never an expanded (B, H, L, L) mask) first
        for b in ("triton", "xformers"):
            if q.dtype in _HALF and unsupported_reason(b, q, key_padding_mask, causal, bias) is None:
                _log_choice(b, "auto: CUDA fp16/bf16 with an attention bias")
                return b
        _log_choice("sdpa", f"auto: CUDA {q.dtype} with an attention bias")
        return "sdpa"
    if q.dtype in _HALF:
        if unsupported_reason("flash_attn", q, key_padding_mask, causal) is None:
            _log_choice("flash_attn", "auto: CUDA fp16/bf16")
            return "flash_attn"
        if key_padding_mask is None:
            _log_choice("sdpa", "auto: CUDA fp16/bf16 without mask (torch flash / cuDNN kernels)")
            return "sdpa"
        for b in ("triton", "xformers"):
            if unsupported_reason(b, q, key_padding_mask, causal) is None:
                _log_choice(b, "auto: CUDA fp16/bf16 with key-padding mask")
                return b
    _log_choice("sdpa", f"auto: CUDA {q.dtype}")
    return "sdpa"


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
