"""Masked-LM head + cross-entropy without the (N, V) logits.

`hidden` (N, C) are the final hidden states already gathered at the masked positions, `weight`
(V, C) the tied word embeddings (V = 30522 for BERT), `bias` (V,) the decoder bias.  Unfused, the
logits are (N, V) in the activation dtype plus an fp32 softmax copy and its gradient: with
N = 3 * 512 * 24 = 36864 selected tokens that is ~2.3 GB (bf16) for the logits alone, each
materialised several times.  Here the vocabulary is walked in chunks of `chunk_size` columns:

forward, per chunk:   z_c = hidden @ W_c^T + b_c (N, Vc)  ->  update the online log-sum-exp
                      (running max m and scaled sum s), the target logit z_y and, for label
                      smoothing, sum_j z_j.  loss_i = lse_i - (1 - eps) z_y - eps / V * sum_j z_j.
backward, per chunk:  recompute z_c; dz_c = g_i * (softmax - (1 - eps) onehot - eps / V) written
                      over z_c in place; d_hidden += dz_c @ W_c, d_W_c = dz_c^T @ hidden,
                      d_b_c = sum_i dz_c.

Peak extra memory is O(N * chunk_size) (one chunk of logits) plus O(N * C) fp32 for d_hidden,
never O(N * V).  The backward recomputes the chunk matmul rather than storing gradients in the
forward, so reduction="none" with an arbitrary upstream gradient works and eval pays no grad cost.

The matmuls are torch (cuBLAS); the per-chunk softmax statistics and the gradient are a Triton
kernel (one row per program) or, with use_triton=False, the same algorithm in torch (CPU and
fallback).  Contents: `lm_head_ce_ref`, the Triton kernels, `ce_configs` (their launch
configurations per chunk width and architecture: autotuned, and audited by bench/audit_fused.py),
the chunked launchers, the custom ops
`valor_fast::lm_head_ce_fwd` / `_bwd` (fake impls + register_autograd: the one autograd path) and
the functional entry point `lm_head_cross_entropy`.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._compat import tl, triton  # noqa: F401  (no-op stand-ins without triton)
from ._launch import Launch, LaunchConfig, config, launch_arch, unique

DEFAULT_CHUNK = 4096


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def lm_head_ce_ref(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                   label_smoothing: float = 0.0, reduction: str = "mean",
                   ignore_index: int = -100) -> Tensor:
    """Eager PyTorch with the full (N, V) logits; any dtype (float64 for the ground truth)."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


# ----------------------------------------------------------------------------------------------
# Triton kernels (one row per program, looping over the chunk's columns)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _ce_fwd_chunk_kernel(
    Z, stride_z, Labels, Mx, Sx, ZY, ZS,  # Z (N, Vc) chunk logits; Labels (N,); Mx/Sx/ZY/ZS (N,) fp32
    v_start, n_cols,
    HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    Z += row * stride_z
    m = tl.load(Mx + row)  # running max over the previous chunks (-inf before the first)
    s = tl.load(Sx + row)  # running sum of exp(z - m)
    zsum = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(Z + cols, mask=mask, other=-float("inf")).to(tl.float32)
        # every block has >= 1 live column, so m_new is finite and exp(m - m_new) never sees inf - inf
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTH:
            zsum += tl.where(mask, z, 0.0)
    tl.store(Mx + row, m)
    tl.store(Sx + row, s)
    if HAS_SMOOTH:
        tl.store(ZS + row, tl.load(ZS + row) + tl.sum(zsum, axis=0))
    # the target logit, if it falls in this chunk (masked scalar load/store instead of a branch)
    local = tl.load(Labels + row) - v_start
    here = (local >= 0) & (local < n_cols)
    zy = tl.load(Z + local, mask=here, other=0.0).to(tl.float32)
    tl.store(ZY + row, zy, mask=here)


