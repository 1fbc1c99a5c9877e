"""Fused bias + GELU: `y = gelu(x + bias)` (exact erf GELU as BERT uses, the tanh approximation, or
CLIP's quick GELU `z * sigmoid(1.702 z)`).

The FFN up-projection output (rows, 3072/4096) is the largest activation of a transformer block;
unfused, bias-add and GELU each read and write it (and the backward reads it again twice).  Here
the forward reads x once and writes y once, and the backward reads x and dy once, writes dx once and
reduces dbias in the same pass.  The pre-activation `x + bias` is recomputed in fp32, never stored.

Contents: `bias_gelu_ref` (plain torch, any dtype incl. float64), the Triton forward and backward
kernels, the launchers, the custom ops `valor_fast::bias_gelu_fwd` / `_bwd` (fake impls +
register_autograd: the one autograd path, eager and under torch.compile) and the functional entry
points `bias_gelu` and `quick_gelu`.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._compat import tl, triton  # noqa: F401  (no-op stand-ins without triton)

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


def _blocks(n: int, device: torch.device) -> Tuple[int, int, int]:
    # 16 x 128..256 tiles: 2-4k elements per program, bias tile reused over 16 rows.  On the CPU
    # interpreter a larger row tile means fewer (slow) Python-level program launches.
    block_n = min(256, triton.next_power_of_2(n))
    block_m = 16 if device.type == "cuda" else 32
    return block_m, block_n, 4


def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    act = _act_code(approximate)
    n = _check(x, bias)
    x2 = _rows(x, n)  # (M, N)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm, bn, nw = _blocks(n, x.device)
    if m > 0:
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _bias_gelu_fwd_kernel[grid](
            x2, bias if bias is not None else x2, y, x2.stride(0), y.stride(0), m, n,
            HAS_B=bias is not None, ACT=act, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
    return y.view(x.shape)


def bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str = "none"):
    """Returns (dx (x's shape/dtype), dbias (N,) fp32 or an empty tensor without bias)."""
    act = _act_code(approximate)
    n = x.shape[-1]
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm, bn, nw = _blocks(n, x.device)
    n_col = triton.cdiv(n, bn)
    # enough row groups to fill the GPU (~4 programs per SM over all column blocks), each a
    # multiple of BLOCK_M rows so only the last tile of the last group is ragged
    if x.device.type == "cuda":
        target = torch.cuda.get_device_properties(x.device).multi_processor_count * 4
    else:
        target = 2
    p = max(1, min(triton.cdiv(m, bm), triton.cdiv(target, n_col))) if m > 0 else 1
    rows_per_prog = triton.cdiv(triton.cdiv(m, p), bm) * bm if m > 0 else bm
    p = triton.cdiv(m, rows_per_prog) if m > 0 else 1
    has_b = bias is not None
    db_part = torch.zeros((p, n) if has_b else (0,), dtype=torch.float32, device=x.device)
    if m > 0:
        _bias_gelu_bwd_kernel[(n_col, p)](
            x2, bias if has_b else x2, dy2, dx, db_part if has_b else dx,
            x2.stride(0), dy2.stride(0), dx.stride(0), m, n, rows_per_prog,
            HAS_B=has_b, ACT=act, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
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
