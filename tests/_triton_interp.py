"""Triton's CPU interpreter (TRITON_INTERPRET=1) made to round like the GPU, and cheaper to run.

`install()` patches triton.runtime.interpreter in this process (the patches are no-ops on a
real GPU, where the interpreter is not used):

1. fp32 -> bf16 casts round to nearest even.  The interpreter (triton 3.x) truncates them: a
   kernel's `.to(tl.bfloat16)`, or an fp32 value stored through a bf16 pointer, loses up to one
   bf16 ulp, always towards zero (half of all values differ from torch's cast; mean relative bias
   -2.8e-3 on N(0, 1) data).  On CUDA the same cast is `cvt.rn.bf16.f32`, round to nearest
   even, which is what torch does too.  A bf16 training step checked under the interpreter
   without this would carry a bias no GPU has.  bf16 -> fp32 is exact either way; done here as a
   16-bit shift instead of the interpreter's generic bit-field decoder (same bits, cheaper).
2. A device-function call (a @triton.jit helper called from a kernel, e.g. kernels/_common.mma)
   re-patches the whole triton.language namespace on every call (~5 ms each; a few thousand
   calls a training step), although the launch has already patched the same modules and the
   helper's patch scope is never restored.  Here a helper whose language modules the current
   launch already patched skips it.  Semantics are unchanged; a tiny VALOR step runs ~25% faster.

Returns the names of the patches applied (a triton without the patched functions gets none and
runs as before).
"""
from __future__ import annotations

from typing import List

import numpy as np

_INSTALLED: List[str] = []


def _bf16_bits_rtne(x: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, ((bits >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), rounded)
    return rounded.reshape(np.shape(x))


def _bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(np.shape(b))


def _patch_casts(I) -> bool:
    B = getattr(I, "InterpreterBuilder", None)
    if B is None or not hasattr(B, "cast_impl") or not hasattr(B, "create_fp_to_fp"):
        return False
    tl = I.tl
    orig_cast, orig_fp = B.cast_impl, B.create_fp_to_fp
    rtz = getattr(getattr(I, "_ir", None), "ROUNDING_MODE", None)
    rtz = getattr(rtz, "RTZ", None)

    def convert(src, dst_scalar):
        s = src.dtype.scalar
        if s == tl.float32 and dst_scalar == tl.bfloat16:
            return I.TensorHandle(_bf16_bits_rtne(src.data), tl.bfloat16)
        if s == tl.bfloat16 and dst_scalar == tl.float32:
            return I.TensorHandle(_bf16_bits_to_f32(src.data), tl.float32)
        return None

    def cast_impl(self, src, dst_type):
        out = convert(src, dst_type.scalar)
        return out if out is not None else orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        out = None if (rtz is not None and rounding_mode == rtz) else convert(src, dst_type.scalar)
        return out if out is not None else orig_fp(self, src, dst_type, rounding_mode)

    B.cast_impl, B.create_fp_to_fp = cast_impl, create_fp_to_fp
    return True


def _patch_nested_calls(I) -> bool:
    if not (hasattr(I, "_patch_lang") and hasattr(I, "GridExecutor")):
        return False
    orig_patch, orig_call = I._patch_lang, I.GridExecutor.__call__
    active: List[set] = []   # per running launch: ids of the language modules it has patched

    class _NoScope:
        def restore(self):
            pass

    def patch_lang(fn):
        key = {id(v) for v in fn.__globals__.values() if v is I.tl or v is I.tl.core}
        if active and key <= active[-1]:
            return _NoScope()
        scope = orig_patch(fn)
        if active:
            active[-1] |= key
        return scope

    def call(self, *args, **kwargs):
        active.append(set())
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            active.pop()

    I._patch_lang, I.GridExecutor.__call__ = patch_lang, call
    return True


def install() -> List[str]:
    """Apply the patches once per process; returns the names of those applied."""
    if _INSTALLED:
        return list(_INSTALLED)
    try:
        import triton.runtime.interpreter as I
    except ImportError:
        return []
    if _patch_casts(I):
        _INSTALLED.append("bf16_rtne_casts")
    if _patch_nested_calls(I):
        _INSTALLED.append("nested_call_patch_once")
    if not _INSTALLED:
        _INSTALLED.append("none")
    return list(_INSTALLED)
