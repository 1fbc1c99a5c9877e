"""The contrastive custom ops, built once per kernel backend from one backend-neutral factory.

A kernel backend is a module with four launchers of the same signatures (see
valor_fast.kernels.contrastive's docstring): `coarse_lse`, `coarse_grad`, `fine_fwd`, `fine_bwd`.
valor_fast.kernels.contrastive (Triton) and valor_fast.ops._cuda (CUDA C++, ctypes) are the two.
This module composes them into the coarse loss (two log-sum-exp passes forward; two gradient
passes square, four local, backward) and registers, per backend,

    valor_fast::{prefix}contrastive_coarse_fwd / _bwd   (text, modal, temperature, text_cols,
        modal_cols, offset, valid, valid_cols) -> (sum of the per-row cross-entropies, lse_t, lse_m)
    valor_fast::{prefix}fine_sim_fwd / _bwd             (text, wt, tmask, x, y, mw, mmask, tfloor)
        -> S (G, Bt, Bm); tfloor: None or the (Bt,) text_floor mask (upstream's padded max)

with fake impls and register_autograd: the one autograd path, eager and under torch.compile.  The
coarse op returns the *sum* over the valid rows of both directions' cross-entropies; the caller
divides (by 2B, or by 2 n_valid, scaled for the local loss), so masking and normalisation stay in
differentiable torch and the kernels' C ABI needs no sample count.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

import valor_fast.kernels.contrastive as kc


# ---- composition over a backend's launchers --------------------------------------------------

def coarse_fwd(kern: ModuleType, text: Tensor, modal: Tensor, temperature: Tensor, text_cols: Optional[Tensor],
               modal_cols: Optional[Tensor], offset: int, valid: Optional[Tensor],
               valid_cols: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (sum over valid rows of ce_text + ce_modal () fp32, lse_t (B,), lse_m (B,)).  Square
    (cols None): B x B, labels on the diagonal.  Local: rows (B, D) vs cols (N, D), the label of
    row i is column offset + i; valid (B,) masks the rows, valid_cols (N,) the columns."""
    kc.check_coarse_args(text, modal, temperature, text_cols, modal_cols, offset, valid, valid_cols)
    text, modal = text.contiguous(), modal.contiguous()
    temp = temperature.detach().reshape(1).contiguous()
    mc = modal if modal_cols is None else modal_cols.contiguous()
    tc = text if text_cols is None else text_cols.contiguous()
    vc = valid if text_cols is None else valid_cols
    lse_t, zl_t = kern.coarse_lse(text, mc, temp, offset, vc)  # text row i vs all modal columns
    lse_m, zl_m = kern.coarse_lse(modal, tc, temp, offset, vc)  # modal row j vs all text columns
    ce_t, ce_m = lse_t - zl_t, lse_m - zl_m
    if valid is not None:  # excluded rows may hold lse = +inf: select, never multiply
        ce_t = torch.where(valid, ce_t, torch.zeros_like(ce_t))
        ce_m = torch.where(valid, ce_m, torch.zeros_like(ce_m))
    return ce_t.sum() + ce_m.sum(), lse_t, lse_m


