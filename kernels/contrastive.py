"""Fused contrastive (MGA) losses: tiled symmetric InfoNCE and grouped fine similarity.

Contents, in order: the plain-PyTorch references (`fine_similarity_ref`, `info_nce_ref`,
`contrastive_loss_ref`, `grouped_contrastive_loss_ref`: the one spec shared by the tests and the
benchmark), the kernel limits (`MAX_D`, `MAX_T`, `MAX_SLOTS`, `DTYPES`: read by the dispatcher,
never copied), the Triton kernels, and the launcher API that valor_fast.ops composes into custom
ops (the same four functions, same signatures, as the CUDA C++ backend in valor_fast.ops._cuda):
    coarse_lse(a, b, temp, lab_off, valid_b)            -> (lse, label logit)   per row of a
    coarse_grad(a, b, temp, scale, lse_a, lse_b, lab_off, lab_coef, tsum, valid_a, valid_b)
                                                          -> (d a, row sums of P * z)
    fine_fwd(text, wt, tmask, x, y, mw, mmask)           -> S (G, Bt, Bm)
    fine_bwd(dS, text, wt, tmask, x, y, mw, mmask)       -> (d text, d wt, d x, d y, d mw)
plus `check_coarse_args` / `prepare_fine_args` (validation and layout, shared by both backends).

coarse  text (B, D) x modal (B, D), z = text @ modal^T / tau.  The (B, B) logits are never stored:
        forward: `coarse_lse` streams column tiles of the other side and keeps an online
                 log-sum-exp per row; it runs twice (text rows vs modal columns, modal rows vs
                 text columns), so only lse_t (B,) and lse_m (B,) and the label logits are saved.
                 A second pass instead of column atomics keeps it deterministic.
        backward: FlashAttention style: `coarse_grad` recomputes z tiles and forms
                 P = exp(z - lse_row) + exp(z - lse_col) - 2 * onehot(label), then dA = P @ B.
                 The same kernel gives d_modal with the roles swapped (z^T, lse swapped), and the
                 temperature gradient from sum(P * z).  D (up to 1024) is split over the grid's
                 second axis (BD columns of dA per program) so the fp32 accumulator fits in
                 registers; the price is recomputing z once per D block.
        valid:   (B,) masks of the samples that take part: excluded columns leave every
                 log-sum-exp, excluded rows and columns get P = 0 (uint8 loads next to the
                 tiles, a constexpr switch, so unmasked calls compile as before).
        local:   rows are this rank's B, columns all ranks' N*B (labels offset by rank*B); the
                 same two kernels run on the rectangles, with the label diagonal shifted.

fine    text (Bt, T, D), modal groups x (Bm, Mx, D) and optionally y (Bm, My, D).  Each clip's
        tokens are laid out in P = next_pow2(Mx + My) "slots" (x tokens, then y tokens), and one
        program scores one text against BB clips: a (TP, BB*P) tile of token sims from one tl.dot,
        reshaped to (TP, BB, P).  From that one read of the features come the three groups:
            x  : text-side max over x slots, modal-side softmax(w_x) over x slots
            y  : same over y slots
            xy : text-side max = max(max_x, max_y); modal side over the concatenated softmax
        so T-V, T-A and T-AV share one pass, and (Bt, Bm, T, M) never exists.
        backward: the max is routed to its argmax.  Choice: *recompute* the tile and its argmaxes
                 (tl.argmax, first index on ties, like torch.max) instead of storing indices.
                 Stored int8 indices would be Bt*Bm*(T + Mx + My) bytes: 755 MB at B=4096,
                 T=40, 4 frames + 1 audio (3 GB at B=8192), read back D/BD times; recompute
                 costs no memory and one extra token-sim matmul per D block (4 at D=512 with
                 BD=128 on CUDA; BD is the knob to tune against register pressure).  Two kernels:
                 d_text (+ text weight grads) per (text, D block) looping over clip blocks,
                 d_modal (+ modal weight grads) per (clip block, D block) looping over texts;
                 both build the same sparse d_sim tile (two nonzeros per text token and group,
                 one per modal token) and multiply it by the features.
        The InfoNCE on the (Bt, Bm) S matrices is torch (B <= ~8k: a B x B matrix per group is
        fine; it is the T x M factor that had to go), so valid masks need nothing here.

Numerics: 16-bit inputs go to tl.dot as-is (exact products, fp32 accumulation); fp32 inputs use
tf32 when torch allows it for matmuls, else tf32x3.  The gradient products (fp32 P / d_sim times
features) use tf32x3 (tf32 when allowed for fp32 inputs), so bf16/fp16 gradients are within an
output rounding of eager's fp32 math.  Under TRITON_INTERPRET (CPU) everything is upcast to fp32
IEEE (the interpreter's bf16 dot is wrong: `mma` in kernels/_common.py).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import mma
from ._compat import tl, triton  # noqa: F401  (no-op stand-ins without triton)

NEG = float("-inf")


# ----------------------------------------------------------------------------------------------
# references (plain PyTorch, any dtype incl. float64; host syncs allowed: they are the spec)
# ----------------------------------------------------------------------------------------------
def acc_dtype(x: Tensor) -> Tensor:
    """x in fp32 at least; float64 stays float64 (the tests' reference precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_fine_inputs(text, text_weight, text_mask, modal, modal_weight, modal_mask) -> None:
    if text.dim() != 3 or modal.dim() != 3:
        raise ValueError(f"fine similarity needs text (B, T, D) and modal (B, M, D); got "
                         f"text {tuple(text.shape)}, modal {tuple(modal.shape)}")
    if text.shape[-1] != modal.shape[-1]:
        raise ValueError(f"feature sizes differ: text D={text.shape[-1]}, modal D={modal.shape[-1]}")
    for name, t, ref in (("text_weight", text_weight, text), ("text_mask", text_mask, text),
                         ("modal_weight", modal_weight, modal), ("modal_mask", modal_mask, modal)):
        if t is not None and tuple(t.shape) != tuple(ref.shape[:2]):
            raise ValueError(f"{name} must be {tuple(ref.shape[:2])}, got {tuple(t.shape)}")


def masked_softmax(w: Optional[Tensor], mask: Optional[Tensor], like: Tensor) -> Tensor:
    """(B, N) weight logits -> softmax over the real tokens (mask True); uniform without weights."""
    if w is None:
        w = torch.zeros(like.shape[:2], dtype=torch.float32, device=like.device)
    w = acc_dtype(w)
    if mask is not None:
        w = w.masked_fill(~mask, NEG)
    return torch.softmax(w, dim=-1)


def check_text_floor(text_floor: Optional[Tensor], Bt: int) -> None:
    """text_floor: None or a (Bt,) bool mask, True = floor that text's modal-side maxima at 0."""
    if text_floor is None:
        return
    if not isinstance(text_floor, Tensor) or text_floor.dtype != torch.bool or tuple(text_floor.shape) != (Bt,):
        got = (f"{tuple(text_floor.shape)} {text_floor.dtype}" if isinstance(text_floor, Tensor)
               else type(text_floor).__name__)
        raise ValueError(f"text_floor must be a ({Bt},) bool tensor (True = that text's modal-side max is "
                         f"floored at 0, upstream's padded max), got {got}")


def upstream_text_floor(text_mask: Tensor, positions: int) -> Tensor:
    """Upstream VALOR's floor rule (docs/upstream.md, P1): it pads every caption to `positions`
    (max_txt_len + 2 = 42) and multiplies padded similarities by 0, so every caption with fewer
    real tokens than that has its modal-side max floored at 0.  (Bt, T) bool -> (Bt,) bool."""
    return text_mask.sum(dim=1) < positions


def fine_similarity_ref(text, text_weight, text_mask, modal, modal_weight, modal_mask,
                        text_floor: Optional[Tensor] = None) -> Tensor:
    """VALOR's weighted token-wise max-similarity, eager: materialises (Bt, Bm, T, M).

    S(a, b) = 1/2 [ sum_i softmax(w_a)_i max_j <a_i, b_j> + sum_j softmax(w_b)_j max_i <a_i, b_j> ]
    with padded tokens excluded from the max and the softmax.

    text_floor (Bt,) bool: where True, text a's modal-side maxima are max(0, max_i <a_i, b_j>)
    (upstream multiplies padded similarities by 0, so a padded caption's padding takes part in
    that max as an exact 0; docs/upstream.md P1).  A floored slot (max < 0) passes no gradient; a
    max of exactly 0 is not floored, so the tie goes to the real token.  The text side and the
    weights are unchanged.
    """
    check_fine_inputs(text, text_weight, text_mask, modal, modal_weight, modal_mask)
    check_text_floor(text_floor, text.shape[0])
    sim = torch.einsum("atd,bmd->abtm", acc_dtype(text), acc_dtype(modal))  # (Bt, Bm, T, M)
    if modal_mask is not None:
        sim_t = sim.masked_fill(~modal_mask[None, :, None, :], NEG)
    else:
        sim_t = sim
    if text_mask is not None:
        sim_m = sim.masked_fill(~text_mask[:, None, :, None], NEG)
    else:
        sim_m = sim
    t2m = sim_t.max(dim=-1).values  # (Bt, Bm, T): best modal token for each text token
    m2t = sim_m.max(dim=-2).values  # (Bt, Bm, M): best text token for each modal token
    if text_floor is not None:  # strict: an exact 0 keeps its gradient on the real token
        m2t = torch.where(text_floor[:, None, None] & (m2t < 0), torch.zeros_like(m2t), m2t)
    wt = masked_softmax(text_weight, text_mask, text)    # (Bt, T)
    wm = masked_softmax(modal_weight, modal_mask, modal)  # (Bm, M)
    # padded rows hold -inf maxima but zero weight: zero them so 0 * -inf does not give nan
    t2m = torch.where(wt[:, None, :] > 0, t2m, torch.zeros_like(t2m))
    m2t = torch.where(wm[None, :, :] > 0, m2t, torch.zeros_like(m2t))
    s_t = (t2m * wt[:, None, :]).sum(-1)
    s_m = (m2t * wm[None, :, :]).sum(-1)
    return 0.5 * (s_t + s_m)


def check_valid(valid: Optional[Tensor], B: int, name: str = "valid") -> None:
    """valid: None or a (B,) bool mask of the samples that take part."""
    if valid is None:
        return
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B,):
        got = f"{tuple(valid.shape)} {valid.dtype}" if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(f"{name} must be a ({B},) bool tensor (True = sample takes part), got {got}")


