"""CUDA C++ backend of the contrastive ops: ctypes bindings to libvalor_fast_cuda.so (csrc/).

The library is plain CUDA with a C ABI (the CPU torch wheel has no CUDA headers, so no torch C++
extension): raw device pointers, sizes and the current stream go in, a cudaError_t comes out.
Found lazily, first hit wins:
  1. $VALOR_FAST_CUDA_LIB (a path to the .so),
  2. valor_fast/_lib/libvalor_fast_cuda.so (built by setup.py through csrc/build.py).
`available()` also needs torch.cuda and a working runtime/driver pair (`vf_probe`).

This module is a kernel backend in the sense of valor_fast.ops.contrastive_op: the four launchers
`coarse_lse`, `coarse_grad`, `fine_fwd`, `fine_bwd` of valor_fast.kernels.contrastive, same
signatures, over the C functions; the composition (LSE / gradient passes, custom ops + autograd)
is that module's, registered as valor_fast::cuda_contrastive_coarse_fwd/_bwd and
valor_fast::cuda_fine_sim_fwd/_bwd.  The C limits are the kernel module's (MAX_T, MAX_SLOTS...).
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

LIB_NAME = "libvalor_fast_cuda.so"
_ENV = "VALOR_FAST_CUDA_LIB"
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_lock = threading.Lock()
_state = {"lib": None, "why": None, "tried": False}


def _candidates():
    env = os.environ.get(_ENV)
    if env:
        yield env
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # valor_fast/
    yield os.path.join(here, "_lib", LIB_NAME)


def _bind(lib: ctypes.CDLL) -> None:
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.vf_version.restype = I
    lib.vf_probe.restype = I
    lib.vf_error_string.restype = ctypes.c_char_p
    lib.vf_error_string.argtypes = [I]
    lib.vf_coarse_lse.restype = I
    lib.vf_coarse_lse.argtypes = [I, P, P, P, P, P, I64, I64, I64, I64, P]
    lib.vf_coarse_grad.restype = I
    lib.vf_coarse_grad.argtypes = [I, P, P, P, P, P, P, P, P, I64, I64, I64, I64, F, P]
    lib.vf_fine_fwd.restype = I
    lib.vf_fine_fwd.argtypes = [I, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, I64, I, P]
    lib.vf_fine_bwd.restype = I
    lib.vf_fine_bwd.argtypes = [I, P, P, P, P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, I64, I, P]


def _load() -> Optional[ctypes.CDLL]:
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        _state["tried"] = True
        if not torch.cuda.is_available():
            _state["why"] = "torch.cuda is not available"
            return None
        errors = []
        for path in _candidates():
            if not os.path.exists(path):
                errors.append(f"{path}: not found")
                continue
            try:
                lib = ctypes.CDLL(path)
                _bind(lib)
                rc = lib.vf_probe()
                if rc != 0:
                    errors.append(f"{path}: CUDA runtime probe failed: {lib.vf_error_string(rc).decode()}")
                    continue
            except (OSError, AttributeError) as e:
                errors.append(f"{path}: {e}")
                continue
            _state["lib"] = lib
            return lib
        _state["why"] = ("libvalor_fast_cuda.so not usable (" + "; ".join(errors) +
                         f"); build it with `python csrc/build.py --out valor_fast/_lib` or set ${_ENV}")
        return None


def available() -> bool:
    return _load() is not None


def why_unavailable() -> str:
    _load()
    return _state["why"] or "available"


def _lib() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CUDA contrastive backend unavailable: {why_unavailable()}")
    return lib


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"valor_fast CUDA {what} failed: {_lib().vf_error_string(rc).decode()} (code {rc})")


def _require_cuda(*ts: Optional[Tensor]) -> None:
    for t in ts:
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"CUDA contrastive backend needs CUDA tensors, got one on {t.device}")


# ---- the launcher API of valor_fast.kernels.contrastive (same names and signatures) ----------
# Arguments arrive validated and laid out by valor_fast.ops.contrastive_op (contiguous features,
# fp32 weights, uint8 masks); the C kernels take no sample masks, so the dispatcher sends
# valid-masked coarse calls to Triton or torch (the fine masks act on S, in torch).

def _no_masks(*masks: Optional[Tensor]) -> None:
    if any(m is not None for m in masks):
        raise ValueError("CUDA C++ contrastive kernels take no valid masks (the dispatcher routes masked "
                         "coarse calls to triton or torch)")


def coarse_lse(a: Tensor, b: Tensor, temp: Tensor, lab_off: int = 0,
               valid_b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    _no_masks(valid_b)
    _require_cuda(a, b, temp)
    Ra, D = a.shape
    lse = torch.empty(Ra, dtype=torch.float32, device=a.device)
    zl = torch.empty(Ra, dtype=torch.float32, device=a.device)
    t = temp.float().contiguous()
    _check(_lib().vf_coarse_lse(_DTYPE_CODE[a.dtype], _ptr(a), _ptr(b), _ptr(t), _ptr(lse), _ptr(zl),
                                Ra, b.shape[0], D, lab_off, _stream(a)), "coarse lse")
    return lse, zl


def coarse_grad(a: Tensor, b: Tensor, temp: Tensor, scale: Tensor, lse_a: Optional[Tensor],
                lse_b: Optional[Tensor], lab_off: int, lab_coef: float, tsum: bool,
                valid_a: Optional[Tensor] = None, valid_b: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
    _no_masks(valid_a, valid_b)
    Ra, D = a.shape
    da = torch.empty_like(a)
    ts = torch.empty(Ra, dtype=torch.float32, device=a.device) if tsum else None
    t = temp.float().contiguous()
    _check(_lib().vf_coarse_grad(_DTYPE_CODE[a.dtype], _ptr(a), _ptr(b), _ptr(t), _ptr(scale), _ptr(lse_a),
                                 _ptr(lse_b), _ptr(da), _ptr(ts), Ra, b.shape[0], D, lab_off, float(lab_coef),
                                 _stream(a)), "coarse grad")
    return da, ts


def fine_fwd(text, wt, tmask, x, y, mw, mmask):
    has_y = y is not None
    _require_cuda(text, x)
    Bt, T, D = text.shape
    Bm, Mx, _ = x.shape
    My = y.shape[1] if has_y else 0
    G = mw.shape[0]
    S = torch.empty((G, Bt, Bm), dtype=torch.float32, device=text.device)
    _check(_lib().vf_fine_fwd(_DTYPE_CODE[text.dtype], _ptr(text), _ptr(wt), _ptr(tmask), _ptr(x),
                              _ptr(y) if has_y else None, _ptr(mw), _ptr(mmask), _ptr(S), Bt, Bm, T, Mx, My, D, G,
                              _stream(text)), "fine forward")
    return S


def fine_bwd(dS, text, wt, tmask, x, y, mw, mmask):
    has_y = y is not None
    _require_cuda(text, x)
    dS = dS.float().contiguous()
    Bt, T, D = text.shape
    Bm, Mx, _ = x.shape
    My = y.shape[1] if has_y else 0
    G = mw.shape[0]
    d_text = torch.empty_like(text)
    g_wt = torch.empty((Bt, T), dtype=torch.float32, device=text.device)
    d_x = torch.empty_like(x)
    d_y = torch.empty_like(y) if has_y else text.new_empty((0,))
    g_mw = torch.zeros((G, Bm, Mx + My), dtype=torch.float32, device=text.device)
    if Bt == 0 or Bm == 0:
        return d_text.zero_(), g_wt.zero_(), d_x.zero_(), d_y.zero_(), g_mw
    _check(_lib().vf_fine_bwd(_DTYPE_CODE[text.dtype], _ptr(dS), _ptr(text), _ptr(wt), _ptr(tmask), _ptr(x),
                              _ptr(y) if has_y else None, _ptr(mw), _ptr(mmask), _ptr(d_text), _ptr(g_wt),
                              _ptr(d_x), _ptr(d_y) if has_y else None, _ptr(g_mw), Bt, Bm, T, Mx, My, D, G,
                              _stream(text)), "fine backward")
    return d_text, g_wt, d_x, d_y, g_mw
