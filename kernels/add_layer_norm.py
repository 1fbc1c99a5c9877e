"""Fused residual add + LayerNorm: `out = LayerNorm(x + residual)`, also returning `x + residual`.

Post-LN BERT blocks and pre-LN ViT blocks both need the sum twice (as the next residual and as the
LayerNorm input); fusing saves one read and one write of the (rows, width) activation in the
forward and the separate add/LN passes in the backward.

Contents: `add_layer_norm_ref` (plain torch, any dtype incl. float64), the Triton forward and
backward kernels, `add_layer_norm_configs` (launch configurations per width, dtype and architecture: the
launchers autotune over them, bench/audit_fused.py compiles each for sm_80 / sm_90a), the
launchers, the custom ops `valor_fast::add_layer_norm_fwd` / `_bwd` (fake
impls + register_autograd: the one autograd path, eager and under torch.compile, which traces them
as opaque nodes) and the functional entry point `add_layer_norm`.

Numerics: the sum is rounded to the new_residual storage dtype before the statistics are taken, so
the forward, the backward and the returned new_residual all see the same values (eager semantics);
mean / rstd and all reductions are fp32; I/O may be fp32, fp16 or bf16, and residual may be kept in
a wider dtype than x (e.g. an fp32 residual stream with bf16 activations).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._compat import tl, triton  # noqa: F401  (no-op stand-ins without triton)
from ._launch import Launch, LaunchConfig, config, launch_arch, unique

MAX_WIDTH = 8192  # one row per program: wider rows would need a split-row (two-pass) kernel


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def add_layer_norm_ref(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Eager PyTorch: (LayerNorm(x + residual), x + residual).  Works in any dtype (float64 for the
    ground truth); the sum is in residual's dtype, the LN output in x's dtype."""
    s = x if residual is None else x.to(residual.dtype) + residual
    w = None if weight is None else weight.to(s.dtype)
    b = None if bias is None else bias.to(s.dtype)
    out = F.layer_norm(s, (s.shape[-1],), w, b, eps).to(x.dtype)
    return out, s


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _add_ln_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd,  # X/Y (M, N); R/S (M, N) or dummies; W/B (N,); Mean/Rstd (M,) fp32
    stride_x, stride_r, stride_y, stride_s, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):
    # One row per program; int64 row offsets so M * stride can pass 2**31 (64*257*4 rows x 1024).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to its storage dtype before the statistics: the backward recomputes x_hat
        # from the stored new_residual, and must see exactly what the forward normalised.
        x = (x + r).to(S.dtype.element_ty).to(tl.float32)
        tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)  # masked lanes must not enter the variance
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_ln_bwd_kernel(
    S, W, DY, DSO, DX, Mean, Rstd, DW, DB,  # S/DY/DSO/DX (M, N); DW/DB (P, N) fp32 partial sums
    stride_s, stride_dy, stride_dso, stride_dx, M, N, rows_per_prog,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DSO: tl.constexpr, BLOCK: tl.constexpr,
):
    # Each program walks `rows_per_prog` consecutive rows and keeps its own dweight/dbias partial
    # sums in registers: one (P, N) fp32 write per program instead of an atomic per row.
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    # pointer bumping (not row * stride) keeps the loop variable free of 64-bit casts
    S += row_start * stride_s
    DY += row_start * stride_dy
    DX += row_start * stride_dx
    if HAS_DSO:
        DSO += row_start * stride_dso
    for row in range(row_start, row_end):
        s = tl.load(S + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        if HAS_W:
            wdy = w * dy
            dw += dy * xhat
        else:
            wdy = dy
        if HAS_B:
            db += dy
        # d x_hat -> d s through mean and rstd: (wdy - mean(wdy) - x_hat * mean(wdy * x_hat)) * rstd
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        ds = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DSO:
            # the gradient that reached new_residual directly (post-LN BERT reuses it)
            ds += tl.load(DSO + cols, mask=mask, other=0.0).to(tl.float32)
            DSO += stride_dso
        tl.store(DX + cols, ds.to(DX.dtype.element_ty), mask=mask)
        S += stride_s
        DY += stride_dy
        DX += stride_dx
    if HAS_W:
        tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB + pid * N + cols, db, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _rows(t: Tensor, n: int) -> Tensor:
    """(..., N) -> (M, N) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor]) -> int:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"add_layer_norm: x must be (..., N) with N > 0, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if n > MAX_WIDTH:
        raise ValueError(f"add_layer_norm (Triton): row width {n} > {MAX_WIDTH}; use the torch backend")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"add_layer_norm (Triton): x dtype {x.dtype} not in fp32/fp16/bf16")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"add_layer_norm: {name} must be ({n},), got {tuple(p.shape)}")
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"add_layer_norm: {name} on {t.device}, x on {x.device}")
    return n


def add_layer_norm_configs(N: int, dtype: torch.dtype, cc: Optional[int] = None,
                           kernel: str = "fwd") -> Tuple[LaunchConfig, ...]:
    """Launch configurations (num_warps, num_stages; the row tile BLOCK is next_pow2(N), not
    tuned) of the forward ("fwd") or backward ("bwd") kernel for rows of width N on compute
    capability cc (None: the interpreter).  First the default: ~8 fp32 elements per thread
    (4 warps at 768 / 1024 wide rows), capped at 16 warps for 8k rows (register pressure); the
    autotuner also tries twice and half the warps.  The backward loops over rows, so its
    software pipelining depth (num_stages) is a choice too.  dtype: part of the contract (a
    future 16-bit-specific set), unused today."""
    if kernel not in ("fwd", "bwd"):
        raise ValueError(f"add_layer_norm_configs: kernel must be 'fwd' or 'bwd', got {kernel!r}")
    base = min(max(triton.next_power_of_2(N) // 256, 1), 16)
    stages = 1 if kernel == "fwd" else 2
    if cc is None:
        return (config(base, stages),)
    out = [config(base, stages), config(min(2 * base, 16), stages), config(max(base // 2, 1), stages)]
    if kernel == "bwd":
        out.append(config(base, 3))
    return unique(out)


def _fwd_plan(x2: Tensor, r2: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], y: Tensor, s: Tensor,
              mean: Tensor, rstd: Tensor, eps: float, has_res: bool, cc: Optional[int]) -> Launch:
    """The forward launch over the (M, N) rows of x2 (r2 / s: dummies when not has_res)."""
    m, n = x2.shape
    args = (x2, r2, weight if weight is not None else x2, bias if bias is not None else x2, y, s, mean, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), n, float(eps))
    cex = dict(HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=triton.next_power_of_2(n))
    return Launch(_add_ln_fwd_kernel, lambda meta: (m,), args, cex, add_layer_norm_configs(n, x2.dtype, cc, "fwd"),
                  key=("N", "HAS_RES", "HAS_W", "HAS_B"), label="add_layer_norm fwd")


def add_layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float):
    """Launch the forward.  Returns (out, new_residual or an empty tensor when residual is None,
    mean (M,) fp32, rstd (M,) fp32); out has x's shape and dtype."""
    n = _check(x, residual, weight, bias)
    x2 = _rows(x, n)  # (M, N)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = _rows(residual, n)
        s = torch.empty((m, n), dtype=residual.dtype, device=x.device)
    else:
        r2 = s = x2  # dummies, never touched (HAS_RES=False)
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m > 0:
        _fwd_plan(x2, r2, weight, bias, y, s, mean, rstd, eps, residual is not None, launch_arch(x.device)).run()
    s_out = s.view(x.shape) if residual is not None else x.new_empty((0,))
    return y.view(x.shape), s_out, mean, rstd


def _bwd_programs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(m, sms * 4))  # a few resident programs per SM; P*N fp32 partials are tiny
    return max(1, min(m, 4))  # CPU interpreter: few programs, each a Python loop over rows