def check_valid_groups(valid: Optional[Dict[str, Tensor]], groups: dict, B: int) -> None:
    """valid: None or a dict group name -> (B,) bool mask, every name one of `groups`."""
    if valid is None:
        return
    if not isinstance(valid, dict):
        raise ValueError(f"valid must be a dict group name -> (B,) bool mask, got {type(valid).__name__}")
    for name, v in valid.items():
        if name not in groups:
            raise ValueError(f"valid names group {name!r}, which is not among the groups {sorted(groups)}")
        check_valid(v, B, f"valid[{name!r}]")


def info_nce_ref(sim: Tensor, temperature: Tensor) -> Tensor:
    """Symmetric InfoNCE over a (B, B) similarity with matches on the diagonal."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"InfoNCE needs a square (B, B) similarity, got {tuple(sim.shape)}")
    logits = acc_dtype(sim) / acc_dtype(temperature)
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def contrastive_loss_ref(text, modal, temperature, *, mode="coarse", text_weight=None, text_mask=None,
                         modal_weight=None, modal_mask=None, valid=None, text_floor=None) -> Tensor:
    """Symmetric InfoNCE between text and one modality, eager (materialises B x B, and for fine
    B x B x T x M).  valid (B,) bool: the loss of the valid samples' sub-batch, exactly 0 below 2
    of them (selected by indexing, a host sync: the dispatched ops mask without one).
    text_floor (B,) bool, fine only: see `fine_similarity_ref`."""
    if text_floor is not None and mode != "fine":
        raise ValueError(f"text_floor is for mode='fine' (the modal-side token max), got mode={mode!r}")
    if valid is not None:
        check_valid(valid, text.shape[0])
        idx = valid.nonzero().squeeze(1)
        kw = dict(text_weight=text_weight, text_mask=text_mask, modal_weight=modal_weight, modal_mask=modal_mask,
                  text_floor=text_floor)
        if idx.numel() < 2:  # zero, still connected to every input (their gradients are zeros)
            return 0.0 * contrastive_loss_ref(text, modal, temperature, mode=mode, **kw)
        sub = {k: None if v is None else v[idx] for k, v in kw.items()}
        return contrastive_loss_ref(text[idx], modal[idx], temperature, mode=mode, **sub)
    if mode == "coarse":
        if text.dim() != 2 or modal.dim() != 2 or text.shape != modal.shape:
            raise ValueError(f"coarse mode needs text and modal of equal shape (B, D); got "
                             f"{tuple(text.shape)} and {tuple(modal.shape)}")
        sim = acc_dtype(text) @ acc_dtype(modal).t()
    elif mode == "fine":
        sim = fine_similarity_ref(text, text_weight, text_mask, modal, modal_weight, modal_mask, text_floor)
    else:
        raise ValueError(f"mode must be 'coarse' or 'fine', got {mode!r}")
    return info_nce_ref(sim, temperature)


GroupSpec = Union[Tensor, Tuple]


def is_concat(spec) -> bool:
    """A fine-mode group that concatenates other groups: a tuple of group names."""
    return isinstance(spec, tuple) and len(spec) > 0 and all(isinstance(s, str) for s in spec)


def resolve_groups(groups: Dict[str, GroupSpec], mode: str) -> Dict[str, GroupSpec]:
    """Expand a fine-mode ("v", "a") concatenation spec into (modal, weight, mask)."""
    out = {}
    for name, spec in groups.items():
        if mode == "fine" and is_concat(spec):
            parts = []
            for s in spec:
                if s not in groups or is_concat(groups[s]):
                    raise ValueError(f"group {name!r} concatenates {spec}, but {s!r} is not a plain group")
                parts.append(groups[s])
            modal = torch.cat([p[0] for p in parts], dim=1)
            ws = [p[1] if p[1] is not None else torch.zeros(p[0].shape[:2], device=p[0].device) for p in parts]
            ms = [p[2] if p[2] is not None else torch.ones(p[0].shape[:2], dtype=torch.bool, device=p[0].device)
                  for p in parts]
            out[name] = (modal, torch.cat(ws, dim=1), torch.cat(ms, dim=1))
        else:
            out[name] = spec
    return out


def grouped_contrastive_loss_ref(text, groups, temperature, *, mode, text_weight=None, text_mask=None,
                                 valid=None, text_floor=None) -> Dict[str, Tensor]:
    """Loss per group (see valor_fast.ops.grouped_contrastive_loss for the group specs)."""
    check_valid_groups(valid, groups, text.shape[0])
    if text_floor is not None and mode != "fine":
        raise ValueError(f"text_floor is for mode='fine' (the modal-side token max), got mode={mode!r}")
    valid = valid or {}
    res = {}
    for name, spec in resolve_groups(groups, mode).items():
        if mode == "fine":
            modal, mw, mm = spec
            res[name] = contrastive_loss_ref(text, modal, temperature, mode="fine", text_weight=text_weight,
                                             text_mask=text_mask, modal_weight=mw, modal_mask=mm,
                                             valid=valid.get(name), text_floor=text_floor)
        else:
            res[name] = contrastive_loss_ref(text, spec, temperature, mode="coarse", valid=valid.get(name))
    return res


# ----------------------------------------------------------------------------------------------
# kernel limits (the dispatcher reads these; the CUDA C++ kernels enforce the same ones)
# ----------------------------------------------------------------------------------------------
MAX_D = 1024       # feature size: the D loop of the z tiles, BD-wide gradient blocks
MAX_T = 128        # text tokens (TP rows of the fine tile)
MAX_SLOTS = 128    # modal tokens per clip, Mx + My (P slots of the fine tile)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# coarse: Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _coarse_z_tile(A, Bp, rows, cols, rmask, cmask, D, sa, sb,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """A[rows] @ Bp[cols]^T as a (BM, BN) fp32 tile (masked rows / cols are 0)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < D
        a = tl.load(A + rows[:, None] * sa + ks[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(Bp + cols[None, :] * sb + ks[:, None], mask=cmask[None, :] & km[:, None], other=0.0)
        acc += mma(a, b, PREC)  # (BM, BK) @ (BK, BN)
    return acc


@triton.jit
def _coarse_lse_kernel(
    A, Bp, Temp, VB, LSE, ZL,  # A (Ra, D) rows, Bp (Rb, D) columns; VB (Rb,) uint8; LSE / ZL (Ra,) fp32 out
    Ra, Rb, D, sa, sb, lab_off,
    HAS_VALID: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """Per row i of A: logsumexp_j z_ij over the (valid) columns and the label logit
    z_{i, i + lab_off}.  A row with no valid column stores lse = +inf (its P is then 0)."""
    pid = tl.program_id(0)
    rows = (pid * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < Ra
    inv_t = 1.0 / tl.load(Temp).to(tl.float32)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BM,), dtype=tl.float32)
    zl = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, Rb, BN):
        cols = (n0 + tl.arange(0, BN)).to(tl.int64)
        cmask = cols < Rb
        z = _coarse_z_tile(A, Bp, rows, cols, rmask, cmask, D, sa, sb, BM, BN, BK, PREC) * inv_t
        zl += tl.sum(tl.where(cols[None, :] == rows[:, None] + lab_off, z, 0.0), axis=1)
        if HAS_VALID:
            live = cmask & (tl.load(VB + cols, mask=cmask, other=0) != 0)
            z = tl.where(live[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            # a tile of excluded columns can leave m_new = -inf: shift by 0 there (exp(-inf) = 0)
            m_sh = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            z = tl.where(cmask[None, :], z, float("-inf"))
            # every tile holds >= 1 live column, so m_new is finite and exp(m_i - m_new) never sees inf - inf
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_sh = m_new
        s_i = s_i * tl.exp(m_i - m_sh) + tl.sum(tl.exp(z - m_sh[:, None]), axis=1)
        m_i = m_new
    if HAS_VALID:
        lse = tl.where(s_i > 0, m_i + tl.log(tl.where(s_i > 0, s_i, 1.0)), float("inf"))
    else:
        lse = m_i + tl.log(s_i)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(ZL + rows, zl, mask=rmask)


@triton.jit
def _coarse_grad_kernel(
    A, Bp, Temp, Scale, LSE_A, LSE_B, VA, VB, DA, TSUM,  # VA (Ra,) / VB (Rb,) uint8; DA (Ra, D) out (A's dtype); TSUM (Ra,) fp32 out
    Ra, Rb, D, sa, sb, sda, lab_off, lab_coef,
    HAS_LSE_A: tl.constexpr, HAS_LSE_B: tl.constexpr, HAS_VALID: tl.constexpr, COMPUTE_TSUM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr, GPREC: tl.constexpr,
):
    """dA[i, dblock] = scale * sum_j P_ij B[j, dblock] with
    P_ij = exp(z_ij - lse_a_i) [HAS_LSE_A] + exp(z_ij - lse_b_j) [HAS_LSE_B] - lab_coef [j == i + lab_off],
    and P_ij = 0 where row i or column j is excluded [HAS_VALID];
    TSUM_i = sum_j P_ij z_ij (the temperature gradient, up to a factor), written by D block 0."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < Ra
    dcols = pid_d * BD + tl.arange(0, BD)
    dmask = dcols < D
    inv_t = 1.0 / tl.load(Temp).to(tl.float32)
    scale = tl.load(Scale)
    if HAS_LSE_A:
        lse_a = tl.load(LSE_A + rows, mask=rmask, other=0.0)
    rlive = rmask
    if HAS_VALID:
        rlive = rmask & (tl.load(VA + rows, mask=rmask, other=0) != 0)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    tacc = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, Rb, BN):
        cols = (n0 + tl.arange(0, BN)).to(tl.int64)
        cmask = cols < Rb
        z = _coarse_z_tile(A, Bp, rows, cols, rmask, cmask, D, sa, sb, BM, BN, BK, PREC) * inv_t
        p = tl.where(cols[None, :] == rows[:, None] + lab_off, -lab_coef, 0.0)
        if HAS_LSE_A:
            p += tl.exp(z - lse_a[:, None])
        if HAS_LSE_B:
            lse_b = tl.load(LSE_B + cols, mask=cmask, other=0.0)
            p += tl.exp(z - lse_b[None, :])
        clive = cmask
        if HAS_VALID:
            clive = cmask & (tl.load(VB + cols, mask=cmask, other=0) != 0)
        p = tl.where(rlive[:, None] & clive[None, :], p, 0.0)
        if COMPUTE_TSUM:
            tacc += tl.sum(p * z, axis=1)
        b = tl.load(Bp + cols[:, None] * sb + dcols[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc += mma(p, b, GPREC)  # (BM, BN) @ (BN, BD)
    acc = acc * scale
    tl.store(DA + rows[:, None] * sda + dcols[None, :], acc.to(DA.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    if COMPUTE_TSUM:
        if pid_d == 0:
            tl.store(TSUM + rows, tacc, mask=rmask)


# ----------------------------------------------------------------------------------------------
# fine: Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fine_sim_tile(Text, a, st_b, st_t, Xp, Yp, sx_b, sx_m, sy_b, sy_m, b0, Bm, T, Mx, My, D,
                   TP: tl.constexpr, BB: tl.constexpr, P: tl.constexpr, BK: tl.constexpr,
                   PREC: tl.constexpr):
    """Token sims of text a against clips b0 .. b0+BB: (TP, BB*P) fp32, column c = clip c // P,
    slot c % P (x tokens in slots [0, Mx), y tokens in [Mx, Mx + My)); padding columns are 0."""
    t = tl.arange(0, TP)
    c = tl.arange(0, BB * P)
    s = c % P
    b = (b0 + c // P).to(tl.int64)
    live = (b < Bm) & (s < Mx + My)
    isx = s < Mx
    xoff = b * sx_b + s * sx_m
    yoff = b * sy_b + (s - Mx) * sy_m
    acc = tl.zeros((TP, BB * P), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < D
        ta = tl.load(Text + a * st_b + t[:, None] * st_t + ks[None, :],
                     mask=(t < T)[:, None] & km[None, :], other=0.0)  # (TP, BK)
        xv = tl.load(Xp + xoff[None, :] + ks[:, None], mask=(live & isx)[None, :] & km[:, None], other=0.0)
        yv = tl.load(Yp + yoff[None, :] + ks[:, None], mask=(live & ~isx)[None, :] & km[:, None], other=0.0)
        acc += mma(ta, xv + yv, PREC)  # (TP, BK) @ (BK, BB*P)
    return acc


@triton.jit
def _fine_masks(WT, TM, MW, MM, a, b0, Bm, T, Mx, My, s_mw_g, HAS_Y: tl.constexpr,
                TP: tl.constexpr, BB: tl.constexpr, P: tl.constexpr):
    """Token validity and softmaxed weights around one (text a, clip block) tile."""
    t = tl.arange(0, TP)
    tin = t < T
    tval = tin & (tl.load(TM + a * T + t, mask=tin, other=0) != 0)   # (TP,) real text tokens
    wt = tl.load(WT + a * T + t, mask=tin, other=0.0)                # (TP,) softmax(w_text), 0 at padding
    b = (b0 + tl.arange(0, BB)).to(tl.int64)
    bval = b < Bm
    s = tl.arange(0, P)
    S_ = Mx + My
    moff = b[:, None] * S_ + s[None, :]
    mm = bval[:, None] & (s < S_)[None, :]
    mval = mm & (tl.load(MM + moff, mask=mm, other=0) != 0)          # (BB, P) real modal tokens
    wx = tl.load(MW + moff, mask=mm, other=0.0)                       # (BB, P) group x weights
    xmask = mval & (s < Mx)[None, :]
    if HAS_Y:
        wy = tl.load(MW + s_mw_g + moff, mask=mm, other=0.0)
        wxy = tl.load(MW + 2 * s_mw_g + moff, mask=mm, other=0.0)
        ymask = mval & (s >= Mx)[None, :]
    else:
        wy = wx
        wxy = wx
        ymask = xmask
    return tval, wt, b, bval, xmask, ymask, wx, wy, wxy


@triton.jit
def _fine_fwd_kernel(
    Text, WT, TM, Xp, Yp, MW, MM, S,  # S (G, Bt, Bm) fp32 out
    Bt, Bm, T, Mx, My, D,
    st_b, st_t, sx_b, sx_m, sy_b, sy_m, s_mw_g, s_s_g,
    HAS_Y: tl.constexpr, TP: tl.constexpr, BB: tl.constexpr, P: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    a = tl.program_id(0).to(tl.int64)
    b0 = tl.program_id(1) * BB
    sim = _fine_sim_tile(Text, a, st_b, st_t, Xp, Yp, sx_b, sx_m, sy_b, sy_m, b0, Bm, T, Mx, My, D,
                         TP, BB, P, BK, PREC)
    sim3 = tl.reshape(sim, (TP, BB, P))
    tval, wt, b, bval, xmask, ymask, wx, wy, wxy = _fine_masks(WT, TM, MW, MM, a, b0, Bm, T, Mx, My, s_mw_g,
                                                               HAS_Y, TP, BB, P)
    # text side: best modal token of the group for each text token, softmax(w_text)-weighted
    t2m_x = tl.max(tl.where(xmask[None, :, :], sim3, float("-inf")), axis=2)  # (TP, BB)
    wpos = wt[:, None] > 0
    st_x = tl.sum(wt[:, None] * tl.where(wpos, t2m_x, 0.0), axis=0)  # (BB,)
    # modal side: best real text token for each modal slot, weighted by the group's softmax
    m2t = tl.max(tl.where(tval[:, None, None], sim3, float("-inf")), axis=0)  # (BB, P)
    sm_x = tl.sum(wx * tl.where(wx > 0, m2t, 0.0), axis=1)
    out = S + a * Bm + b
    tl.store(out, 0.5 * (st_x + sm_x), mask=bval)
    if HAS_Y:
        t2m_y = tl.max(tl.where(ymask[None, :, :], sim3, float("-inf")), axis=2)
        t2m_xy = tl.maximum(t2m_x, t2m_y)  # max over the concatenation = max of the two maxima
        st_y = tl.sum(wt[:, None] * tl.where(wpos, t2m_y, 0.0), axis=0)
        st_xy = tl.sum(wt[:, None] * tl.where(wpos, t2m_xy, 0.0), axis=0)
        sm_y = tl.sum(wy * tl.where(wy > 0, m2t, 0.0), axis=1)
        sm_xy = tl.sum(wxy * tl.where(wxy > 0, m2t, 0.0), axis=1)
        tl.store(out + s_s_g, 0.5 * (st_y + sm_y), mask=bval)
        tl.store(out + 2 * s_s_g, 0.5 * (st_xy + sm_xy), mask=bval)


@triton.jit
def _fine_dsim(sim3, DS, a, b, bval, Bm, s_ds_g, tval, wt, xmask, ymask, wx, wy, wxy,
               HAS_Y: tl.constexpr, TP: tl.constexpr, BB: tl.constexpr, P: tl.constexpr):
    """d loss / d sim for one (text a, clip block) tile, (TP, BB, P) fp32: the upstream dS of
    each group routed to the argmax positions; plus the finite maxima for the weight grads."""
    t = tl.arange(0, TP)
    s = tl.arange(0, P)
    dsx = tl.load(DS + a * Bm + b, mask=bval, other=0.0)  # (BB,)
    simx = tl.where(xmask[None, :, :], sim3, float("-inf"))
    t2m_x = tl.max(simx, axis=2)                               # (TP, BB)
    ax = tl.argmax(simx, axis=2, tie_break_left=True)          # (TP, BB) first max, like torch
    hx = s[None, None, :] == ax[:, :, None]                    # (TP, BB, P) one-hot
    fx = tl.where(t2m_x > float("-inf"), t2m_x, 0.0)                     # finite maxima (clip with no x token: 0)
    m2t = tl.max(tl.where(tval[:, None, None], sim3, float("-inf")), axis=0)   # (BB, P)
    am = tl.argmax(tl.where(tval[:, None, None], sim3, float("-inf")), axis=0, tie_break_left=True)  # (BB, P)
    fm = tl.where(m2t > float("-inf"), m2t, 0.0)
    if HAS_Y:
        dsy = tl.load(DS + s_ds_g + a * Bm + b, mask=bval, other=0.0)
        dsxy = tl.load(DS + 2 * s_ds_g + a * Bm + b, mask=bval, other=0.0)
        simy = tl.where(ymask[None, :, :], sim3, float("-inf"))
        t2m_y = tl.max(simy, axis=2)
        ay = tl.argmax(simy, axis=2, tie_break_left=True)
        hy = s[None, None, :] == ay[:, :, None]
        fy = tl.where(t2m_y > float("-inf"), t2m_y, 0.0)
        xwin = t2m_x >= t2m_y  # ties go to x: torch.max over cat([x, y]) returns the first index
        cx = dsx[None, :] + tl.where(xwin, dsxy[None, :], 0.0)   # (TP, BB)
        cy = dsy[None, :] + tl.where(xwin, 0.0, dsxy[None, :])
        dsim = tl.where(hx, cx[:, :, None], 0.0) + tl.where(hy, cy[:, :, None], 0.0)
        gt = dsx[None, :] * fx + dsy[None, :] * fy + dsxy[None, :] * tl.maximum(fx, fy)  # (TP, BB)
        cm = wx * dsx[:, None] + wy * dsy[:, None] + wxy * dsxy[:, None]                # (BB, P)
    else:
        dsy = dsx
        dsxy = dsx
        dsim = tl.where(hx, dsx[None, :, None], 0.0)
        gt = dsx[None, :] * fx
        cm = wx * dsx[:, None]
    # text side carries 1/2 softmax(w_text)_i (zero for padded tokens), modal side 1/2 w_m
    dsim = dsim * (0.5 * wt)[:, None, None]
    dsim += tl.where(t[:, None, None] == am[None, :, :], 0.5 * cm[None, :, :], 0.0)
    return dsim, gt, fm, dsx, dsy, dsxy


@triton.jit
def _fine_bwd_text_kernel(
    Text, WT, TM, Xp, Yp, MW, MM, DS, DText, GWT,  # DText (Bt, T, D) text dtype; GWT (Bt, T) fp32
    Bt, Bm, T, Mx, My, D,
    st_b, st_t, sx_b, sx_m, sy_b, sy_m, s_mw_g, s_ds_g, sdt_b, sdt_t,
    HAS_Y: tl.constexpr, TP: tl.constexpr, BB: tl.constexpr, P: tl.constexpr, BK: tl.constexpr,
    BD: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
):
    a = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    t = tl.arange(0, TP)
    dcols = pid_d * BD + tl.arange(0, BD)
    dmask = dcols < D
    acc = tl.zeros((TP, BD), dtype=tl.float32)
    gwt = tl.zeros((TP,), dtype=tl.float32)
    c = tl.arange(0, BB * P)
    s = c % P
    for b0 in range(0, Bm, BB):
        sim = _fine_sim_tile(Text, a, st_b, st_t, Xp, Yp, sx_b, sx_m, sy_b, sy_m, b0, Bm, T, Mx, My, D,
                             TP, BB, P, BK, PREC)
        sim3 = tl.reshape(sim, (TP, BB, P))
        tval, wt, b, bval, xmask, ymask, wx, wy, wxy = _fine_masks(WT, TM, MW, MM, a, b0, Bm, T, Mx, My,
                                                                   s_mw_g, HAS_Y, TP, BB, P)
        dsim, gt, fm, dsx, dsy, dsxy = _fine_dsim(sim3, DS, a, b, bval, Bm, s_ds_g, tval, wt, xmask, ymask,
                                                  wx, wy, wxy, HAS_Y, TP, BB, P)
        gwt += 0.5 * tl.sum(gt, axis=1)
        # feature columns of the tile, (BB*P, BD)
        bc = (b0 + c // P).to(tl.int64)
        live = (bc < Bm) & (s < Mx + My)
        isx = s < Mx
        xv = tl.load(Xp + (bc * sx_b + s * sx_m)[:, None] + dcols[None, :],
                     mask=(live & isx)[:, None] & dmask[None, :], other=0.0)
        yv = tl.load(Yp + (bc * sy_b + (s - Mx) * sy_m)[:, None] + dcols[None, :],
                     mask=(live & ~isx)[:, None] & dmask[None, :], other=0.0)
        acc += mma(tl.reshape(dsim, (TP, BB * P)), xv + yv, GPREC)
    tl.store(DText + a * sdt_b + t[:, None] * sdt_t + dcols[None, :], acc.to(DText.dtype.element_ty),
             mask=(t < T)[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(GWT + a * T + t, gwt, mask=t < T)


@triton.jit
def _fine_bwd_modal_kernel(
    Text, WT, TM, Xp, Yp, MW, MM, DS, DX, DY, GMW,  # DX/DY like Xp/Yp; GMW (G, Bm, Mx+My) fp32
    Bt, Bm, T, Mx, My, D,
    st_b, st_t, sx_b, sx_m, sy_b, sy_m, s_mw_g, s_ds_g, sdx_b, sdx_m, sdy_b, sdy_m,
    HAS_Y: tl.constexpr, TP: tl.constexpr, BB: tl.constexpr, P: tl.constexpr, BK: tl.constexpr,
    BD: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
):
    b0 = tl.program_id(0) * BB
    pid_d = tl.program_id(1)
    t = tl.arange(0, TP)
    dcols = pid_d * BD + tl.arange(0, BD)
    dmask = dcols < D
    acc = tl.zeros((BB * P, BD), dtype=tl.float32)
    gx = tl.zeros((BB, P), dtype=tl.float32)
    gy = tl.zeros((BB, P), dtype=tl.float32)
    gxy = tl.zeros((BB, P), dtype=tl.float32)
    for a in range(0, Bt):
        sim = _fine_sim_tile(Text, a, st_b, st_t, Xp, Yp, sx_b, sx_m, sy_b, sy_m, b0, Bm, T, Mx, My, D,
                             TP, BB, P, BK, PREC)
        sim3 = tl.reshape(sim, (TP, BB, P))
        tval, wt, b, bval, xmask, ymask, wx, wy, wxy = _fine_masks(WT, TM, MW, MM, a, b0, Bm, T, Mx, My,
                                                                   s_mw_g, HAS_Y, TP, BB, P)
        dsim, gt, fm, dsx, dsy, dsxy = _fine_dsim(sim3, DS, a, b, bval, Bm, s_ds_g, tval, wt, xmask, ymask,
                                                  wx, wy, wxy, HAS_Y, TP, BB, P)
        gx += 0.5 * dsx[:, None] * fm
        if HAS_Y:
            gy += 0.5 * dsy[:, None] * fm
            gxy += 0.5 * dsxy[:, None] * fm
        ta = tl.load(Text + a * st_b + t[:, None] * st_t + dcols[None, :],
                     mask=(t < T)[:, None] & dmask[None, :], other=0.0)  # (TP, BD)
        acc += mma(tl.trans(tl.reshape(dsim, (TP, BB * P))), ta, GPREC)  # (BB*P, TP) @ (TP, BD)
    c = tl.arange(0, BB * P)
    s = c % P
    bc = (b0 + c // P).to(tl.int64)
    live = (bc < Bm) & (s < Mx + My)
    isx = s < Mx
    tl.store(DX + (bc * sdx_b + s * sdx_m)[:, None] + dcols[None, :], acc.to(DX.dtype.element_ty),
             mask=(live & isx)[:, None] & dmask[None, :])
    if HAS_Y:
        tl.store(DY + (bc * sdy_b + (s - Mx) * sdy_m)[:, None] + dcols[None, :], acc.to(DY.dtype.element_ty),
                 mask=(live & ~isx)[:, None] & dmask[None, :])
    # modal weight grads (w.r.t. the softmaxed weights), written by D block 0
    bb = (b0 + tl.arange(0, BB)).to(tl.int64)
    sp = tl.arange(0, P)
    goff = bb[:, None] * (Mx + My) + sp[None, :]
    gm = (bb < Bm)[:, None] & (sp < Mx + My)[None, :]
    if pid_d == 0:
        tl.store(GMW + goff, gx, mask=gm)
        if HAS_Y:
            tl.store(GMW + s_mw_g + goff, gy, mask=gm)
            tl.store(GMW + 2 * s_mw_g + goff, gxy, mask=gm)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _precisions(dtype: torch.dtype, device: torch.device) -> Tuple[str, str]:
    """(PREC for the feature products, GPREC for the fp32-by-feature gradient products)."""
    if device.type != "cuda":  # only reachable under TRITON_INTERPRET
        return "upcast", "ieee"
    if dtype == torch.float32:
        p = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
        return p, p
    return "native", "tf32x3"


def _grad_buffer(x: Tensor, zero: bool = False) -> Tensor:
    """Gradient output for `x`.  The Triton CPU interpreter casts fp32 -> bf16 by truncation (not
    round-to-nearest as CUDA does), so there bf16 gradients are written in fp32 and rounded by
    torch (callers `.to(x.dtype)`, a no-op elsewhere)."""
    dt = torch.float32 if (x.dtype == torch.bfloat16 and x.device.type != "cuda") else x.dtype
    return (torch.zeros if zero else torch.empty)(x.shape, dtype=dt, device=x.device)


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _coarse_config(D: int, device: torch.device) -> dict:
    # CPU interpreter: 8-wide tiles so the tests' B=13, D=32 cross several row / column / D blocks.
    # CUDA: 64x64 z tiles; dA blocks of up to 128 columns (acc 64x128 fp32 over 8 warps) -- at
    # D=512 that recomputes z 4x in the backward, the trade for no (B, D) fp32 atomics.
    # Untuned (no GPU in the session that wrote it): see bench/bench_contrastive.py.
    if device.type != "cuda":
        return dict(BM=8, BN=8, BK=16, BD=16, num_warps=1)
    return dict(BM=64, BN=64, BK=64 if D >= 64 else max(16, _p2(D)), BD=min(128, max(16, _p2(D))),
                num_warps=8)


def _fine_config(T: int, S_: int, D: int, device: torch.device) -> dict:
    TP = max(16, _p2(T))
    P = _p2(S_)
    if device.type != "cuda":
        # small clip blocks so 5-13 clips cross block boundaries; the interpreter accepts dots < 16
        return dict(TP=TP, P=P, BB=max(1, 8 // P), BK=16, BD=16, num_warps=1, num_warps_bwd=1)
    # 64 columns per tile (>= 16 for tl.dot; one clip when P >= 64).  Backward d-blocks of 128
    # columns: a (TP, 128) fp32 accumulator next to the (TP, BB*P) sim / d_sim tiles -> 8 warps.
    # Untuned (no GPU in the session that wrote it): see bench/bench_contrastive.py.
    BB = max(1, 64 // P)
    return dict(TP=TP, P=P, BB=BB, BK=32 if D >= 32 else 16, BD=min(128, max(16, _p2(D))),
                num_warps=8 if TP * BB * P >= 8192 else 4, num_warps_bwd=8)


# ----------------------------------------------------------------------------------------------
# coarse: launchers
# ----------------------------------------------------------------------------------------------
def check_coarse_args(text: Tensor, modal: Tensor, temperature: Tensor, text_cols: Optional[Tensor],
                      modal_cols: Optional[Tensor], offset: int, valid: Optional[Tensor] = None,
                      valid_cols: Optional[Tensor] = None) -> None:
    """The coarse op's arguments: square (cols None) or local (this rank's rows vs the gathered
    cols, labels at offset + i); valid (B,) / valid_cols (N,) bool, valid_cols only when local."""
    if text.dim() != 2 or modal.dim() != 2 or text.shape != modal.shape:
        raise ValueError(f"contrastive coarse: text and modal must be equal (B, D); got "
                         f"{tuple(text.shape)} and {tuple(modal.shape)}")
    if text.dtype not in DTYPES or modal.dtype != text.dtype:
        raise ValueError(f"contrastive coarse: text/modal dtype must be one of fp16/bf16/fp32 and equal; "
                         f"got {text.dtype} and {modal.dtype}")
    if text.shape[1] > MAX_D:
        raise ValueError(f"contrastive coarse: D={text.shape[1]} > {MAX_D}")
    if temperature.numel() != 1:
        raise ValueError(f"contrastive: temperature must hold one value, got shape {tuple(temperature.shape)}")
    if (text_cols is None) != (modal_cols is None):
        raise ValueError("contrastive coarse: text_cols and modal_cols go together (local loss)")
    check_valid(valid, text.shape[0])
    if text_cols is not None:
        for name, c in (("text_cols", text_cols), ("modal_cols", modal_cols)):
            if c.dim() != 2 or c.shape[1] != text.shape[1] or c.dtype != text.dtype:
                raise ValueError(f"contrastive coarse: {name} must be (N, {text.shape[1]}) {text.dtype}, "
                                 f"got {tuple(c.shape)} {c.dtype}")
        if text_cols.shape[0] != modal_cols.shape[0] or not 0 <= offset <= text_cols.shape[0] - text.shape[0]:
            raise ValueError(f"contrastive coarse: offset {offset} + B {text.shape[0]} outside the "
                             f"{text_cols.shape[0]} gathered columns")
        if (valid is None) != (valid_cols is None):
            raise ValueError("contrastive coarse: valid and valid_cols go together (local loss)")
        check_valid(valid_cols, text_cols.shape[0], "valid_cols")
    elif valid_cols is not None:
        raise ValueError("contrastive coarse: valid_cols is for the local loss (text_cols / modal_cols) only")


def _mask_arg(valid: Optional[Tensor], dummy: Tensor) -> Tensor:
    return dummy if valid is None else valid.to(torch.uint8).contiguous()


def coarse_lse(a: Tensor, b: Tensor, temp: Tensor, lab_off: int = 0,
               valid_b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Rows of a (Ra, D) vs columns b (Rb, D), both contiguous in one dtype; temp (1,).  ->
    (lse (Ra,) fp32 over the valid columns, +inf for a row with none; label logit z_{i, i+lab_off}
    (Ra,) fp32).  valid_b: (Rb,) bool or None (every column)."""
    Ra, D = a.shape
    lse = torch.empty(Ra, dtype=torch.float32, device=a.device)
    zl = torch.empty(Ra, dtype=torch.float32, device=a.device)
    cfg = _coarse_config(D, a.device)
    prec, _ = _precisions(a.dtype, a.device)
    _coarse_lse_kernel[(triton.cdiv(Ra, cfg["BM"]),)](
        a, b, temp, _mask_arg(valid_b, lse), lse, zl, Ra, b.shape[0], D, a.stride(0), b.stride(0), lab_off,
        HAS_VALID=valid_b is not None, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], PREC=prec,
        num_warps=cfg["num_warps"])
    return lse, zl


def coarse_grad(a: Tensor, b: Tensor, temp: Tensor, scale: Tensor, lse_a: Optional[Tensor],
                lse_b: Optional[Tensor], lab_off: int, lab_coef: float, tsum: bool,
                valid_a: Optional[Tensor] = None, valid_b: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """d a (Ra, D) in a's dtype = scale * P @ b (see `_coarse_grad_kernel` for P), and with tsum
    the (Ra,) fp32 row sums of P * z; temp / scale (1,) fp32; valid_a (Ra,) and valid_b (Rb,)
    bool, both or neither."""
    if (valid_a is None) != (valid_b is None):
        raise ValueError("coarse_grad: valid_a and valid_b go together")
    Ra, D = a.shape
    da = _grad_buffer(a)
    ts = torch.empty(Ra, dtype=torch.float32, device=a.device) if tsum else None
    cfg = _coarse_config(D, a.device)
    prec, gprec = _precisions(a.dtype, a.device)
    grid = (triton.cdiv(Ra, cfg["BM"]), triton.cdiv(D, cfg["BD"]))
    _coarse_grad_kernel[grid](
        a, b, temp, scale, lse_a if lse_a is not None else scale, lse_b if lse_b is not None else scale,
        _mask_arg(valid_a, scale), _mask_arg(valid_b, scale), da, ts if ts is not None else scale,
        Ra, b.shape[0], D, a.stride(0), b.stride(0), da.stride(0), lab_off, float(lab_coef),
        HAS_LSE_A=lse_a is not None, HAS_LSE_B=lse_b is not None, HAS_VALID=valid_a is not None,
        COMPUTE_TSUM=tsum, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BD=cfg["BD"], PREC=prec, GPREC=gprec,
        num_warps=cfg["num_warps"])
    return da.to(a.dtype), ts


# ----------------------------------------------------------------------------------------------
# fine: launchers
# ----------------------------------------------------------------------------------------------
def check_fine_args(text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor], mw: Tensor,
                    mmask: Tensor) -> None:
    if text.dim() != 3 or x.dim() != 3 or (y is not None and y.dim() != 3):
        raise ValueError(f"fine similarity: text (Bt, T, D) and modal (Bm, M, D) expected, got text "
                         f"{tuple(text.shape)}, modal {tuple(x.shape)}"
                         + ("" if y is None else f", second modal {tuple(y.shape)}"))
    Bt, T, D = text.shape
    Bm, Mx, _ = x.shape
    My = 0 if y is None else y.shape[1]
    if x.shape[2] != D or (y is not None and (y.shape[0] != Bm or y.shape[2] != D)):
        raise ValueError(f"fine similarity: modal features must be (Bm, M, {D}); got {tuple(x.shape)}"
                         + ("" if y is None else f" and {tuple(y.shape)}"))
    if text.dtype not in DTYPES or x.dtype != text.dtype or (y is not None and y.dtype != text.dtype):
        raise ValueError(f"fine similarity: features must share one of fp16/bf16/fp32, got text {text.dtype}, "
                         f"modal {x.dtype}" + ("" if y is None else f", {y.dtype}"))
    if D > MAX_D or T > MAX_T or Mx + My > MAX_SLOTS or T == 0 or Mx == 0:
        raise ValueError(f"fine similarity: needs D <= {MAX_D} (got {D}), 1 <= T <= {MAX_T} (got {T}), "
                         f"1 <= M (+ second group) <= {MAX_SLOTS} (got {Mx}+{My})")
    G = 1 if y is None else 3
    if tuple(wt.shape) != (Bt, T) or tuple(tmask.shape) != (Bt, T):
        raise ValueError(f"fine similarity: text weights/mask must be {(Bt, T)}, got {tuple(wt.shape)} / "
                         f"{tuple(tmask.shape)}")
    if tuple(mw.shape) != (G, Bm, Mx + My) or tuple(mmask.shape) != (Bm, Mx + My):
        raise ValueError(f"fine similarity: modal weights must be {(G, Bm, Mx + My)} and mask {(Bm, Mx + My)}, "
                         f"got {tuple(mw.shape)} / {tuple(mmask.shape)}")


def prepare_fine_args(text, wt, tmask, x, y, mw, mmask):
    """Validate and lay out the fine launchers' arguments (both backends): contiguous features,
    fp32 weights, uint8 masks (y stays None without a second group).  Idempotent."""
    check_fine_args(text, wt, tmask, x, y, mw, mmask)
    text, x = text.contiguous(), x.contiguous()
    y = None if y is None else y.contiguous()
    wt = wt.float().contiguous()
    mw = mw.float().contiguous()
    tmask = tmask.to(torch.uint8).contiguous()
    mmask = mmask.to(torch.uint8).contiguous()
    return text, wt, tmask, x, y, mw, mmask


def fine_fwd(text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor], mw: Tensor,
             mmask: Tensor) -> Tensor:
    """Fine similarity of every text vs every clip for the groups x, (y, x++y).

    text (Bt, T, D); wt (Bt, T) softmaxed text weights (0 at padding); tmask (Bt, T) real tokens;
    x (Bm, Mx, D), y (Bm, My, D) or None; mw (G, Bm, Mx+My) softmaxed modal weights per group
    (G = 1: x; G = 3: x, y, concatenation), each zero outside its group's slots; mmask (Bm, Mx+My).
    Returns S (G, Bt, Bm) fp32."""
    has_y = y is not None
    text, wt, tmask, x, y, mw, mmask = prepare_fine_args(text, wt, tmask, x, y, mw, mmask)
    y = x if y is None else y  # a dummy pointer when there is no second group (HAS_Y=False)
    Bt, T, D = text.shape
    Bm, Mx, _ = x.shape
    My = y.shape[1] if has_y else 0
    G = mw.shape[0]
    S = torch.empty((G, Bt, Bm), dtype=torch.float32, device=text.device)
    if Bt == 0 or Bm == 0:
        return S
    cfg = _fine_config(T, Mx + My, D, text.device)
    prec, _ = _precisions(text.dtype, text.device)
    _fine_fwd_kernel[(Bt, triton.cdiv(Bm, cfg["BB"]))](
        text, wt, tmask, x, y, mw, mmask, S, Bt, Bm, T, Mx, My, D,
        text.stride(0), text.stride(1), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        mw.stride(0), S.stride(0),
        HAS_Y=has_y, TP=cfg["TP"], BB=cfg["BB"], P=cfg["P"], BK=cfg["BK"], PREC=prec,
        num_warps=cfg["num_warps"])
    return S