@triton.jit
def _ce_bwd_chunk_kernel(
    Z, stride_z, Labels, LSE, G,  # Z (N, Vc) chunk logits, overwritten by dZ; LSE/G (N,) fp32
    v_start, n_cols, on_target, uniform,
    BLOCK: tl.constexpr,
):
    # dz_j = g * (p_j - uniform - on_target * [j == y]) with uniform = eps / V, on_target = 1 - eps
    row = tl.program_id(0).to(tl.int64)
    Z += row * stride_z
    g = tl.load(G + row)  # 0 for ignored rows
    lse = tl.load(LSE + row)
    local = tl.load(Labels + row) - v_start
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(Z + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.exp(z - lse) - uniform - tl.where(cols == local, on_target, 0.0)
        tl.store(Z + cols, (d * g).to(Z.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# chunked launchers
# ----------------------------------------------------------------------------------------------
def _check(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, chunk_size: int) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"lm_head_cross_entropy: hidden must be (N, C), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"lm_head_cross_entropy: weight must be (V, C={hidden.shape[1]}), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_cross_entropy: weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"lm_head_cross_entropy: bias must be ({weight.shape[0]},) {weight.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    if labels.shape != (hidden.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"lm_head_cross_entropy: labels must be ({hidden.shape[0]},) int64, "
                         f"got {tuple(labels.shape)} {labels.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"lm_head_cross_entropy: {name} on {t.device}, hidden on {hidden.device}")
    if chunk_size <= 0:
        raise ValueError(f"lm_head_cross_entropy: chunk_size must be > 0, got {chunk_size}")


def _check_labels(labels: Tensor, v: int, ignore_index: int) -> None:
    # A bad label would silently give loss = lse (its logit is never found).  The check needs a
    # host sync, so it runs on CPU only; on CUDA keep the labels honest upstream.
    if labels.device.type == "cpu" and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            raise ValueError(f"lm_head_cross_entropy: labels out of [0, {v}) (and != ignore_index "
                             f"{ignore_index}): {labels[bad][:5].tolist()}")


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int) -> Tensor:
    w = weight[v0:v1]  # (Vc, C), a contiguous view
    if bias is None:
        return hidden @ w.t()  # (N, Vc)
    return torch.addmm(bias[v0:v1], hidden, w.t())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 statistics for fp32/fp16/bf16; float64 stays float64 (torch path, reference checks)
    return torch.float64 if dtype == torch.float64 else torch.float32


def ce_configs(n_cols: int, dtype: torch.dtype, cc: Optional[int] = None,
               kernel: str = "fwd") -> Tuple[LaunchConfig, ...]:
    """Launch configurations (BLOCK columns per step of the row loop, num_warps) of the chunk
    statistics ("fwd") or chunk gradient ("bwd") kernel for chunks of n_cols logits on compute
    capability cc (None: the interpreter).  First the default, 1024 columns on 4 warps (8 per
    thread); the tuner also tries 2048 and 4096 on 8 warps (fewer trips round the loop for the
    4096-wide chunks).  No block wider than the chunk.  dtype: part of the contract, unused."""
    if kernel not in ("fwd", "bwd"):
        raise ValueError(f"ce_configs: kernel must be 'fwd' or 'bwd', got {kernel!r}")
    cap = triton.next_power_of_2(n_cols)
    if cc is None:
        return (config(4, 2, BLOCK=min(1024, cap)),)
    return unique(config(w, 2, BLOCK=min(b, cap)) for b, w in ((1024, 4), (2048, 8), (4096, 8)))


def _fwd_chunk_plan(z: Tensor, labels: Tensor, stats: Tuple[Tensor, Tensor, Tensor, Tensor], v0: int,
                    smooth: bool, cc: Optional[int]) -> Launch:
    """The statistics update for one chunk: it reads and rewrites the running (max, sum, target
    logit, logit sum) in place, so a timing run's updates are undone (restore_value)."""
    n, n_cols = z.shape
    m, s, zy, zs = stats
    return Launch(_ce_fwd_chunk_kernel, lambda meta: (n,), (z, z.stride(0), labels, m, s, zy, zs, v0, n_cols),
                  dict(HAS_SMOOTH=smooth), ce_configs(n_cols, z.dtype, cc, "fwd"), key=("n_cols", "HAS_SMOOTH"),
                  restore_value=("Mx", "Sx", "ZY", "ZS"), label="lm_head_ce fwd chunk")


def _bwd_chunk_plan(z: Tensor, labels: Tensor, lse: Tensor, g: Tensor, v0: int, on_target: float,
                    uniform: float, cc: Optional[int]) -> Launch:
    """The chunk gradient, written over the chunk logits z in place (restored after timing runs)."""
    n, n_cols = z.shape
    return Launch(_ce_bwd_chunk_kernel, lambda meta: (n,),
                  (z, z.stride(0), labels, lse, g, v0, n_cols, on_target, uniform), {},
                  ce_configs(n_cols, z.dtype, cc, "bwd"), key=("n_cols",), restore_value=("Z",),
                  label="lm_head_ce bwd chunk")


def lm_head_ce_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                   label_smoothing: float, ignore_index: int, chunk_size: int,
                   use_triton: bool) -> Tuple[Tensor, Tensor]:
    """Returns (per-row loss (N,) fp32 (float64 for float64 input), 0 at ignored rows; lse (N,))."""
    _check(hidden, weight, bias, labels, chunk_size)
    n, v = hidden.shape[0], weight.shape[0]
    _check_labels(labels, v, ignore_index)
    labels = labels.long().contiguous()  # int64 for gather / pointer arithmetic, unit stride
    if use_triton and hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"lm_head_cross_entropy (Triton): hidden dtype {hidden.dtype} not in fp32/fp16/bf16")
    dev, acc = hidden.device, _acc_dtype(hidden.dtype)
    cc = launch_arch(dev)
    m = torch.full((n,), float("-inf"), dtype=acc, device=dev)  # running max (Triton) / lse (torch)
    s = torch.zeros((n,), dtype=acc, device=dev)  # running sum exp(z - m) (Triton only)
    zy = torch.zeros((n,), dtype=acc, device=dev)  # target logit
    zs = torch.zeros((n,), dtype=acc, device=dev)  # sum_j z_j (label smoothing only)
    smooth = label_smoothing > 0.0
    if n > 0:
        for v0 in range(0, v, chunk_size):
            v1 = min(v0 + chunk_size, v)
            z = _chunk_logits(hidden, weight, bias, v0, v1)  # (N, Vc)
            if use_triton:
                _fwd_chunk_plan(z, labels, (m, s, zy, zs), v0, smooth, cc).run()
            else:
                # torch's logsumexp walks each row of the chunk while it is in cache; a max /
                # subtract / exp / sum chain makes four passes over all N x Vc logits (15 MB at
                # N = 950, Vc = 4096 fp32: the tiny MGC step) in memory.  Chunks merge by
                # logaddexp: the same online log-sum-exp
                zf = z if z.dtype == acc else z.to(acc)
                m = torch.logaddexp(m, torch.logsumexp(zf, dim=1))
                if smooth:
                    zs += zf.sum(dim=1)
                local = labels - v0
                here = (local >= 0) & (local < v1 - v0)
                got = zf.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
                zy = torch.where(here, got, zy)
            del z
    lse = m + torch.log(s) if use_triton else m
    loss = lse - (1.0 - label_smoothing) * zy
    if smooth:
        loss = loss - (label_smoothing / v) * zs
    loss = torch.where(labels != ignore_index, loss, torch.zeros_like(loss))
    return loss, lse