def coarse_bwd(kern: ModuleType, g: Tensor, text: Tensor, modal: Tensor, temperature: Tensor,
               text_cols: Optional[Tensor], modal_cols: Optional[Tensor], offset: int, valid: Optional[Tensor],
               valid_cols: Optional[Tensor], lse_t: Tensor, lse_m: Tensor):
    """-> (d_text, d_modal, d_temperature, d_text_cols, d_modal_cols); the cols grads are empty
    (0,) tensors in the square case."""
    text, modal = text.contiguous(), modal.contiguous()
    temp = temperature.detach().reshape(1).contiguous().float()
    scale = (g.float().reshape(1) / temp).contiguous()  # (1,): dz/dfeature carries 1/tau
    if text_cols is None:
        # P_ij = p_row + p_col - 2 delta_ij, once per side (roles swapped for modal)
        d_text, ts = kern.coarse_grad(text, modal, temp, scale, lse_t, lse_m, 0, 2.0, True, valid, valid)
        d_modal, _ = kern.coarse_grad(modal, text, temp, scale, lse_m, lse_t, 0, 2.0, False, valid, valid)
        tsum = ts.sum()
        d_tc, d_mc = text.new_empty((0,)), text.new_empty((0,))  # distinct: custom ops forbid aliased outputs
    else:
        tc, mc, vc = text_cols.contiguous(), modal_cols.contiguous(), valid_cols
        # term 1: text rows vs modal columns; term 2: modal rows vs text columns
        d_text, ts1 = kern.coarse_grad(text, mc, temp, scale, lse_t, None, offset, 1.0, True, valid, vc)
        d_mc, _ = kern.coarse_grad(mc, text, temp, scale, None, lse_t, -offset, 1.0, False, vc, valid)
        d_modal, ts2 = kern.coarse_grad(modal, tc, temp, scale, lse_m, None, offset, 1.0, True, valid, vc)
        d_tc, _ = kern.coarse_grad(tc, modal, temp, scale, None, lse_m, -offset, 1.0, False, vc, valid)
        tsum = ts1.sum() + ts2.sum()
    # z = S / tau: dL/dtau = -(1/tau) sum dL/dz * z
    d_temp = (-(scale * tsum)).to(temperature.dtype).reshape(temperature.shape)
    return d_text, d_modal, d_temp, d_tc, d_mc


# ---- custom-op registration ------------------------------------------------------------------

