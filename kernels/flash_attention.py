"""Flash attention (Triton): softmax(q k^T * scale + mask) v without materialising the (Lq, Lk)
score matrix, forward and backward.

Contents: `attention_ref` (eager PyTorch, any dtype incl. float64: the ground truth), the Triton
forward kernel (online softmax over key tiles, stores the log-sum-exp), the backward kernels
(preprocess delta = rowsum(dO * O); dK/dV per key tile and dQ per query tile, both recomputing the
probability tiles from the stored log-sum-exp), `attention_configs` (the launch configurations per
kernel, shape, dtype and architecture: a pure function the launchers autotune over and
bench/audit_attention.py compiles for sm_80 / sm_90a), the launchers, the custom ops
`valor_fast::flash_attention` / `valor_fast::flash_attention_bwd` (fake impls + register_autograd:
the one autograd path, eager and under torch.compile, which traces them as opaque nodes) and the
functional entry point `flash_attention`.

Layout: q (B, H, Lq, Dh), k / v (B, H, Lk, Dh), any strides with a unit stride on Dh (other
layouts are copied).  key_padding_mask (B, Lk) bool, True = attend.  causal needs Lq == Lk
(top-left = bottom-right alignment then).  Dh <= 128, padded in registers to a power of two with
masked loads (80 -> 128).  fp32 / fp16 / bf16 I/O; scores, softmax statistics and all
accumulators are fp32; the P @ V and dS products take P / dS rounded to the input dtype (as
eager attention does).  fp32 inputs use IEEE fp32 dots unless torch allows TF32 matmuls.

A row with no key to attend to (all keys padded, or causal with only padded keys before it)
outputs zeros and receives / passes zero gradients, not NaN: its stored log-sum-exp is +inf, so
every recomputed probability of that row is exactly 0.

Additive bias (Swin's relative position bias + shifted-window mask): (H, Lq, Lk) for every batch
item, or (nB, H, Lq, Lk) with batch item b reading slice b % nB (Swin batches clips x windows with
the window index fastest, so window w of every clip shares slice w).  It is one more tile load
next to the key-padding mask (HAS_BIAS), added in fp32 to the scaled scores; dbias = dS, written
per item or accumulated over the items sharing a slice (fp32 atomics, or a deterministic per-item
buffer reduced in torch).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._common import mma
from ._compat import tl, triton  # noqa: F401  (no-op stand-ins without triton)
from ._launch import Launch, LaunchConfig, config, hopper, launch_arch, unique

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634  # scores are kept in base-2 units so the kernels use exp2


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def attention_ref(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                  causal: bool = False, scale: Optional[float] = None,
                  bias: Optional[Tensor] = None) -> Tensor:
    """Eager attention in q's dtype (float64 for the ground truth).  q (B, H, Lq, Dh), k/v
    (B, H, Lk, Dh), key_padding_mask (B, Lk) bool True = attend, bias additive, broadcastable
    to (B, H, Lq, Lk) or (nB, H, Lq, Lk) with item b using bias[b % nB].  Rows with nothing to attend to give zeros (and zero gradients)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    lq, lk = q.shape[-2], k.shape[-2]
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if bias is not None:
        B = q.shape[0]
        if bias.dim() == 4 and bias.shape[0] not in (1, B):
            # (nB, H, Lq, Lk) shared by items b % nB: item b = r * nB + j reads slice j
            nb = bias.shape[0]
            bias = bias.unsqueeze(0).expand(B // nb, *bias.shape).reshape(B, *bias.shape[1:])
        s = s + bias.to(s.dtype)
    allowed = None  # broadcastable to (B, H, Lq, Lk), True = attend
    if key_padding_mask is not None:
        allowed = key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()  # (Lq, Lk)
        allowed = tri if allowed is None else allowed & tri
    if allowed is None:
        return torch.matmul(torch.softmax(s, dim=-1), v)
    # A fully masked row would be softmax over all -inf = NaN, and the NaN leaks into every
    # gradient even when the row is zeroed afterwards; unmask such rows (finite, uniform) and
    # zero their output instead, which also zeroes their gradients.
    alive = allowed.any(dim=-1, keepdim=True)  # (B|1, 1, Lq|1, 1)
    s = s.masked_fill(~(allowed | ~alive), float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), v)
    return out.masked_fill(~alive, 0.0)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _vec_aligned(x, VEC: tl.constexpr):
    # x (a stride or a length the launcher checked to be a multiple of VEC) with that fact made
    # visible to the compiler: (x // VEC) * VEC is provably VEC-divisible, so loads along a unit
    # stride row become VEC-wide vectors (196 = 4 x 49: fp32 x4) instead of one 64-bit pointer
    # per element; Triton's own specialisation only knows "divisible by 16".
    if VEC > 1:
        x = (x // VEC) * VEC
    return x


@triton.jit
def _bias_tile(BIAS, offs_m, offs_n, m_ok, Lk, sbm, sbn, VEC: tl.constexpr):
    # (BLOCK_M, BLOCK_N) additive bias in fp32, scaled to the kernels' base-2 score units.  Out of
    # range entries load 0: those rows / columns are masked elsewhere.
    n_ok = offs_n < _vec_aligned(Lk, VEC)
    b = tl.load(BIAS + offs_m[:, None] * _vec_aligned(sbm, VEC) + offs_n[None, :] * sbn,
                mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    return b.to(tl.float32) * 1.4426950408889634


@triton.jit
def _fwd_kernel(
    Q, K, V, KPM, BIAS, O, LSE,  # Q/O (B, H, Lq, Dh); K/V (B, H, Lk, Dh); KPM (B, Lk) uint8; BIAS (nB, H, Lq, Lk); LSE (B, H, Lq) fp32
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skpm_b,
    sbb, sbh, sbm, sbn, nB,
    H, Lq, Lk, D, qk_scale,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BIAS_VEC: tl.constexpr,
):
    # grid (cdiv(Lq, BLOCK_M), B * H): query tiles of one head are neighbours in launch order, so
    # they share that head's K/V in L2.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D  # head dims padded to a power of two: the padding lanes load as 0

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    K += b * skb + h * skh
    V += b * svb + h * svh
    if HAS_BIAS:
        # batch item b reads bias slice b % nB (Swin: item = clip * nW + window, nB = nW)
        BIAS += (b % nB) * sbb + h * sbh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    hi = Lk
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Lk)  # keys past the tile's last query are all masked
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Lk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = mma(q, tl.trans(k), PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        if HAS_BIAS:
            s += _bias_tile(BIAS, offs_m, offs_n, m_ok, Lk, sbm, sbn, BIAS_VEC)
        valid = n_ok[None, :]
        if HAS_KPM:
            keep = tl.load(KPM + b * skpm_b + offs_n, mask=n_ok, other=0)
            valid = valid & (keep != 0)[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows with every key masked so far keep m = -inf; subtract 0 instead so that
        # exp2(-inf - (-inf)) never forms a NaN (their p and alpha come out 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PRECISION)
        m_i = m_new

    alive = l_i > 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    out = acc / l_safe[:, None]  # dead rows: acc = 0 -> 0
    # +inf for dead rows: every recomputed p = exp2(s - lse) of such a row is then exactly 0
    lse = tl.where(alive, m_i + tl.log2(l_safe), float("inf"))
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,  # O/DO (B, H, Lq, Dh); DELTA (B, H, Lq) fp32
    sob, soh, som, sdob, sdoh, sdom,
    H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax-backward row term, computed once
    # here instead of in every key tile of the backward.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + (b * H + h) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, KPM, BIAS, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, skpm_b,
    sbb, sbh, sbm, sbn, nB,
    H, Lq, Lk, D, sm_scale, qk_scale,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BIAS_VEC: tl.constexpr,
):
    # One program per key tile: it owns its dK/dV rows, so no atomics; it walks the query tiles and
    # recomputes P = exp2(s - lse) and dS = P * (dP - delta) for each.
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Lk
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    key_ok = n_ok
    if HAS_KPM:
        keep = tl.load(KPM + b * skpm_b + offs_n, mask=n_ok, other=0)
        key_ok = key_ok & (keep != 0)
    Q += b * sqb + h * sqh
    DO += b * sdob + h * sdoh
    LSE += (b * H + h) * Lq
    DELTA += (b * H + h) * Lq
    if HAS_BIAS:
        BIAS += (b % nB) * sbb + h * sbh

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier queries never see these keys
    for start_m in range(lo, Lq, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < Lq
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :], mask=qd_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + offs_m[:, None] * sdom + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        s = mma(q, tl.trans(k), PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if HAS_BIAS:
            s += _bias_tile(BIAS, offs_m, offs_n, m_ok, Lk, sbm, sbn, BIAS_VEC)
        valid = m_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dv += mma(tl.trans(p.to(do.dtype)), do, PRECISION)
        dp = mma(do, tl.trans(v), PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dk += mma(tl.trans(ds.to(q.dtype)), q, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, KPM, BIAS, DBIAS, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm, skpm_b,
    sbb, sbh, sbm, sbn, nB, sdbb, sdbh, sdbm, sdbn, nDB,
    H, Lq, Lk, D, sm_scale, qk_scale,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, DBIAS_MODE: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BIAS_VEC: tl.constexpr,
):
    # One program per query tile, walking the key tiles: dQ = sum_j dS_j K_j * scale.  dS is also
    # the gradient of the additive bias (it enters the scores unscaled), so with DBIAS_MODE the
    # same tiles go to DBIAS slice b % nDB: 1 = plain store (one slice per batch item, or nB == B),
    # 2 = fp32 atomic add (items sharing a slice accumulate into it).
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + (b * H + h) * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * Lq + offs_m, mask=m_ok, other=0.0)
    K += b * skb + h * skh
    V += b * svb + h * svh
    if HAS_BIAS:
        BIAS += (b % nB) * sbb + h * sbh
    if DBIAS_MODE != 0:
        DBIAS += (b % nDB) * sdbb + h * sdbh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Lk)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Lk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), PRECISION) * qk_scale
        if HAS_BIAS:
            s += _bias_tile(BIAS, offs_m, offs_n, m_ok, Lk, sbm, sbn, BIAS_VEC)
        valid = m_ok[:, None] & n_ok[None, :]
        if HAS_KPM:
            keep = tl.load(KPM + b * skpm_b + offs_n, mask=n_ok, other=0)
            valid = valid & (keep != 0)[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        if DBIAS_MODE != 0:
            # the launcher's own (nDB, H, Lq, Lk) fp32 buffer: its row stride and Lk are multiples
            # of BIAS_VEC whenever the bias' are, so the stores vectorise like the bias loads
            db_ptrs = DBIAS + offs_m[:, None] * _vec_aligned(sdbm, BIAS_VEC) + offs_n[None, :] * sdbn
            db_mask = m_ok[:, None] & (offs_n < _vec_aligned(Lk, BIAS_VEC))[None, :]
            if DBIAS_MODE == 1:
                tl.store(db_ptrs, ds, mask=db_mask)
            else:
                tl.atomic_add(db_ptrs, ds, mask=db_mask)
        dq += mma(ds.to(k.dtype), k, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ----------------------------------------------------------------------------------------------
# launch configurations: a pure function of (shape, dtype, architecture, kernel), used by the
# launchers below and by bench/audit_attention.py, which compiles every configuration it returns
# for VALOR's shapes on sm_80 and sm_90a (registers, spills, shared memory, HMMA / HGMMA)
# ----------------------------------------------------------------------------------------------
ATTN_KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
SHORT_Q = 64  # query lengths up to this (text 40, decoder 40) get query tiles of at most 64 rows


def _d_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16 lanes


def _q_tile(L: int, tiles=(128, 64)) -> int:
    """The tile that pads L least, ties to the larger: 197 -> 128 (2 x 128 = 4 x 64 = 256 rows);
    129 -> 64 (192 rows, not 256); 257 -> 64 (320, not 384); 196 -> 128."""
    return min(tiles, key=lambda t: (triton.cdiv(L, t) * t, -t))


def _fwd_configs(Lq: int, Lk: int, d_block: int, fp32: bool, has_bias: bool, hop: bool):
    if fp32:  # IEEE / TF32 products on fp32 tiles: half the tile of the 16-bit path
        return (config(4, 2, BLOCK_M=64, BLOCK_N=32), config(4, 2, BLOCK_M=32, BLOCK_N=32))
    if d_block > 64:  # 128 lanes of head dim (Dh 80-128): the accumulator doubles
        return (config(4, 2, BLOCK_M=64, BLOCK_N=64), config(8, 2, BLOCK_M=128, BLOCK_N=64))
    if Lq <= SHORT_Q:
        # text / decoder queries (40): a 128-row tile would be 31% live.  64 rows = one warpgroup
        # MMA (wgmma's M) on sm_90; 16 rows (48 of them for 40 queries: 83% live) on HMMA
        out = [config(4, 3, BLOCK_M=64, BLOCK_N=64), config(2, 3, BLOCK_M=16, BLOCK_N=64)]
        if Lk > 2 * 64:  # cross-attention over 917 memory tokens: longer key tiles
            out.insert(1, config(4, 3, BLOCK_M=64, BLOCK_N=128))
        return unique(out)
    bm = _q_tile(Lq)
    other = 64 if bm == 128 else 128

    def tile(m: int, n: int, stages: int = 3) -> LaunchConfig:
        # 128-row tiles: 8 warps on sm_90 (two warpgroups of 64 rows; one warpgroup holding the
        # whole 128-row accumulator spills); sm_80 keeps flash-attention's 4-warp 128-row tile
        return config(8 if (m == 128 and hop) else 4, stages, BLOCK_M=m, BLOCK_N=n)
    if has_bias:
        # the fp32 bias tile is one more (BLOCK_M, BLOCK_N) operand: 32-key tiles keep it small
        # (Swin's 196 keys: 7 x 32 = 224, 88% live, vs 4 x 64 = 256, 77%)
        return unique((tile(bm, 32), tile(other, 32), config(8, 2, BLOCK_M=128, BLOCK_N=64)))
    extra = config(8, 3, BLOCK_M=128, BLOCK_N=128) if hop else config(8, 3, BLOCK_M=128, BLOCK_N=64)
    return unique((tile(bm, 64), tile(other, 64), extra))


def _dkdv_configs(Lq: int, Lk: int, d_block: int, fp32: bool, has_bias: bool, hop: bool):
    # one program per BLOCK_N keys (it owns their dK / dV rows), looping over BLOCK_M queries
    if fp32:
        return (config(4, 2, BLOCK_M=32, BLOCK_N=32),)
    if d_block > 64:
        return (config(4, 2, BLOCK_M=32, BLOCK_N=64), config(4, 2, BLOCK_M=64, BLOCK_N=32))
    if has_bias:
        return (config(4, 2, BLOCK_M=64, BLOCK_N=32), config(4, 2, BLOCK_M=32, BLOCK_N=64))
    if not hop:
        # sm_80 (ptxas, bf16, head dim 64): 64 keys x 64 queries on 4 warps holds dK, dV and five
        # score-sized tiles in 255 registers and spills 12 bytes (172 with causal + key padding);
        # 8 warps do not help (255 registers, 12-164 bytes).  32-key programs: 194 registers, none
        return (config(4, 2, BLOCK_M=64, BLOCK_N=32), config(4, 2, BLOCK_M=32, BLOCK_N=64))
    # sm_90: 64x64 on one warpgroup fits (176-228 registers); 128-query steps on two warpgroups
    # (8 warps, ~180 registers) for longer sequences.  64 keys x 128 on 8 warps spills 28 bytes.
    out = [config(4, 2, BLOCK_M=64, BLOCK_N=64), config(4, 2, BLOCK_M=32, BLOCK_N=64)]
    if Lq > 64:
        out.append(config(8, 2, BLOCK_M=128, BLOCK_N=64))
    return unique(out)


def _dq_configs(Lq: int, Lk: int, d_block: int, fp32: bool, has_bias: bool, hop: bool):
    # one program per BLOCK_M queries, looping over BLOCK_N keys; with a bias gradient it also
    # writes (or atomically adds) each dS tile: 32-key tiles keep that tile and its addresses small
    if fp32:
        return (config(4, 2, BLOCK_M=32, BLOCK_N=32),)
    if d_block > 64:
        return (config(4, 2, BLOCK_M=64, BLOCK_N=32), config(4, 2, BLOCK_M=32, BLOCK_N=64))
    if has_bias:
        return (config(4, 2, BLOCK_M=64, BLOCK_N=32), config(8, 2, BLOCK_M=128, BLOCK_N=32))
    if Lq <= SHORT_Q:
        return (config(4, 2, BLOCK_M=64, BLOCK_N=64), config(2, 2, BLOCK_M=16, BLOCK_N=64))
    return (config(4, 2, BLOCK_M=64, BLOCK_N=64), config(8, 2, BLOCK_M=128, BLOCK_N=64),
            config(4, 2, BLOCK_M=64, BLOCK_N=32))


def attention_configs(Lq: int, Lk: int, head_dim: int, dtype: torch.dtype, causal: bool = False,
                      has_bias: bool = False, cc: Optional[int] = None,
                      kernel: str = "fwd") -> Tuple[LaunchConfig, ...]:
    """The launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) worth trying for one
    attention kernel ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq") at this shape, dtype and
    compute capability `cc` (80 A100, 90 H100; None: the CPU interpreter).  The first is the
    default (the only one under the interpreter or deterministic algorithms); the launcher
    autotunes over the rest (kernels/_launch.py).

    BLOCK_M tiles queries and BLOCK_N keys in every kernel.  Interpreter: 32x32 tiles, enough to
    exercise partial and multi-tile paths on small test shapes while keeping the numpy work small.
    `causal` does not change the set today (the masked tiles are skipped, not resized); it is an
    input so that a future causal-specific tile is a change here, not in the launchers."""
    if kernel not in ATTN_KERNELS:
        raise ValueError(f"attention_configs: kernel must be one of {ATTN_KERNELS}, got {kernel!r}")
    if cc is None:
        return (config(BLOCK_M=32),) if kernel == "bwd_preprocess" else (config(BLOCK_M=32, BLOCK_N=32),)
    if kernel == "bwd_preprocess":  # delta = rowsum(dO * O): streaming, no matmul
        return (config(4, 1, BLOCK_M=64), config(4, 1, BLOCK_M=128 if Lq > SHORT_Q else 32))
    pick = {"fwd": _fwd_configs, "bwd_dkdv": _dkdv_configs, "bwd_dq": _dq_configs}[kernel]
    return pick(Lq, Lk, _d_block(head_dim), dtype == torch.float32, bool(has_bias), hopper(cc))


# ----------------------------------------------------------------------------------------------
# launchers: plans (kernel, grid, arguments, configurations) built from the inputs, then run
# ----------------------------------------------------------------------------------------------
def _unit_last(t: Tensor) -> Tensor:
    """The kernels index Dh with unit stride; any other layout is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_bias(bias: Optional[Tensor], B: int, H: int, Lq: int, Lk: int, who: str = "flash_attention") -> None:
    """An additive bias is (H, Lq, Lk) (every batch item), (nB, H, Lq, Lk) with B % nB == 0 (batch
    item b uses slice b % nB: Swin's windows of one kind across clips) or (B, H, Lq, Lk)."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{who}: bias must be a tensor, got {type(bias).__name__}")
    if bias.dim() not in (3, 4) or tuple(bias.shape[-3:]) != (H, Lq, Lk):
        raise ValueError(f"{who}: bias must be (H, Lq, Lk) = {(H, Lq, Lk)} or (nB, H, Lq, Lk) with B % nB == 0, "
                         f"got {tuple(bias.shape)}")
    if bias.dim() == 4 and (bias.shape[0] == 0 or B % bias.shape[0]):
        raise ValueError(f"{who}: bias batch dim {bias.shape[0]} does not divide the batch B={B} "
                         f"(batch item b uses bias[b % nB])")
    if not bias.is_floating_point():
        raise TypeError(f"{who}: bias must be floating point, got {bias.dtype}")


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
           bias: Optional[Tensor] = None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be 4-D (B, H, L, Dh), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"flash_attention: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
                         "in (B, H, -, Dh)")
    if v.shape != k.shape:
        raise ValueError(f"flash_attention: v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention (Triton): head dim {D} > {MAX_HEAD_DIM}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"flash_attention (Triton): q dtype {q.dtype} not in fp32/fp16/bf16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attention: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if causal and Lq != k.shape[2]:
        raise ValueError(f"flash_attention: causal needs Lq == Lk, got Lq={Lq}, Lk={k.shape[2]}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        raise ValueError(f"flash_attention: key_padding_mask must be (B, Lk) = {(B, k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
    check_bias(bias, B, H, Lq, k.shape[2])


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """The dot flavour for `mma`.  fp32 inputs follow torch's own matmul policy (IEEE unless TF32
    is allowed), so the kernel is as accurate as the eager fp32 attention it replaces."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.bfloat16 and device.type != "cuda":  # only reachable under TRITON_INTERPRET
        return "upcast"
    return "native"


def _kpm_arg(key_padding_mask: Optional[Tensor], q: Tensor) -> Tuple[Tensor, int]:
    if key_padding_mask is None:
        return q, 0  # dummy pointer, never read (HAS_KPM=False)
    kpm = key_padding_mask.to(device=q.device, dtype=torch.uint8).contiguous()  # (B, Lk)
    return kpm, kpm.stride(0)


def _row_vec(t: Tensor, Lk: int) -> int:
    """Elements per vector (up to 16 bytes) in which the kernels may access the rows of a 4-D
    (n, H, Lq, Lk) bias / dbias tensor: its unit-stride rows, Lk, every other stride and its
    start must all be multiples.  1 when the rows are not unit-stride."""
    if t.stride(-1) != 1:
        return 1
    vec = 16 // t.element_size()
    strides = [s for s in t.stride()[:-1] if s != 0]
    while vec > 1 and (Lk % vec or any(s % vec for s in strides) or t.storage_offset() % vec
                       or t.data_ptr() % (vec * t.element_size())):
        vec //= 2
    return vec


def _bias_arg(bias: Optional[Tensor], q: Tensor) -> Tuple[Tensor, Tuple[int, int, int, int], int, int]:
    """(pointer, strides of the 4-D (nB, H, Lq, Lk) view, nB, row vector width).  Any strides
    with unit-stride rows are read in place (an expanded view broadcasting one table over heads);
    other layouts (Swin's gathered table permuted to (H, N, N) has a key stride of H) are copied
    once, (H, N, N) fp32 = 0.6 MB at H=4, N=196, so every tile row is one contiguous read."""
    if bias is None:
        return q, (0, 0, 0, 0), 1, 1  # dummy pointer, never read (HAS_BIAS=False)
    b4 = bias if bias.dim() == 4 else bias.unsqueeze(0)
    if b4.device != q.device:
        raise ValueError(f"flash_attention: bias on {b4.device}, q on {q.device}")
    if b4.stride(-1) != 1:
        b4 = b4.contiguous()
    return b4, tuple(b4.stride()), b4.shape[0], _row_vec(b4, b4.shape[-1])


# what the tuner keys its choice on (besides the tensors' dtypes, which Triton adds): the shape and
# the mask / bias / causal variant, each of which compiles to different code with its own best tile
_TUNE_KEY = ("Lq", "Lk", "D", "HAS_KPM", "HAS_BIAS", "CAUSAL")


def _strides(*ts: Tensor) -> tuple:
    """(b, h, row) strides of each 4-D tensor, flattened, as the kernels take them."""
    return tuple(s for t in ts for s in t.stride()[:3])


def _fwd_plan(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float,
              bias: Optional[Tensor], out: Tensor, lse: Tensor, cc: Optional[int],
              precision: Optional[str] = None) -> Launch:
    """The forward launch writing out / lse: the configurations of `attention_configs(..., cc)`."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kpm, skpm = _kpm_arg(key_padding_mask, q)
    bptr, bs, nb, vec = _bias_arg(bias, q)
    args = (q, k, v, kpm, bptr, out, lse, *_strides(q, k, v, out), skpm, *bs, nb,
            H, Lq, Lk, D, float(scale) * _LOG2E)
    cex = dict(HAS_KPM=key_padding_mask is not None, HAS_BIAS=bias is not None, CAUSAL=bool(causal),
               PRECISION=precision or _precision(q.dtype, q.device), BLOCK_D=_d_block(D), BIAS_VEC=vec)
    cfgs = attention_configs(Lq, Lk, D, q.dtype, causal, bias is not None, cc, "fwd")
    return Launch(_fwd_kernel, lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H), args, cex, cfgs,
                  key=_TUNE_KEY, label="flash_attention fwd")


def flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                        causal: bool, scale: float, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Launch the forward.  Returns out (B, H, Lq, Dh) contiguous in q's dtype and the row
    log-sum-exp in base-2 units (B, H, Lq) fp32 (+inf for rows with nothing to attend to)."""
    _check(q, k, v, key_padding_mask, causal, bias)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    if Lk == 0:
        return out.zero_(), lse.fill_(float("inf"))
    _fwd_plan(q, k, v, key_padding_mask, causal, scale, bias, out, lse, launch_arch(q.device)).run()
    return out, lse


def _dbias_buffer(bias: Optional[Tensor], bias_grad: bool, B: int, nb: int, deterministic: Optional[bool],
                  q: Tensor) -> Tuple[Tensor, int, int, Tuple[int, int, int, int]]:
    """(buffer, DBIAS_MODE, nDB, strides): 0 = no bias gradient (a 1-element dummy the kernel never
    touches, not an input tensor: the tuner's reset-to-zero must not reach real data); 1 = one
    (B or nB == B, H, Lq, Lk) fp32 slice per item, plain stores; 2 = (nB, H, Lq, Lk) fp32 atomics."""
    if not bias_grad:
        return torch.zeros(1, dtype=torch.float32, device=q.device), 0, 1, (0, 0, 0, 0)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    per_item = nb == B or deterministic
    ndb = B if per_item else nb
    buf = torch.zeros((ndb,) + tuple(bias.shape[-3:]), dtype=torch.float32, device=q.device)
    return buf, (1 if per_item else 2), ndb, tuple(buf.stride())


def _bwd_plans(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               key_padding_mask: Optional[Tensor], causal: bool, scale: float, bias: Optional[Tensor],
               grads: tuple, delta: Tensor, dbias: tuple, cc: Optional[int],
               precision: Optional[str] = None) -> Tuple[Launch, Launch, Launch]:
    """(preprocess, dK/dV, dQ) launches writing delta, grads = (dq, dk, dv) and the dbias buffer
    (dbias = (buffer, mode, nDB, strides) from `_dbias_buffer`)."""
    dq, dk, dv = grads
    db_buf, mode, ndb, dbs = dbias
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kpm, skpm = _kpm_arg(key_padding_mask, q)
    bptr, bs, nb, vec = _bias_arg(bias, q)
    if mode:
        vec = min(vec, _row_vec(db_buf, Lk))
    has_bias = bias is not None
    common = dict(HAS_KPM=key_padding_mask is not None, HAS_BIAS=has_bias, CAUSAL=bool(causal),
                  PRECISION=precision or _precision(q.dtype, q.device), BLOCK_D=_d_block(D), BIAS_VEC=vec)
    qk_scale = float(scale) * _LOG2E
    cfg = lambda kernel: attention_configs(Lq, Lk, D, q.dtype, causal, has_bias, cc, kernel)  # noqa: E731
    pre = Launch(_bwd_preprocess_kernel, lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H),
                 (out, do, delta, *_strides(out, do), H, Lq, D), dict(BLOCK_D=_d_block(D)),
                 cfg("bwd_preprocess"), key=("Lq", "D"), label="flash_attention bwd preprocess")
    dkdv = Launch(_bwd_dkdv_kernel, lambda m: (triton.cdiv(Lk, m["BLOCK_N"]), B * H),
                  (q, k, v, kpm, bptr, do, lse, delta, dk, dv, *_strides(q, k, v, do, dk, dv), skpm, *bs, nb,
                   H, Lq, Lk, D, float(scale), qk_scale), common, cfg("bwd_dkdv"),
                  key=_TUNE_KEY, label="flash_attention bwd dK/dV")
    dqk = Launch(_bwd_dq_kernel, lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H),
                 (q, k, v, kpm, bptr, db_buf, do, lse, delta, dq, *_strides(q, k, v, do, dq), skpm, *bs, nb,
                  *dbs, ndb, H, Lq, Lk, D, float(scale), qk_scale), dict(common, DBIAS_MODE=mode),
                 cfg("bwd_dq"), key=_TUNE_KEY + ("DBIAS_MODE",), reset_to_zero=("DBIAS",) if mode == 2 else (),
                 label="flash_attention bwd dQ")
    return pre, dkdv, dqk


def flash_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        key_padding_mask: Optional[Tensor], causal: bool, scale: float,
                        bias: Optional[Tensor] = None, bias_grad: bool = False,
                        deterministic: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Launch the backward.  Returns (dq, dk, dv, dbias) contiguous, in the dtypes of q, k, v and
    bias; dbias is None unless `bias_grad`.

    dbias of a bias shared by several batch items (B > nB) is their dS summed: fp32 atomics into an
    (nB, H, Lq, Lk) buffer, or, when `deterministic` (default: torch's deterministic-algorithms
    flag), per-item dS written to a (B, H, Lq, Lk) buffer and summed in torch in a fixed order."""
    q, k, v, out, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out), _unit_last(do)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq = torch.zeros((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.zeros((B, H, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.zeros((B, H, Lk, D), dtype=v.dtype, device=q.device)
    bias_grad = bool(bias_grad and bias is not None)
    nb = 1 if bias is None else (bias.shape[0] if bias.dim() == 4 else 1)
    dbias_buf = _dbias_buffer(bias, bias_grad, B, nb, deterministic, q)
    if dq.numel() == 0 or dk.numel() == 0:
        dbias = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if bias_grad else None
        return dq, dk, dv, dbias
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    for launch in _bwd_plans(do, q, k, v, out, lse, key_padding_mask, causal, scale, bias, (dq, dk, dv), delta,
                             dbias_buf, launch_arch(q.device)):
        launch.run()
    if not bias_grad:
        return dq, dk, dv, None
    db_buf, ndb = dbias_buf[0], dbias_buf[2]
    if ndb != nb:  # per-item dS (B, H, Lq, Lk) -> (nB, H, Lq, Lk): item b = r * nB + j
        db_buf = db_buf.view(B // nb, nb, H, Lq, Lk).sum(0)
    return dq, dk, dv, db_buf.view(bias.shape).to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# custom ops + autograd (the one path, eager and torch.compile: opaque nodes with fake impls)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("valor_fast::flash_attention", mutates_args=())
def _flash_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                        causal: bool, scale: float, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return flash_attention_fwd(q, k, v, key_padding_mask, causal, scale, bias)


@_flash_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, bias=None):
    _check(q, k, v, key_padding_mask, causal, bias)
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("valor_fast::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                            key_padding_mask: Optional[Tensor], causal: bool, scale: float,
                            bias: Optional[Tensor] = None,
                            bias_grad: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = flash_attention_bwd(do, q, k, v, out, lse, key_padding_mask, causal, scale,
                                            bias, bias_grad)
    # a custom op returns tensors only: an empty one stands for "no bias gradient"
    return dq, dk, dv, (q.new_empty(0) if dbias is None else dbias)


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, key_padding_mask, causal, scale, bias=None, bias_grad=False):
    db = bias.new_empty(bias.shape) if (bias is not None and bias_grad) else q.new_empty(0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db)


def _fa_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, bias = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, bias)
    ctx.causal, ctx.scale = causal, scale


def _fa_backward(ctx, dout, _dlse):
    q, k, v, out, lse, kpm, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[6]
    dq, dk, dv, dbias = _flash_attention_bwd_op(dout, q, k, v, out, lse, kpm, ctx.causal, ctx.scale,
                                                bias, bias_grad)
    return dq, dk, dv, None, None, None, (dbias if bias_grad else None)


_flash_attention_op.register_autograd(_fa_backward, setup_context=_fa_setup_context)


# ----------------------------------------------------------------------------------------------
# functional entry point
# ----------------------------------------------------------------------------------------------
def flash_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                    causal: bool = False, scale: Optional[float] = None, *,
                    bias: Optional[Tensor] = None) -> Tensor:
    """Triton flash attention.  q (B, H, Lq, Dh), k/v (B, H, Lk, Dh) -> (B, H, Lq, Dh) in q's
    dtype; key_padding_mask (B, Lk) bool True = attend; causal needs Lq == Lk; scale defaults to
    Dh ** -0.5; bias additive on the scaled scores, (H, Lq, Lk) or (nB, H, Lq, Lk) with item b
    using bias[b % nB] (see `check_bias`), finite or -inf (a row whose every key is -inf or masked
    outputs zeros).  Differentiable in q, k, v and bias."""
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        raise TypeError(f"flash_attention: key_padding_mask must be bool (True = attend), "
                        f"got {key_padding_mask.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _flash_attention_op(q, k, v, key_padding_mask, bool(causal), scale, bias)
    return out


__all__ = ["attention_ref", "flash_attention", "flash_attention_fwd", "flash_attention_bwd",
           "attention_configs", "ATTN_KERNELS", "MAX_HEAD_DIM", "check_bias"]