def _bwd_plan(s2: Tensor, weight: Optional[Tensor], dy2: Tensor, dso2: Tensor, dx: Tensor, mean: Tensor,
              rstd: Tensor, dw_part: Tensor, db_part: Tensor, p: int, has_bias: bool, has_dso: bool,
              cc: Optional[int]) -> Launch:
    """The backward launch: p programs, each over cdiv(M, p) consecutive rows."""
    m, n = s2.shape
    has_w = weight is not None
    args = (s2, weight if has_w else s2, dy2, dso2, dx, mean, rstd, dw_part if has_w else dx,
            db_part if has_bias else dx, s2.stride(0), dy2.stride(0), dso2.stride(0), dx.stride(0), m, n,
            triton.cdiv(m, p))
    cex = dict(HAS_W=has_w, HAS_B=has_bias, HAS_DSO=has_dso, BLOCK=triton.next_power_of_2(n))
    return Launch(_add_ln_bwd_kernel, lambda meta: (p,), args, cex, add_layer_norm_configs(n, s2.dtype, cc, "bwd"),
                  key=("N", "HAS_W", "HAS_B", "HAS_DSO"), label="add_layer_norm bwd")


def add_layer_norm_bwd(dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                       dres_out: Optional[Tensor], has_bias: bool, dx_dtype: torch.dtype):
    """Launch the backward.  `s` is the LayerNorm input (new_residual, or x without residual);
    `dres_out` the gradient that reached new_residual directly.  Returns (ds (in dx_dtype, shape of
    s) = dx = dresidual up to dtype, dweight or empty, dbias or empty)."""
    n = s.shape[-1]
    s2 = _rows(s, n)
    dy2 = _rows(dy, n)
    m = s2.shape[0]
    dx = torch.empty((m, n), dtype=dx_dtype, device=s.device)
    dso2 = _rows(dres_out, n) if dres_out is not None else dy2
    p = _bwd_programs(m, s.device)
    has_w = weight is not None
    dw_part = torch.empty((p, n) if has_w else (0,), dtype=torch.float32, device=s.device)
    db_part = torch.empty((p, n) if has_bias else (0,), dtype=torch.float32, device=s.device)
    if m > 0:
        _bwd_plan(s2, weight, dy2, dso2, dx, mean, rstd, dw_part, db_part, p, has_bias, dres_out is not None,
                  launch_arch(s.device)).run()
    else:
        dw_part.zero_()
        db_part.zero_()
    dw = dw_part.sum(0).to(weight.dtype) if has_w else s.new_empty((0,))
    db = db_part.sum(0) if has_bias else s.new_empty((0,))
    return dx.view(s.shape), dw, db


