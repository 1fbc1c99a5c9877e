"""Fused bias + GELU: `y = gelu(x + bias)` (exact erf GELU as BERT uses, the tanh approximation, or
CLIP's quick GELU `z * sigmoid(1.702 z)`).

The FFN up-projection output (rows, 3072/4096) is the largest activation of a transformer block;
unfused, bias-add and GELU each read and write it (and the backward reads it again twice).  Here
the forward reads x once and writes y once, and the backward reads x and dy once, writes dx once and
reduces dbias in the same pass.  The pre-activation `x + bias` is recomputed in fp32, never stored.

Contents: `bias_gelu_ref` (plain torch, any dtype incl. float64), the Triton forward and backward
kernels, `bias_gelu_configs` (launch configurations per width, dtype and architecture: the
launchers autotune over them, bench/audit_fused.py compiles each for sm_80 / sm_90a), the
launchers, the custom ops `valor_fast::bias_gelu_fwd` / `_bwd` (fake impls +
register_autograd: the one autograd path, eager and under torch.compile) and the functional entry
points `bias_gelu` and `quick_gelu`.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._compat import tl, triton  # noqa: F401  (no-op stand-ins without triton)
from ._launch import Launch, LaunchConfig, config, launch_arch, unique

# activation codes (a constexpr in the kernels, so each variant compiles to its own straight code)
_ACTS = {"none": 0, "tanh": 1, "quick": 2}


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def bias_gelu_ref(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """Eager PyTorch; works in any dtype (float64 for the ground truth).  approximate is "none"
    (erf), "tanh" or "quick" (x * sigmoid(1.702 x))."""
    z = x if bias is None else x + bias.to(x.dtype)
    if approximate == "quick":
        return z * torch.sigmoid(1.702 * z)
    return F.gelu(z, approximate=approximate)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gelu_and_grad(z, ACT: tl.constexpr):
    """fp32 z -> (gelu(z), d gelu / dz); the compiler drops whichever half the caller ignores."""
    if ACT == 0:  # exact: z * Phi(z)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        y = z * cdf
        dydz = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)  # + z * phi(z)
    elif ACT == 1:  # tanh approximation, written with sigmoids (no tanh in tl core):
        # 1 + tanh(u) = 2 sig(2u) and 1 - tanh(u)^2 = 4 sig(2u) sig(-2u); taking sig(-2u) directly
        # (not 1 - sig(2u)) keeps the derivative's tail accurate where tanh(u) -> +-1.  The
        # argument is clamped to +-80 so exp never overflows (sig(80) == 1 in fp32 anyway).
        u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)  # 2u
        u2 = tl.minimum(tl.maximum(u2, -80.0), 80.0)
        sp = tl.sigmoid(u2)
        sn = tl.sigmoid(-u2)
        y = z * sp
        dydz = sp + 2.0 * z * sp * sn * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:  # quick GELU (CLIP); 1 - sig(a) taken as sig(-a) for the same reason, a clamped likewise
        a = tl.minimum(tl.maximum(1.702 * z, -80.0), 80.0)
        sp = tl.sigmoid(a)
        y = z * sp
        dydz = sp + 1.702 * z * sp * tl.sigmoid(-a)
    return y, dydz


@triton.jit
def _bias_gelu_fwd_kernel(
    X, B, Y,  # X/Y (M, N) with unit column stride; B (N,)
    stride_x, stride_y, M, N,
    HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 2-D tiles so the bias tile is loaded once per program and reused across BLOCK_M rows
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows[:, None] < M) & cmask[None, :]
    z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        z += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y, _ = _gelu_and_grad(z, ACT)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    X, B, DY, DX, DB,  # X/DY/DX (M, N); B (N,); DB (P, N) fp32 partial column sums
    stride_x, stride_dy, stride_dx, M, N, rows_per_prog,
    HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid (column blocks, P row groups): each program walks rows_per_prog rows (a multiple of
    # BLOCK_M) of one column block, accumulating dbias in registers; one (P, N) write at the end.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid_m.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & cmask[None, :]
        z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            z += b[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        _, dydz = _gelu_and_grad(z, ACT)
        dz = dy * dydz  # masked lanes: dy = 0
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
        if HAS_B:
            acc += tl.sum(dz, axis=0)
    if HAS_B:
        tl.store(DB + pid_m * N + cols, acc, mask=cmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _act_code(approximate: str) -> int:
    if approximate not in _ACTS:
        raise ValueError(f"bias_gelu: approximate must be 'none', 'tanh' or 'quick', got {approximate!r}")
    return _ACTS[approximate]


def _rows(t: Tensor, n: int) -> Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: Tensor, bias: Optional[Tensor]) -> int:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"bias_gelu: x must be (..., N) with N > 0, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"bias_gelu (Triton): x dtype {x.dtype} not in fp32/fp16/bf16")
    n = x.shape[-1]
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias_gelu: bias must be ({n},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias_gelu: bias on {bias.device}, x on {x.device}")
    return n


# the backward's row groups are multiples of this many rows: of every BLOCK_M in the sets below,
# so only the last tile of the last group is ragged whichever configuration the tuner picks
_ROW_QUANTUM = 32


def bias_gelu_configs(N: int, dtype: torch.dtype, cc: Optional[int] = None,
                      kernel: str = "fwd") -> Tuple[LaunchConfig, ...]:
    """Launch configurations (BLOCK_M rows x BLOCK_N columns, num_warps, num_stages) of the
    forward ("fwd") or backward ("bwd") kernel for (rows, N) activations on compute capability cc
    (None: the interpreter).  First the default: 16 x 256 tiles of 4 warps (4k elements per
    program, the bias tile reused over 16 rows); the tuner also tries 32 x 256 on 8 warps and,
    forward, 8 x 512 on 4 (longer contiguous rows), backward, 8 x 256 on 4 (it holds x, dy and
    the GELU derivative per element: half the registers, twice the resident programs).
    Interpreter: 32-row tiles (fewer, slower Python-level programs).  dtype: part of the
    contract, unused today (the kernels compute in fp32 whatever the I/O type)."""
    if kernel not in ("fwd", "bwd"):
        raise ValueError(f"bias_gelu_configs: kernel must be 'fwd' or 'bwd', got {kernel!r}")
    bn = min(256, triton.next_power_of_2(N))
    if cc is None:
        return (config(4, 2, BLOCK_M=32, BLOCK_N=bn),)
    third = (config(4, 2, BLOCK_M=8, BLOCK_N=min(512, triton.next_power_of_2(N))) if kernel == "fwd" else
             config(4, 2, BLOCK_M=8, BLOCK_N=bn))
    return unique((config(4, 2, BLOCK_M=16, BLOCK_N=bn), config(8, 2, BLOCK_M=32, BLOCK_N=bn), third))


def _fwd_plan(x2: Tensor, bias: Optional[Tensor], y: Tensor, act: int, cc: Optional[int]) -> Launch:
    m, n = x2.shape
    args = (x2, bias if bias is not None else x2, y, x2.stride(0), y.stride(0), m, n)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    return Launch(_bias_gelu_fwd_kernel, grid, args, dict(HAS_B=bias is not None, ACT=act),
                  bias_gelu_configs(n, x2.dtype, cc, "fwd"), key=("N", "HAS_B", "ACT"), label="bias_gelu fwd")


def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    act = _act_code(approximate)
    n = _check(x, bias)
    x2 = _rows(x, n)  # (M, N)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0:
        _fwd_plan(x2, bias, y, act, launch_arch(x.device)).run()
    return y.view(x.shape)


def _bwd_groups(m: int, n: int, device: torch.device) -> Tuple[int, int]:
    """(row groups P, rows per group): enough programs to fill the GPU (~4 per SM over all
    256-wide column blocks), each group a multiple of _ROW_QUANTUM rows."""
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count * 4
    else:
        target = 2
    n_col = triton.cdiv(n, min(256, triton.next_power_of_2(n)))
    p = max(1, min(triton.cdiv(m, _ROW_QUANTUM), triton.cdiv(target, n_col)))
    rows_per_prog = triton.cdiv(triton.cdiv(m, p), _ROW_QUANTUM) * _ROW_QUANTUM
    return triton.cdiv(m, rows_per_prog), rows_per_prog


def _bwd_plan(x2: Tensor, bias: Optional[Tensor], dy2: Tensor, dx: Tensor, db_part: Tensor, p: int,
              rows_per_prog: int, act: int, cc: Optional[int]) -> Launch:
    m, n = x2.shape
    has_b = bias is not None
    args = (x2, bias if has_b else x2, dy2, dx, db_part if has_b else dx, x2.stride(0), dy2.stride(0), dx.stride(0),
            m, n, rows_per_prog)
    return Launch(_bias_gelu_bwd_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), p), args,
                  dict(HAS_B=has_b, ACT=act), bias_gelu_configs(n, x2.dtype, cc, "bwd"), key=("N", "HAS_B", "ACT"),
                  label="bias_gelu bwd")


def bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str = "none"):
    """Returns (dx (x's shape/dtype), dbias (N,) fp32 or an empty tensor without bias)."""
    act = _act_code(approximate)
    n = x.shape[-1]
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    p, rows_per_prog = _bwd_groups(m, n, x.device) if m > 0 else (1, _ROW_QUANTUM)
    has_b = bias is not None
    db_part = torch.zeros((p, n) if has_b else (0,), dtype=torch.float32, device=x.device)
    if m > 0:
        _bwd_plan(x2, bias, dy2, dx, db_part, p, rows_per_prog, act, launch_arch(x.device)).run()
    db = db_part.sum(0) if has_b else x.new_empty((0,))
    return dx.view(x.shape), db


# ----------------------------------------------------------------------------------------------
# custom ops + autograd (the one path, eager and torch.compile)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("valor_fast::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    return bias_gelu_fwd(x, bias, approximate)


@_bias_gelu_fwd_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x)


@torch.library.custom_op("valor_fast::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(dy: Tensor, x: Tensor, bias: Optional[Tensor],
                      approximate: str) -> Tuple[Tensor, Tensor]:
    return bias_gelu_bwd(dy, x, bias, approximate)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias, approximate):
    db = x.new_empty((x.shape[-1],), dtype=torch.float32) if bias is not None else x.new_empty((0,))
    return torch.empty_like(x), db


def _bias_gelu_setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _bias_gelu_bwd_op(dy, x, bias, ctx.approximate)
    return dx, (db.to(bias.dtype) if bias is not None else None), None


_bias_gelu_fwd_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup_context)


# ----------------------------------------------------------------------------------------------
# functional entry points
# ----------------------------------------------------------------------------------------------
def bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """Triton gelu(x + bias) over (..., N) with bias (N,) (or None); approximate "none" | "tanh"."""
    _act_code(approximate)
    return _bias_gelu_fwd_op(x, bias, approximate)


def quick_gelu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Triton CLIP quick GELU: z * sigmoid(1.702 z), z = x + bias."""
    return bias_gelu(x, bias, "quick")