def fine_bwd(dS: Tensor, text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor], mw: Tensor,
             mmask: Tensor):
    """-> (d_text, g_wt (Bt, T) fp32, d_x, d_y (empty when y is None), g_mw (G, Bm, Mx+My) fp32);
    g_wt / g_mw are gradients w.r.t. the softmaxed weights."""
    has_y = y is not None
    text, wt, tmask, x, y, mw, mmask = prepare_fine_args(text, wt, tmask, x, y, mw, mmask)
    y = x if y is None else y  # a dummy pointer when there is no second group (HAS_Y=False)
    dS = dS.float().contiguous()
    Bt, T, D = text.shape
    Bm, Mx, _ = x.shape
    My = y.shape[1] if has_y else 0
    G = mw.shape[0]
    d_text = _grad_buffer(text, zero=True)
    g_wt = torch.zeros((Bt, T), dtype=torch.float32, device=text.device)
    d_x = _grad_buffer(x, zero=True)
    d_y = _grad_buffer(y, zero=True) if has_y else text.new_empty((0,))
    g_mw = torch.zeros((G, Bm, Mx + My), dtype=torch.float32, device=text.device)
    if Bt == 0 or Bm == 0:
        return d_text.to(text.dtype), g_wt, d_x.to(x.dtype), d_y.to(y.dtype) if has_y else d_y, g_mw
    cfg = _fine_config(T, Mx + My, D, text.device)
    prec, gprec = _precisions(text.dtype, text.device)
    common = dict(HAS_Y=has_y, TP=cfg["TP"], BB=cfg["BB"], P=cfg["P"], BK=cfg["BK"], BD=cfg["BD"],
                  PREC=prec, GPREC=gprec, num_warps=cfg["num_warps_bwd"])
    nd = triton.cdiv(D, cfg["BD"])
    _fine_bwd_text_kernel[(Bt, nd)](
        text, wt, tmask, x, y, mw, mmask, dS, d_text, g_wt, Bt, Bm, T, Mx, My, D,
        text.stride(0), text.stride(1), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        mw.stride(0), dS.stride(0), d_text.stride(0), d_text.stride(1), **common)
    dy = d_y if has_y else d_x
    _fine_bwd_modal_kernel[(triton.cdiv(Bm, cfg["BB"]), nd)](
        text, wt, tmask, x, y, mw, mmask, dS, d_x, dy, g_mw, Bt, Bm, T, Mx, My, D,
        text.stride(0), text.stride(1), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        mw.stride(0), dS.stride(0), d_x.stride(0), d_x.stride(1), dy.stride(0), dy.stride(1), **common)
    return d_text.to(text.dtype), g_wt, d_x.to(x.dtype), d_y.to(y.dtype) if has_y else d_y, g_mw