# ----------------------------------------------------------------------------------------------
# custom ops + autograd (the one path, eager and torch.compile: opaque nodes with fake impls)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("valor_fast::add_layer_norm_fwd", mutates_args=())
def _add_ln_fwd_op(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return add_layer_norm_fwd(x, residual, weight, bias, eps)


@_add_ln_fwd_op.register_fake
def _(x, residual, weight, bias, eps):
    m = x.numel() // x.shape[-1]
    s = torch.empty_like(residual) if residual is not None else x.new_empty((0,))
    stats = x.new_empty((m,), dtype=torch.float32)
    return torch.empty_like(x), s, stats, stats.clone()


@torch.library.custom_op("valor_fast::add_layer_norm_bwd", mutates_args=())
def _add_ln_bwd_op(dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   dres_out: Optional[Tensor], has_bias: bool,
                   dx_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    return add_layer_norm_bwd(dy, s, weight, mean, rstd, dres_out, has_bias, dx_dtype)


@_add_ln_bwd_op.register_fake
def _(dy, s, weight, mean, rstd, dres_out, has_bias, dx_dtype):
    n = s.shape[-1]
    dw = s.new_empty((n,), dtype=weight.dtype) if weight is not None else s.new_empty((0,))
    db = s.new_empty((n,), dtype=torch.float32) if has_bias else s.new_empty((0,))
    return torch.empty_like(s, dtype=dx_dtype), dw, db


def _add_ln_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, s, mean, rstd = output
    has_res = residual is not None
    ctx.save_for_backward(s if has_res else x, weight, mean, rstd)
    ctx.has_res, ctx.has_bias = has_res, bias is not None
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if has_res else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _add_ln_backward(ctx, dout, ds_out, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dso = ds_out if ctx.has_res else None
    dx, dw, db = _add_ln_bwd_op(dout, s, weight, mean, rstd, dso, ctx.has_bias, ctx.x_dtype)
    dres = dx.to(ctx.res_dtype) if ctx.has_res else None
    return (dx, dres, dw if weight is not None else None,
            db.to(ctx.bias_dtype) if ctx.has_bias else None, None)


_add_ln_fwd_op.register_autograd(_add_ln_backward, setup_context=_add_ln_setup_context)


# ----------------------------------------------------------------------------------------------
# functional entry point
# ----------------------------------------------------------------------------------------------
def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Triton add + LayerNorm over the last dim.  Returns (out, new_residual); without a residual,
    new_residual is x itself (so a gradient into it reaches x through ordinary autograd)."""
    out, s, _, _ = _add_ln_fwd_op(x, residual, weight, bias, float(eps))
    return out, (s if residual is not None else x)