def _register_coarse(prefix: str, kern: ModuleType):
    @torch.library.custom_op(f"valor_fast::{prefix}contrastive_coarse_fwd", mutates_args=())
    def fwd(text: Tensor, modal: Tensor, temperature: Tensor, text_cols: Optional[Tensor],
            modal_cols: Optional[Tensor], offset: int, valid: Optional[Tensor],
            valid_cols: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        return coarse_fwd(kern, text, modal, temperature, text_cols, modal_cols, offset, valid, valid_cols)

    @fwd.register_fake
    def _(text, modal, temperature, text_cols, modal_cols, offset, valid, valid_cols):
        B = text.shape[0]
        f = dict(dtype=torch.float32, device=text.device)
        return text.new_empty((), **f), text.new_empty((B,), **f), text.new_empty((B,), **f)

    @torch.library.custom_op(f"valor_fast::{prefix}contrastive_coarse_bwd", mutates_args=())
    def bwd(g: Tensor, text: Tensor, modal: Tensor, temperature: Tensor, text_cols: Optional[Tensor],
            modal_cols: Optional[Tensor], offset: int, valid: Optional[Tensor], valid_cols: Optional[Tensor],
            lse_t: Tensor, lse_m: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return coarse_bwd(kern, g, text, modal, temperature, text_cols, modal_cols, offset, valid, valid_cols,
                          lse_t, lse_m)

    @bwd.register_fake
    def _(g, text, modal, temperature, text_cols, modal_cols, offset, valid, valid_cols, lse_t, lse_m):
        return (torch.empty_like(text), torch.empty_like(modal), torch.empty_like(temperature),
                text.new_empty((0,)) if text_cols is None else torch.empty_like(text_cols),
                text.new_empty((0,)) if modal_cols is None else torch.empty_like(modal_cols))

    def setup(ctx, inputs, output):
        text, modal, temperature, text_cols, modal_cols, offset, valid, valid_cols = inputs
        ctx.offset = offset
        ctx.local = text_cols is not None
        ctx.save_for_backward(text, modal, temperature, text_cols, modal_cols, valid, valid_cols, *output[1:])

    def backward(ctx, g, _g_lse_t, _g_lse_m):
        text, modal, temperature, text_cols, modal_cols, valid, valid_cols, lse_t, lse_m = ctx.saved_tensors
        d_t, d_m, d_temp, d_tc, d_mc = bwd(g, text, modal, temperature, text_cols, modal_cols, ctx.offset,
                                           valid, valid_cols, lse_t, lse_m)
        if not ctx.local:
            d_tc = d_mc = None
        return d_t, d_m, d_temp, d_tc, d_mc, None, None, None

    fwd.register_autograd(backward, setup_context=setup)
    return fwd


def _register_fine(prefix: str, kern: ModuleType):
    @torch.library.custom_op(f"valor_fast::{prefix}fine_sim_fwd", mutates_args=())
    def fwd(text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor], mw: Tensor,
            mmask: Tensor, tfloor: Optional[Tensor] = None) -> Tensor:
        return kern.fine_fwd(*kc.prepare_fine_args(text, wt, tmask, x, y, mw, mmask, tfloor))

    @fwd.register_fake
    def _(text, wt, tmask, x, y, mw, mmask, tfloor=None):
        return text.new_empty((mw.shape[0], text.shape[0], x.shape[0]), dtype=torch.float32)

    @torch.library.custom_op(f"valor_fast::{prefix}fine_sim_bwd", mutates_args=())
    def bwd(dS: Tensor, text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor],
            mw: Tensor, mmask: Tensor, tfloor: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return kern.fine_bwd(dS, *kc.prepare_fine_args(text, wt, tmask, x, y, mw, mmask, tfloor))

    @bwd.register_fake
    def _(dS, text, wt, tmask, x, y, mw, mmask, tfloor=None):
        f32 = dict(dtype=torch.float32)
        return (torch.empty_like(text), text.new_empty(tuple(wt.shape), **f32), torch.empty_like(x),
                text.new_empty((0,)) if y is None else torch.empty_like(y), text.new_empty(tuple(mw.shape), **f32))

    def setup(ctx, inputs, output):
        text, wt, tmask, x, y, mw, mmask, tfloor = inputs
        ctx.has_y = y is not None
        ctx.save_for_backward(text, wt, tmask, x, y, mw, mmask, tfloor)

    def backward(ctx, dS):
        text, wt, tmask, x, y, mw, mmask, tfloor = ctx.saved_tensors
        d_text, g_wt, d_x, d_y, g_mw = bwd(dS, text, wt, tmask, x, y, mw, mmask, tfloor)
        return (d_text, g_wt.to(wt.dtype), None, d_x, d_y if ctx.has_y else None, g_mw.to(mw.dtype), None, None)

    fwd.register_autograd(backward, setup_context=setup)
    return fwd


def _same_dtype(*xs):
    dts = [x.dtype for x in xs if x is not None]
    dt = dts[0]
    for d in dts[1:]:
        dt = torch.promote_types(dt, d)
    return [None if x is None else x.to(dt) for x in xs]


class ContrastiveOps:
    """The custom ops of one kernel backend and their differentiable entry points."""

    def __init__(self, prefix: str, kern: ModuleType):
        self.prefix = prefix
        self.coarse_fwd = _register_coarse(prefix, kern)
        self.fine_fwd = _register_fine(prefix, kern)

    def coarse_sum(self, text: Tensor, modal: Tensor, temperature: Tensor, text_cols: Optional[Tensor] = None,
                   modal_cols: Optional[Tensor] = None, offset: int = 0, valid: Optional[Tensor] = None,
                   valid_cols: Optional[Tensor] = None) -> Tensor:
        """() fp32: the sum over the valid rows of both directions' cross-entropies (divide by 2B
        for the mean InfoNCE), differentiable in the features and the temperature."""
        text, modal, text_cols, modal_cols = _same_dtype(text, modal, text_cols, modal_cols)
        return self.coarse_fwd(text, modal, temperature, text_cols, modal_cols, int(offset), valid, valid_cols)[0]

    def fine_sim_groups(self, text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor],
                        mw: Tensor, mmask: Tensor, tfloor: Optional[Tensor] = None) -> Tensor:
        """Differentiable (G, Bt, Bm) similarity; see valor_fast.kernels.contrastive.fine_fwd
        (tfloor: the (Bt,) text_floor mask or None)."""
        text, x, y = _same_dtype(text, x, y)
        return self.fine_fwd(text, wt, tmask, x, y, mw, mmask, tfloor)


def make_ops(prefix: str, kern: ModuleType) -> ContrastiveOps:
    """Register valor_fast::{prefix}contrastive_coarse_fwd/_bwd and {prefix}fine_sim_fwd/_bwd over
    the launchers of `kern` (prefix "" for Triton, "cuda_" for CUDA C++)."""
    return ContrastiveOps(prefix, kern)