def lm_head_ce_bwd(grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                   labels: Tensor, lse: Tensor, label_smoothing: float, ignore_index: int,
                   chunk_size: int, use_triton: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """grad_rows (N,): d loss / d per-row loss.  Returns (d_hidden (N, C) in hidden's dtype,
    d_weight (V, C) in weight's dtype, d_bias (V,) fp32 (float64 for float64 input))."""
    n, c = hidden.shape
    v = weight.shape[0]
    labels = labels.long().contiguous()
    acc = _acc_dtype(hidden.dtype)
    g = torch.where(labels != ignore_index, grad_rows.to(acc), torch.zeros((), dtype=acc, device=hidden.device))
    g = g.contiguous()
    lse = lse.contiguous()
    # contiguous whatever weight's layout, so each chunk's rows d_w[v0:v1] are one dense block
    d_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    d_b = torch.zeros((v,), dtype=acc, device=hidden.device)
    # fp32 accumulator over chunks: per-chunk products are rounded once (to hidden's dtype), the
    # sum over chunks is not
    d_h = torch.zeros((n, c), dtype=acc, device=hidden.device)
    on_target, uniform = 1.0 - label_smoothing, label_smoothing / v
    cc = launch_arch(hidden.device)
    if n == 0:
        d_w.zero_()
        return d_h.to(hidden.dtype), d_w, d_b
    for v0 in range(0, v, chunk_size):
        v1 = min(v0 + chunk_size, v)
        z = _chunk_logits(hidden, weight, bias, v0, v1)  # (N, Vc), becomes dZ in place
        if use_triton:
            _bwd_chunk_plan(z, labels, lse, g, v0, on_target, uniform, cc).run()
        else:
            # in place on the chunk's own logits (a fresh matmul output): no new N x Vc buffers
            # for the subtract, exp and scale (bench/bench_cpu_step.py times this path)
            d = z if z.dtype == acc else z.to(acc)
            d.sub_(lse[:, None]).exp_()
            if uniform:
                d.sub_(uniform)
            local = labels - v0
            here = (local >= 0) & (local < v1 - v0)
            # subtract the one-hot without a host sync (no nonzero): rows whose label is in
            # another chunk add 0 at a clamped column
            d.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None],
                           (here.to(acc) * -on_target)[:, None])
            d.mul_(g[:, None])
            z = d if d.dtype == z.dtype else d.to(z.dtype)
        w = weight[v0:v1]  # (Vc, C)
        if z.dtype == acc:
            d_h.addmm_(z, w)
        else:
            d_h += z @ w
        torch.mm(z.t(), hidden, out=d_w[v0:v1])  # (Vc, C): rows of d_w, contiguous
        d_b[v0:v1] = z.to(acc).sum(dim=0)
        del z
    return d_h.to(hidden.dtype), d_w, d_b


# ----------------------------------------------------------------------------------------------
# custom ops + autograd (the one path, eager and torch.compile)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("valor_fast::lm_head_ce_fwd", mutates_args=())
def _lm_head_ce_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                       label_smoothing: float, ignore_index: int, chunk_size: int,
                       use_triton: bool) -> Tuple[Tensor, Tensor]:
    return lm_head_ce_fwd(hidden, weight, bias, labels, label_smoothing, ignore_index, chunk_size,
                          use_triton)


@_lm_head_ce_fwd_op.register_fake
def _(hidden, weight, bias, labels, label_smoothing, ignore_index, chunk_size, use_triton):
    rows = hidden.new_empty((hidden.shape[0],), dtype=_acc_dtype(hidden.dtype))
    return rows, rows.clone()


@torch.library.custom_op("valor_fast::lm_head_ce_bwd", mutates_args=())
def _lm_head_ce_bwd_op(grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                       labels: Tensor, lse: Tensor, label_smoothing: float, ignore_index: int,
                       chunk_size: int, use_triton: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return lm_head_ce_bwd(grad_rows, hidden, weight, bias, labels, lse, label_smoothing,
                          ignore_index, chunk_size, use_triton)


@_lm_head_ce_bwd_op.register_fake
def _(grad_rows, hidden, weight, bias, labels, lse, label_smoothing, ignore_index, chunk_size, use_triton):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],), dtype=_acc_dtype(weight.dtype)))


def _lm_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, label_smoothing, ignore_index, chunk_size, use_triton = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.args = (label_smoothing, ignore_index, chunk_size, use_triton)


def _lm_backward(ctx, grad_rows, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    d_h, d_w, d_b = _lm_head_ce_bwd_op(grad_rows, hidden, weight, bias, labels, lse, *ctx.args)
    return d_h, d_w, (d_b.to(bias.dtype) if bias is not None else None), None, None, None, None, None


_lm_head_ce_fwd_op.register_autograd(_lm_backward, setup_context=_lm_setup_context)


# ----------------------------------------------------------------------------------------------
# functional entry point
# ----------------------------------------------------------------------------------------------
def _autocast_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Under autocast, cast like F.linear does: every fp32/fp16/bf16 operand to the autocast dtype
    (float64 is left alone).  A custom op is opaque to autocast, so without this a bf16 hidden
    state from the autocast decoder meets the fp32 tied embedding (one GPU or DDP, no FSDP
    mixed-precision params).  `.to` is differentiable: the fp32 master weight gets its gradient."""
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dt):
            return t
        return t.to(dt)
    return cast(hidden), cast(weight), cast(bias)


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                          label_smoothing: float = 0.0, reduction: str = "mean",
                          ignore_index: int = -100, chunk_size: int = DEFAULT_CHUNK,
                          use_triton: bool = True) -> Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `labels`, chunked over the vocabulary.
    reduction "mean" (over non-ignored rows, as F.cross_entropy; NaN if all are ignored), "sum" or
    "none" ((N,), 0 at ignored rows).  The loss is fp32 whatever the input dtype."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"lm_head_cross_entropy: reduction must be mean|sum|none, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"lm_head_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    rows, _ = _lm_head_ce_fwd_op(hidden, weight, bias, labels, float(label_smoothing),
                                 int(ignore_index), int(chunk_size), bool(use_triton))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (labels != ignore_index).sum()
