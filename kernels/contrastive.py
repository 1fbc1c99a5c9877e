"""Fused contrastive (MGA) losses: tiled symmetric InfoNCE and grouped fine similarity.

Contents, in order: the plain-PyTorch references (`fine_similarity_ref`, `info_nce_ref`,
`contrastive_loss_ref`, `grouped_contrastive_loss_ref`: the one spec shared by the tests and the
benchmark), the kernel limits (`MAX_D`, `MAX_T`, `MAX_SLOTS`, `DTYPES`: read by the dispatcher,
never copied), the Triton kernels, and the launcher API that valor_fast.ops composes into custom
ops (the same four functions, same signatures, as the CUDA C++ backend in valor_fast.ops._cuda):
    coarse_lse(a, b, temp, lab_off, valid_b)            -> (lse, label logit)   per row of a
    coarse_grad(a, b, temp, scale, lse_a, lse_b, lab_off, lab_coef, tsum, valid_a, valid_b)
                                                          -> (d a, row sums of P * z)
    fine_fwd(text, wt, tmask, x, y, mw, mmask[, tfloor]) -> S (G, Bt, Bm)
    fine_bwd(dS, text, wt, tmask, x, y, mw, mmask[, tfloor]) -> (d text, d wt, d x, d y, d mw)
(tfloor, the text_floor mask, is Triton-only: valor_fast.ops passes the CUDA C++ backend the floor
as one more text token instead), each built from a `*_plan(s)` function that returns the launch
(`Plan`: kernel, arguments, constexprs, autotuning configurations, grid) for a target
architecture, so the ahead-of-time audit compiles exactly what a launch runs;
plus `check_coarse_args` / `prepare_fine_args` (validation and layout, shared by both backends).

coarse  text (B, D) x modal (B, D), z = text @ modal^T / tau.  The (B, B) logits are never stored:
        forward: `coarse_lse` streams column tiles of the other side and keeps an online
                 log-sum-exp per row; it runs twice (text rows vs modal columns, modal rows vs
                 text columns), so only lse_t (B,) and lse_m (B,) and the label logits are saved.
                 Rows alone give cdiv(B, 64) programs (64 at B = 4096 for 132 SMs), so the
                 columns are split too (320 programs at B = 4096 on an H100) and a second small
                 kernel merges the splits' (max, sum) pairs in a fixed order.
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

fine    text (Bt, T, D), modal groups x (Bm, Mx, D) and optionally y (Bm, My, D).  One program
        scores AT = R // T texts packed into R token rows (3 x 40 = 120 of 128 at VALOR's T = 40)
        against BB clips, as two tiles of token sims: x slots (BB x PX columns, PX = next_pow2(Mx))
        and y slots (BB x PY), so in the forward (BB = 16) 4 frames + 1 audio are 64 + 16 columns,
        none padded: 6% of the similarity MMAs multiply padding at VALOR's shape, all of it the
        8 idle rows (61% with one 64-row text against 8 slots a clip).  From that one read of the
        features come the three groups:
            x  : text-side max over x slots, modal-side softmax(w_x) over x slots
            y  : same over y slots
            xy : text-side max = max(max_x, max_y); modal side over the concatenated softmax
        so T-V, T-A and T-AV share one pass, and (Bt, Bm, T, M) never exists.
        backward: the max is routed to its argmax.  Choice: *recompute* the tile and its argmaxes
                 (tl.argmax, first index on ties, like torch.max) instead of storing indices.
                 Stored int8 indices would be Bt*Bm*(T + Mx + My) bytes: 755 MB at B=4096,
                 T=40, 4 frames + 1 audio (3 GB at B=8192), read back D/BD times; recompute
                 costs no memory and one extra token-sim matmul per D block (D / BD: 16 at
                 D = 512 with BD = 32; 8 for sm_90a's d_modal, BD = 64; BD is the knob against
                 register pressure).  Two
                 kernels, both on the packed tile (3 texts x 40 = 120 of 128 rows) against 8
                 clips (x: 8 x 4 = 32 columns; y: 8 x 2 = 16, the audio slot padded to 2 for
                 tl.dot's N >= 16): 1 - 120 * 5 / (128 * 6) = 22% of the similarity MMAs
                 multiply padding on sm_80 and sm_90a (was 48% d_text / 61% d_modal with one
                 64-row text):
                   d_text  grid (cdiv(Bt, 3), D / BD): one text block x one D block, looping
                           over clip blocks: d_text += d_sim (128, 32 | 16) @ x | y (32 | 16, BD);
                           the text weight grads in D block 0.
                   d_modal grid (cdiv(Bm, 8), D / BD + 1): one clip block x one D block,
                           looping over text blocks: d_x^T += text^T (BD, 128) @ d_sim (128, 32)
                           (the transposed product keeps d_sim in the layout it is built in;
                           on sm_90a BD = 64 and the hi + lo pair is one MMA over K = 256,
                           see `_gmma` HILO_K2);
                           the extra program per clip block computes the slot weight grads
                           alone (in D block 0 their four per-column accumulators spilled).
                 The modal side's dS of each packed text is loaded per clip (BB,) and spread
                 over the clip's slots (a per-column gather kept a 64-bit address per column
                 live: 16 registers a thread at 32 columns on sm_80).  Both build the same sparse d_sim tile (two nonzeros per text
                 token and group, one per modal token).  sm_90a d_modal ran the 64-row tile
                 (48%) until the hi + lo pair became one MMA: as two, the first dot chained into
                 the second and took all 8 warps along M, so at M = BD <= 64 the second
                 warpgroup duplicated it (36-172 bytes of spills; see `fine_configs`).
        The InfoNCE on the (Bt, Bm) S matrices is torch (B <= ~8k: a B x B matrix per group is
        fine; it is the T x M factor that had to go), so valid masks need nothing here.

Numerics: 16-bit inputs go to tl.dot as-is (exact products, fp32 accumulation); fp32 inputs use
tf32 when torch allows it for matmuls, else tf32x3.  The gradient products (fp32 P / d_sim times
16-bit features) run on 16-bit tensor cores as a hi + lo pair of the input's type (two MMAs,
~2^-16 relative: within twice eager's float64-checked error, where one 16-bit rounding is not;
fp16 pre-scales P / d_sim by a power of two so small values stay normal); fp32 inputs keep
tf32x3 (tf32 when allowed).  Under TRITON_INTERPRET (CPU) everything is upcast to fp32 IEEE and
the hi / lo split rounded by hand (the interpreter's bf16 dot and casts are wrong: `mma` in
kernels/_common.py, `_round16`).
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

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
MAX_T = 128        # text tokens (rows of the fine tile)
MAX_SLOTS = 128    # modal tokens per clip, Mx + My
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATMAX = 8          # texts packed into one fine tile (bounds the per-text reduction loop)


# ----------------------------------------------------------------------------------------------
# device helpers: 16-bit gradient products
# ----------------------------------------------------------------------------------------------
@triton.jit
def _round16(x, DT: tl.constexpr, EMU: tl.constexpr):
    """fp32 -> the 16-bit type DT, round to nearest even.  EMU (TRITON_INTERPRET): the rounded
    value stays fp32 and bf16 is rounded by hand (the interpreter's bf16 cast truncates)."""
    if EMU:
        if DT == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = u + 0x7FFF + ((u >> 16) & 1)
            return ((u >> 16) << 16).to(tl.float32, bitcast=True)
        else:
            return x.to(tl.float16).to(tl.float32)
    else:
        return x.to(DT)


@triton.jit
def _gmma(g, b, TRANS_G: tl.constexpr, HILO_K2: tl.constexpr, GPREC: tl.constexpr, EMU: tl.constexpr):
    """g (an fp32 gradient tile: P or d_sim) @ b (features) with fp32 accumulation; with TRANS_G
    the product is b^T @ g instead (b (K, N) features, g (K, C): a (N, C) tile, the transposed
    d_modal product: see `_fine_bwd_modal_kernel`).  GPREC:
      "hilo"    16-bit b: g = hi + lo, both in b's type (round to nearest), two tensor-core MMAs
                with exact products: ~2^-16 relative (bf16; 2^-22 fp16), fp32-grade.
                HILO_K2 (TRANS_G only): the pair as ONE MMA over twice the reduced length,
                (N, 2K) @ (2K, C) with b^T's columns doubled (b_0, b_0, b_1, b_1, ...) against
                g's rows as hi_0, lo_0, hi_1, lo_1, ...  Why (sm_90a, d_modal): Triton gives
                a dot whose result feeds another dot (hi's feeds lo's as its accumulator) a
                chain's warp layout, all 8 warps along M (warpsPerCTA [8, 1]): at N = BD = 64
                that covers 128 rows, so the second warpgroup redid hi's wgmma and held a copy
                (254-255 registers); at BD 16-32 both dots fell back to mma.sync with every
                warp holding the whole (R, C) d_sim operand (36-432 bytes of spills).  The one
                dot chains into nothing: warpsPerCTA [4, 2], one wgmma per group and text
                block, 236-251 registers, no spill.  sm_80 keeps two MMAs (there the doubled
                (N, 2K) operand sits in registers: 364-496 bytes of spills).
      "single"  one 16-bit rounding of g, one MMA (~2^-9 relative for bf16): too coarse against
                the float64 check (see `_precisions`), kept so the tests can show it.
      other     "tf32" / "tf32x3" / "ieee": g and b in fp32 (fp32 inputs)."""
    if GPREC == "hilo" or GPREC == "single":
        # lo is formed after the hi MMA, so hi's operand copy is dead before lo's exists
        p: tl.constexpr = "upcast" if EMU else "native"
        hi = _round16(g, b.dtype, EMU)
        if TRANS_G:
            bt = tl.trans(b)  # (N, K)
            if GPREC == "hilo" and HILO_K2:
                lo = _round16(g - hi.to(tl.float32), b.dtype, EMU)
                K: tl.constexpr = g.shape[0]
                # rows hi_0, lo_0, hi_1, ... against columns b_0, b_0, b_1, ...: one dot
                g2 = tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (2 * K, g.shape[1]))
                acc = mma(tl.reshape(tl.join(bt, bt), (bt.shape[0], 2 * K)), g2, p)
            else:
                acc = mma(bt, hi, p)
                if GPREC == "hilo":
                    acc += mma(bt, _round16(g - hi.to(tl.float32), b.dtype, EMU), p)
        else:
            # lo formed before the hi MMA here (the order main had): formed after it,
            # `_coarse_grad_kernel` spills 40 bytes on sm_80 (bf16, BD = 64)
            if GPREC == "hilo":
                lo = _round16(g - hi.to(tl.float32), b.dtype, EMU)
            acc = mma(hi, b, p)
            if GPREC == "hilo":
                acc += mma(lo, b, p)
        return acc
    else:
        # both returns under if / else: after a return inside a constexpr `if`, the Triton
        # frontend still generates the statements that follow (a (R, BD) @ (R, C) dot here)
        if TRANS_G:
            return mma(tl.trans(b), g, GPREC)
        else:
            return mma(g, b, GPREC)


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
    A, Bp, Temp, VB, PART,  # A (Ra, D) rows, Bp (Rb, D) columns; VB (Rb,) uint8; PART (3, nsplit, Ra) fp32 out
    Ra, Rb, D, sa, sb, lab_off, cols_per_split,
    HAS_VALID: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """Per row i of A over the (valid) columns of split program_id(1) (cols_per_split columns
    each): running max m, sum of exp(z - m), and the label logit z_{i, i + lab_off} if the label
    falls in the split (0 otherwise).  `_coarse_lse_merge_kernel` combines the splits."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    rows = (pid * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < Ra
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, Rb)
    inv_t = 1.0 / tl.load(Temp).to(tl.float32)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BM,), dtype=tl.float32)
    zl = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(c_lo, c_hi, BN):
        cols = (n0 + tl.arange(0, BN)).to(tl.int64)
        cmask = cols < c_hi
        z = _coarse_z_tile(A, Bp, rows, cols, rmask, cmask, D, sa, sb, BM, BN, BK, PREC) * inv_t
        zl += tl.sum(tl.where((cols[None, :] == rows[:, None] + lab_off) & cmask[None, :], z, 0.0), axis=1)
        live = cmask
        if HAS_VALID:
            live = cmask & (tl.load(VB + cols, mask=cmask, other=0) != 0)
        z = tl.where(live[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        # a tile of excluded columns can leave m_new = -inf: shift by 0 there (exp(-inf) = 0)
        m_sh = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_sh) + tl.sum(tl.exp(z - m_sh[:, None]), axis=1)
        m_i = m_new
    out = PART + split * Ra + rows
    tl.store(out, m_i, mask=rmask)
    tl.store(out + nsplit * Ra, s_i, mask=rmask)
    tl.store(out + 2 * nsplit * Ra, zl, mask=rmask)


@triton.jit
def _coarse_lse_merge_kernel(PART, LSE, ZL, Ra, nsplit, BR: tl.constexpr):
    """The column splits' (max, sum, label) -> lse (+inf for a row with no valid column) and the
    label logit, splits in ascending order (deterministic)."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    rm = rows < Ra
    m = tl.full((BR,), float("-inf"), dtype=tl.float32)
    for k in range(0, nsplit):
        m = tl.maximum(m, tl.load(PART + k * Ra + rows, mask=rm, other=float("-inf")))
    m_sh = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros((BR,), dtype=tl.float32)
    z = tl.zeros((BR,), dtype=tl.float32)
    for k in range(0, nsplit):
        mk = tl.load(PART + k * Ra + rows, mask=rm, other=float("-inf"))
        s += tl.load(PART + (nsplit + k) * Ra + rows, mask=rm, other=0.0) * tl.exp(mk - m_sh)
        z += tl.load(PART + (2 * nsplit + k) * Ra + rows, mask=rm, other=0.0)
    lse = tl.where(s > 0, m + tl.log(tl.where(s > 0, s, 1.0)), float("inf"))
    tl.store(LSE + rows, lse, mask=rm)
    tl.store(ZL + rows, z, mask=rm)


@triton.jit
def _coarse_grad_kernel(
    A, Bp, Temp, Scale, LSE_A, LSE_B, VA, VB, DA, TSUM,  # VA (Ra,) / VB (Rb,) uint8; DA (Ra, D) out (A's dtype); TSUM (Ra,) fp32 out
    Ra, Rb, D, sa, sb, sda, lab_off, lab_coef, pscale,
    HAS_LSE_A: tl.constexpr, HAS_LSE_B: tl.constexpr, HAS_VALID: tl.constexpr, COMPUTE_TSUM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr, GPREC: tl.constexpr, EMU: tl.constexpr,
):
    """dA[i, dblock] = scale * sum_j P_ij B[j, dblock] with
    P_ij = exp(z_ij - lse_a_i) [HAS_LSE_A] + exp(z_ij - lse_b_j) [HAS_LSE_B] - lab_coef [j == i + lab_off],
    and P_ij = 0 where row i or column j is excluded [HAS_VALID];
    TSUM_i = sum_j P_ij z_ij (the temperature gradient, up to a factor), written by D block 0.
    pscale: a power of two P is multiplied by before its 16-bit split (fp16: |P| <= 2 + coef
    scaled below 2^12, so small probabilities stay normal), divided out at the end."""
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
        acc += _gmma(p * pscale, b, False, False, GPREC, EMU)  # (BM, BN) @ (BN, BD)
    acc = acc * (scale / pscale)
    tl.store(DA + rows[:, None] * sda + dcols[None, :], acc.to(DA.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    if COMPUTE_TSUM:
        if pid_d == 0:
            tl.store(TSUM + rows, tacc, mask=rmask)


# ----------------------------------------------------------------------------------------------
# fine: Triton kernels
#
# Tile layout: rows are AT = min(R // T, ATMAX) texts x T tokens packed back to back (row r =
# token r % T of text a0 + r // T; 3 x 40 = 120 of R = 128 rows); columns come as two tiles, one
# per group: BB clips x PX slots of x (4 frames) and BB clips x PY slots of y (1 audio), PX / PY
# the groups' sizes rounded up to powers of two and to BB * P >= 16 (tl.dot's smallest N), so a
# clip's slots reshape to (R, BB, PX) for the text-side max.  The modal-side max over a text's
# tokens is a masked reduction per packed text (AT of them).  At T = 40, 4 + 1 slots, the share
# of the similarity MMAs that multiply padding (`fine_waste`): forward BB = 16 (64 + 16 columns)
# 6%; backward BB = 8 (32 + 16 columns, y padded 1 -> 2) 22%; was 61% with one text of 64 rows x
# 8 slots a clip.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fine_rows(a0, Bt, T, AT, R: tl.constexpr):
    """Rows of a tile: token i of text a (int64) for row r, its text within the block al, live."""
    r = tl.arange(0, R)
    al = r // T
    i = r - al * T
    a = al.to(tl.int64) + a0
    return r, al, i, a, (al < AT) & (a < Bt)


@triton.jit
def _fine_cols(b0, Bm, Mg, BB: tl.constexpr, PG: tl.constexpr):
    """One group's columns: slot s of clip b (int64) for column c = (b - b0) * PG + s, live."""
    c = tl.arange(0, BB * PG)
    s = c % PG
    b = (b0 + c // PG).to(tl.int64)
    return b, s, (b < Bm) & (s < Mg)


@triton.jit
def _fine_sims(Text, st_b, st_t, a, i, rlive, Xp, sx_b, sx_m, bx, sx, xlive, Yp, sy_b, sy_m, by, sy, ylive, D,
               HAS_Y: tl.constexpr, R: tl.constexpr, CX: tl.constexpr, CY: tl.constexpr, BK: tl.constexpr,
               PREC: tl.constexpr):
    """Token sims (R, CX) against the x slots and (R, CY) against the y slots, fp32 (dead rows and
    columns are 0); one read of each text chunk serves both."""
    simx = tl.zeros((R, CX), dtype=tl.float32)
    simy = tl.zeros((R, CY), dtype=tl.float32)
    toff = a * st_b + i * st_t
    xoff = bx * sx_b + sx * sx_m
    yoff = by * sy_b + sy * sy_m
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < D
        t = tl.load(Text + toff[:, None] + ks[None, :], mask=rlive[:, None] & km[None, :], other=0.0)  # (R, BK)
        xv = tl.load(Xp + xoff[None, :] + ks[:, None], mask=xlive[None, :] & km[:, None], other=0.0)
        simx += mma(t, xv, PREC)  # (R, BK) @ (BK, CX)
        if HAS_Y:
            yv = tl.load(Yp + yoff[None, :] + ks[:, None], mask=ylive[None, :] & km[:, None], other=0.0)
            simy += mma(t, yv, PREC)
    return simx, simy


@triton.jit
def _fine_text_meta(WT, TM, a, i, rlive, T):
    """(R,) real text tokens and their softmaxed weights (0 at padding)."""
    off = a * T + i
    tval = rlive & (tl.load(TM + off, mask=rlive, other=0) != 0)
    return tval, tl.load(WT + off, mask=rlive, other=0.0)


@triton.jit
def _fine_slot_meta(MW, MM, s_mw_g, b, s, live, S_, s0, g_own, HAS_Y: tl.constexpr):
    """One group's columns (slot-layout index s0 + s of clip b): real modal tokens, the group's own
    softmaxed weights (MW row g_own) and the concatenation's (MW row 2; = own without y)."""
    off = b * S_ + s0 + s
    val = live & (tl.load(MM + off, mask=live, other=0) != 0)
    w = tl.load(MW + g_own * s_mw_g + off, mask=live, other=0.0)
    if HAS_Y:
        wc = tl.load(MW + 2 * s_mw_g + off, mask=live, other=0.0)
    else:
        wc = w
    return val, w, wc


@triton.jit
def _fine_text_max(sim, val, R: tl.constexpr, BB: tl.constexpr, PG: tl.constexpr):
    """Text side: each (token row, clip)'s best real slot of the group, (R, BB) max and argmax
    (first slot on ties, like torch.max)."""
    s3 = tl.where(tl.reshape(val, (BB, PG))[None, :, :], tl.reshape(sim, (R, BB, PG)), float("-inf"))
    return tl.max(s3, axis=2), tl.argmax(s3, axis=2, tie_break_left=True)


@triton.jit
def _fine_modal_max(sim, seg, fl, HAS_FLOOR: tl.constexpr):
    """Modal side for one text (rows `seg`: its real tokens): each column's best token, (C,) max,
    argmax row (first on ties) and whether that max passes a gradient.  With the text's floor
    (text_floor) a max below 0 becomes 0 and passes none; an exact 0 keeps its token."""
    m = tl.where(seg[:, None], sim, float("-inf"))
    mx = tl.max(m, axis=0)
    am = tl.argmax(m, axis=0, tie_break_left=True)
    ok = mx > float("-inf")
    if HAS_FLOOR:
        cut = fl & (mx < 0)
        mx = tl.where(cut, 0.0, mx)
        ok = ok & ~cut
    return mx, am, ok


@triton.jit
def _fine_floor(TF, a, like, Bt, HAS_FLOOR: tl.constexpr):
    """Text a's floor flag as a vector shaped like `like` (False without text_floor): one scalar
    load, broadcast by arithmetic (the interpreter rejects a mask made of vector & scalar bool;
    a per-column gather would keep a 64-bit address per column live)."""
    av = a + 0 * like.to(tl.int64)
    if HAS_FLOOR:
        return tl.load(TF + av, mask=av < Bt, other=0) != 0
    else:
        return av < 0


@triton.jit
def _fine_fwd_kernel(
    Text, WT, TM, TF, Xp, Yp, MW, MM, S,  # TF (Bt,) uint8 floors; S (G, Bt, Bm) fp32 out
    Bt, Bm, T, Mx, My, D,
    st_b, st_t, sx_b, sx_m, sy_b, sy_m, s_mw_g, s_s_g,
    HAS_Y: tl.constexpr, HAS_FLOOR: tl.constexpr, R: tl.constexpr, BB: tl.constexpr, PX: tl.constexpr,
    PY: tl.constexpr, BK: tl.constexpr, ATMAX: tl.constexpr, PREC: tl.constexpr,
):
    AT = tl.minimum(R // T, ATMAX)
    a0 = tl.program_id(0) * AT
    b0 = tl.program_id(1) * BB
    r, al_r, i, a_r, rlive = _fine_rows(a0, Bt, T, AT, R)
    bx, sx, xlive = _fine_cols(b0, Bm, Mx, BB, PX)
    by, sy, ylive = _fine_cols(b0, Bm, My, BB, PY)
    simx, simy = _fine_sims(Text, st_b, st_t, a_r, i, rlive, Xp, sx_b, sx_m, bx, sx, xlive, Yp, sy_b, sy_m,
                            by, sy, ylive, D, HAS_Y, R, BB * PX, BB * PY, BK, PREC)
    tval, wt = _fine_text_meta(WT, TM, a_r, i, rlive, T)
    xval, wx, wxc = _fine_slot_meta(MW, MM, s_mw_g, bx, sx, xlive, Mx + My, 0, 0, HAS_Y)
    wpos = (wt > 0)[:, None]
    t2m_x, ax_ = _fine_text_max(simx, xval, R, BB, PX)              # (R, BB)
    tx = tl.where(wpos, wt[:, None] * t2m_x, 0.0)
    if HAS_Y:
        yval, wy, wyc = _fine_slot_meta(MW, MM, s_mw_g, by, sy, ylive, Mx + My, Mx, 1, HAS_Y)
        t2m_y, ay_ = _fine_text_max(simy, yval, R, BB, PY)
        ty = tl.where(wpos, wt[:, None] * t2m_y, 0.0)
        txy = tl.where(wpos, wt[:, None] * tl.maximum(t2m_x, t2m_y), 0.0)  # max over x ++ y
    bb = b0 + tl.arange(0, BB)
    bval = bb < Bm
    for al in range(0, AT):
        a = tl.full((), 0, tl.int64) + a0 + al  # int64 (a python int when both are, under the interpreter)
        om = bval & ((a + 0 * bb) < Bt)
        seg = al_r == al
        # text side: softmax(w_text)-weighted sum over the text's tokens; modal side: each slot's
        # best real token, weighted by the group's softmax over the clip's slots
        mxx, amx_, okx_ = _fine_modal_max(simx, seg & tval, _fine_floor(TF, a, bx, Bt, HAS_FLOOR), HAS_FLOOR)
        sm_x = tl.sum(tl.reshape(tl.where(wx > 0, wx * mxx, 0.0), (BB, PX)), axis=1)
        out = S + a * Bm + bb
        tl.store(out, 0.5 * (tl.sum(tl.where(seg[:, None], tx, 0.0), axis=0) + sm_x), mask=om)
        if HAS_Y:
            mxy, amy_, oky_ = _fine_modal_max(simy, seg & tval, _fine_floor(TF, a, by, Bt, HAS_FLOOR), HAS_FLOOR)
            sm_y = tl.sum(tl.reshape(tl.where(wy > 0, wy * mxy, 0.0), (BB, PY)), axis=1)
            sm_xy = (tl.sum(tl.reshape(tl.where(wxc > 0, wxc * mxx, 0.0), (BB, PX)), axis=1)
                     + tl.sum(tl.reshape(tl.where(wyc > 0, wyc * mxy, 0.0), (BB, PY)), axis=1))
            tl.store(out + s_s_g, 0.5 * (tl.sum(tl.where(seg[:, None], ty, 0.0), axis=0) + sm_y), mask=om)
            tl.store(out + 2 * s_s_g, 0.5 * (tl.sum(tl.where(seg[:, None], txy, 0.0), axis=0) + sm_xy), mask=om)


@triton.jit
def _fine_onehot(c, am, mx, R: tl.constexpr, BB: tl.constexpr, PG: tl.constexpr):
    """(R, BB) values c placed at slot am of their clip: (R, BB * PG); nothing where the max is -inf."""
    hit = (tl.arange(0, PG)[None, None, :] == am[:, :, None]) & (mx > float("-inf"))[:, :, None]
    return tl.reshape(tl.where(hit, c[:, :, None], 0.0), (R, BB * PG))


@triton.jit
def _fine_spread(v, BB: tl.constexpr, PG: tl.constexpr):
    """(BB,) per-clip values -> (BB * PG,) per column (each clip's value on its PG slots)."""
    return tl.reshape(tl.broadcast_to(v[:, None], (BB, PG)), (BB * PG,))


@triton.jit
def _fine_dsim(simx, simy, DS, TF, s_ds_g, Bt, Bm, a0, AT, r, al_r, a_r, rlive, tval, wt, bb, bval,
               bx, xval, wx, wxc, by, yval, wy, wyc,
               HAS_Y: tl.constexpr, HAS_FLOOR: tl.constexpr, R: tl.constexpr,
               BB: tl.constexpr, PX: tl.constexpr, PY: tl.constexpr):
    """d loss / d sim of one tile, (R, BB*PX) and (R, BB*PY) fp32: each group's dS routed to the
    argmaxes (text side: the best slot per token and clip, weight 1/2 softmax(w_text); modal
    side: the best real token per slot and text, weight 1/2 w_slot, none where floored).  Also
    gt (R, BB): d / d softmax(w_text) before the 1/2."""
    dmask = rlive[:, None] & bval[None, :]
    dso = a_r[:, None] * Bm + bb[None, :]
    d0 = tl.load(DS + dso, mask=dmask, other=0.0)  # (R, BB): dS_x of each token row's text vs each clip
    t2m_x, ax = _fine_text_max(simx, xval, R, BB, PX)
    fx = tl.where(t2m_x > float("-inf"), t2m_x, 0.0)
    hw = (0.5 * wt)[:, None]
    if HAS_Y:
        d1 = tl.load(DS + s_ds_g + dso, mask=dmask, other=0.0)
        d2 = tl.load(DS + 2 * s_ds_g + dso, mask=dmask, other=0.0)
        t2m_y, ay = _fine_text_max(simy, yval, R, BB, PY)
        fy = tl.where(t2m_y > float("-inf"), t2m_y, 0.0)
        xwin = t2m_x >= t2m_y  # ties go to x: torch.max over cat([x, y]) returns the first index
        dx = _fine_onehot(hw * (d0 + tl.where(xwin, d2, 0.0)), ax, t2m_x, R, BB, PX)
        dy = _fine_onehot(hw * (d1 + tl.where(xwin, 0.0, d2)), ay, t2m_y, R, BB, PY)
        gt = d0 * fx + d1 * fy + d2 * tl.maximum(fx, fy)
    else:
        dx = _fine_onehot(hw * d0, ax, t2m_x, R, BB, PX)
        dy = tl.zeros((R, BB * PY), dtype=tl.float32)
        gt = d0 * fx
    for al in range(0, AT):
        a = tl.full((), 0, tl.int64) + a0 + al  # int64 (a python int when both are, under the interpreter)
        seg = (al_r == al) & tval
        # dS of text a vs the block's clips, loaded per clip (BB,) and spread over the clip's slots
        am_ = bval & ((a + 0 * bb) < Bt)
        dsa = DS + a * Bm + bb
        x0 = _fine_spread(tl.load(dsa, mask=am_, other=0.0), BB, PX)  # (CX,) dS_x(a, column's clip)
        _, amx, okx = _fine_modal_max(simx, seg, _fine_floor(TF, a, bx, Bt, HAS_FLOOR), HAS_FLOOR)
        if HAS_Y:
            d2a = tl.load(dsa + 2 * s_ds_g, mask=am_, other=0.0)
            cmx = 0.5 * (wx * x0 + wxc * _fine_spread(d2a, BB, PX))
        else:
            cmx = 0.5 * wx * x0
        dx += tl.where((r[:, None] == amx[None, :]) & okx[None, :], cmx[None, :], 0.0)
        if HAS_Y:
            y1 = _fine_spread(tl.load(dsa + s_ds_g, mask=am_, other=0.0), BB, PY)
            y2 = _fine_spread(d2a, BB, PY)
            _, amy, oky = _fine_modal_max(simy, seg, _fine_floor(TF, a, by, Bt, HAS_FLOOR), HAS_FLOOR)
            dy += tl.where((r[:, None] == amy[None, :]) & oky[None, :], (0.5 * (wy * y1 + wyc * y2))[None, :], 0.0)
    return dx, dy, gt


@triton.jit
def _fine_text_ds(DSg, a, bb, bval, Bt, Bm, BB: tl.constexpr, PG: tl.constexpr):
    """One group's dS (DSg: its (Bt, Bm) plane) of text a against the block's clips per column,
    (BB * PG,): loaded per clip (BB,) and spread over the clip's slots (a per-column gather
    keeps a 64-bit address per column live: 16 registers a thread at 32 columns on sm_80)."""
    return _fine_spread(tl.load(DSg + a * Bm + bb, mask=bval & ((a + 0 * bb) < Bt), other=0.0), BB, PG)


@triton.jit
def _fine_slot_wgrad(simx, simy, DS, TF, s_ds_g, Bt, Bm, a0, AT, al_r, tval, bb, bval,
                     HAS_Y: tl.constexpr, HAS_FLOOR: tl.constexpr, BB: tl.constexpr, PX: tl.constexpr,
                     PY: tl.constexpr):
    """Per column, the tile's sum over its texts of 1/2 dS x the modal-side max (d / d the slot
    weights): x own (BB*PX,), x concat, y own (BB*PY,), y concat."""
    gmx = tl.zeros((BB * PX,), dtype=tl.float32)
    gmxc = tl.zeros((BB * PX,), dtype=tl.float32)
    gmy = tl.zeros((BB * PY,), dtype=tl.float32)
    gmyc = tl.zeros((BB * PY,), dtype=tl.float32)
    for al in range(0, AT):
        a = tl.full((), 0, tl.int64) + a0 + al  # int64 (a python int when both are, under the interpreter)
        seg = (al_r == al) & tval
        x0 = _fine_text_ds(DS, a, bb, bval, Bt, Bm, BB, PX)
        mxx, _, _ = _fine_modal_max(simx, seg, _fine_floor(TF, a, x0, Bt, HAS_FLOOR), HAS_FLOOR)
        fmx = tl.where(mxx > float("-inf"), mxx, 0.0)
        gmx += 0.5 * x0 * fmx
        if HAS_Y:
            gmxc += 0.5 * _fine_text_ds(DS + 2 * s_ds_g, a, bb, bval, Bt, Bm, BB, PX) * fmx
            y1 = _fine_text_ds(DS + s_ds_g, a, bb, bval, Bt, Bm, BB, PY)
            mxy, _, _ = _fine_modal_max(simy, seg, _fine_floor(TF, a, y1, Bt, HAS_FLOOR), HAS_FLOOR)
            fmy = tl.where(mxy > float("-inf"), mxy, 0.0)
            gmy += 0.5 * y1 * fmy
            gmyc += 0.5 * _fine_text_ds(DS + 2 * s_ds_g, a, bb, bval, Bt, Bm, BB, PY) * fmy
    return gmx, gmxc, gmy, gmyc


@triton.jit
def _fine_bwd_text_kernel(
    Text, WT, TM, TF, Xp, Yp, MW, MM, DS, SC, DText, GWT,  # SC (Bt,) fp32 pre-scales; DText (Bt, T, D); GWT (Bt, T)
    Bt, Bm, T, Mx, My, D,
    st_b, st_t, sx_b, sx_m, sy_b, sy_m, s_mw_g, s_ds_g, sdt_b, sdt_t,
    HAS_Y: tl.constexpr, HAS_FLOOR: tl.constexpr, HAS_SCALE: tl.constexpr, R: tl.constexpr, BB: tl.constexpr,
    PX: tl.constexpr, PY: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, ATMAX: tl.constexpr,
    PREC: tl.constexpr, GPREC: tl.constexpr, EMU: tl.constexpr,
):
    """Grid (text blocks of AT, D blocks of BD).  d_text[block texts, D block] = sum over clip
    blocks of d_sim (R, BB*PX | BB*PY) @ x | y (BB*P, BD), and the text weight gradients (D block
    0).  fp16: d_sim rows are pre-scaled by their text's power of two (SC)."""
    AT = tl.minimum(R // T, ATMAX)
    a0 = tl.program_id(0) * AT
    pid_d = tl.program_id(1)
    r, al_r, i, a_r, rlive = _fine_rows(a0, Bt, T, AT, R)
    tval, wt = _fine_text_meta(WT, TM, a_r, i, rlive, T)
    dcols = pid_d * BD + tl.arange(0, BD)
    dmask = dcols < D
    if HAS_SCALE:
        sc = tl.load(SC + a_r, mask=rlive, other=1.0)
    else:
        sc = tl.full((R,), 1.0, dtype=tl.float32)
    acc = tl.zeros((R, BD), dtype=tl.float32)
    gwt = tl.zeros((R,), dtype=tl.float32)
    for b0 in range(0, Bm, BB):
        bx, sx, xlive = _fine_cols(b0, Bm, Mx, BB, PX)
        by, sy, ylive = _fine_cols(b0, Bm, My, BB, PY)
        simx, simy = _fine_sims(Text, st_b, st_t, a_r, i, rlive, Xp, sx_b, sx_m, bx, sx, xlive, Yp, sy_b, sy_m,
                                by, sy, ylive, D, HAS_Y, R, BB * PX, BB * PY, BK, PREC)
        xval, wx, wxc = _fine_slot_meta(MW, MM, s_mw_g, bx, sx, xlive, Mx + My, 0, 0, HAS_Y)
        yval, wy, wyc = _fine_slot_meta(MW, MM, s_mw_g, by, sy, ylive, Mx + My, Mx, 1, HAS_Y)
        bb = b0 + tl.arange(0, BB)
        dx, dy, gt = _fine_dsim(simx, simy, DS, TF, s_ds_g, Bt, Bm, a0, AT, r, al_r, a_r, rlive, tval, wt, bb,
                                bb < Bm, bx, xval, wx, wxc, by, yval, wy, wyc, HAS_Y, HAS_FLOOR, R, BB, PX, PY)
        gwt += 0.5 * tl.sum(gt, axis=1)
        xv = tl.load(Xp + (bx * sx_b + sx * sx_m)[:, None] + dcols[None, :],
                     mask=xlive[:, None] & dmask[None, :], other=0.0)  # (CX, BD)
        acc += _gmma(dx * sc[:, None], xv, False, False, GPREC, EMU)
        if HAS_Y:
            yv = tl.load(Yp + (by * sy_b + sy * sy_m)[:, None] + dcols[None, :],
                         mask=ylive[:, None] & dmask[None, :], other=0.0)
            acc += _gmma(dy * sc[:, None], yv, False, False, GPREC, EMU)
    acc = acc / sc[:, None]
    tl.store(DText + (a_r * sdt_b + i * sdt_t)[:, None] + dcols[None, :], acc.to(DText.dtype.element_ty),
             mask=rlive[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(GWT + a_r * T + i, gwt, mask=rlive)


@triton.jit
def _fine_bwd_modal_kernel(
    Text, WT, TM, TF, Xp, Yp, MW, MM, DS, SC, DX, DY, GMW,  # SC (Bm,) fp32 pre-scales; GMW (G, Bm, Mx+My)
    Bt, Bm, T, Mx, My, D,
    st_b, st_t, sx_b, sx_m, sy_b, sy_m, s_mw_g, s_ds_g, sdx_b, sdx_m, sdy_b, sdy_m,
    HAS_Y: tl.constexpr, HAS_FLOOR: tl.constexpr, HAS_SCALE: tl.constexpr, R: tl.constexpr, BB: tl.constexpr,
    PX: tl.constexpr, PY: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, ATMAX: tl.constexpr,
    HILO_K2: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr, EMU: tl.constexpr,
):
    """Grid (clip blocks of BB, D blocks of BD + 1).  D block programs: d_x / d_y[block clips, D
    block]^T = sum over text blocks of text^T (BD, R) @ d_sim (R, BB*P) (HILO_K2, sm_90a: the
    16-bit hi + lo pair as one (BD, 2R) @ (2R, BB*P) MMA, `_gmma`); fp16: d_sim columns are
    pre-scaled by their clip's power of two.  The last program of each clip block: the slot weight gradients alone.  Folded into the
    D block 0 programs, their four per-column accumulators spilled every 128-row tile on sm_80
    (124-2544 bytes); apart they cost one more sim pass per clip block (1 / (D / BD + 1))."""
    AT = tl.minimum(R // T, ATMAX)
    b0 = tl.program_id(0) * BB
    pid_d = tl.program_id(1)
    bx, sx, xlive = _fine_cols(b0, Bm, Mx, BB, PX)
    by, sy, ylive = _fine_cols(b0, Bm, My, BB, PY)
    bb = b0 + tl.arange(0, BB)
    S_ = Mx + My
    if pid_d * BD < D:
        xval, wx, wxc = _fine_slot_meta(MW, MM, s_mw_g, bx, sx, xlive, S_, 0, 0, HAS_Y)
        yval, wy, wyc = _fine_slot_meta(MW, MM, s_mw_g, by, sy, ylive, S_, Mx, 1, HAS_Y)
        dcols = pid_d * BD + tl.arange(0, BD)
        dmask = dcols < D
        if HAS_SCALE:
            scc = tl.load(SC + bb, mask=bb < Bm, other=1.0)
            scx = _fine_spread(scc, BB, PX)
            scy = _fine_spread(scc, BB, PY)
        else:
            scx = tl.full((BB * PX,), 1.0, dtype=tl.float32)
            scy = tl.full((BB * PY,), 1.0, dtype=tl.float32)
        accx = tl.zeros((BD, BB * PX), dtype=tl.float32)  # transposed: d_x^T (BD, CX), see below
        accy = tl.zeros((BD, BB * PY), dtype=tl.float32)
        for a0 in range(0, Bt, AT):
            r, al_r, i, a_r, rlive = _fine_rows(a0, Bt, T, AT, R)
            tval, wt = _fine_text_meta(WT, TM, a_r, i, rlive, T)
            simx, simy = _fine_sims(Text, st_b, st_t, a_r, i, rlive, Xp, sx_b, sx_m, bx, sx, xlive, Yp, sy_b, sy_m,
                                    by, sy, ylive, D, HAS_Y, R, BB * PX, BB * PY, BK, PREC)
            dx, dy, _ = _fine_dsim(simx, simy, DS, TF, s_ds_g, Bt, Bm, a0, AT, r, al_r, a_r, rlive, tval, wt, bb,
                                   bb < Bm, bx, xval, wx, wxc, by, yval, wy, wyc, HAS_Y, HAS_FLOOR, R, BB, PX, PY)
            ta = tl.load(Text + (a_r * st_b + i * st_t)[:, None] + dcols[None, :],
                         mask=rlive[:, None] & dmask[None, :], other=0.0)  # (R, BD)
            # (BD, R) @ (R, CX): text^T times d_sim in its own orientation
            accx += _gmma(dx * scx[None, :], ta, True, HILO_K2, GPREC, EMU)
            if HAS_Y:
                accy += _gmma(dy * scy[None, :], ta, True, HILO_K2, GPREC, EMU)
        tl.store(DX + (bx * sdx_b + sx * sdx_m)[None, :] + dcols[:, None],
                 (accx / scx[None, :]).to(DX.dtype.element_ty), mask=xlive[None, :] & dmask[:, None])
        if HAS_Y:
            tl.store(DY + (by * sdy_b + sy * sdy_m)[None, :] + dcols[:, None],
                     (accy / scy[None, :]).to(DY.dtype.element_ty), mask=ylive[None, :] & dmask[:, None])
    else:
        gmx = tl.zeros((BB * PX,), dtype=tl.float32)
        gmxc = tl.zeros((BB * PX,), dtype=tl.float32)
        gmy = tl.zeros((BB * PY,), dtype=tl.float32)
        gmyc = tl.zeros((BB * PY,), dtype=tl.float32)
        for a0 in range(0, Bt, AT):
            r, al_r, i, a_r, rlive = _fine_rows(a0, Bt, T, AT, R)
            tval = _fine_text_meta(WT, TM, a_r, i, rlive, T)[0]
            simx, simy = _fine_sims(Text, st_b, st_t, a_r, i, rlive, Xp, sx_b, sx_m, bx, sx, xlive, Yp, sy_b, sy_m,
                                    by, sy, ylive, D, HAS_Y, R, BB * PX, BB * PY, BK, PREC)
            g0, g1, g2, g3 = _fine_slot_wgrad(simx, simy, DS, TF, s_ds_g, Bt, Bm, a0, AT, al_r, tval, bb, bb < Bm,
                                              HAS_Y, HAS_FLOOR, BB, PX, PY)
            gmx += g0
            gmxc += g1
            gmy += g2
            gmyc += g3
        tl.store(GMW + bx * S_ + sx, gmx, mask=xlive)
        if HAS_Y:
            tl.store(GMW + s_mw_g + by * S_ + Mx + sy, gmy, mask=ylive)
            tl.store(GMW + 2 * s_mw_g + bx * S_ + sx, gmxc, mask=xlive)
            tl.store(GMW + 2 * s_mw_g + by * S_ + Mx + sy, gmyc, mask=ylive)


# ----------------------------------------------------------------------------------------------
# launch configurations: pure functions of (shape, dtype, arch), read by the launchers below and
# by the ahead-of-time audit (bench/audit_contrastive.py).  Each returns the autotuning set (the
# first is the default: what CI audits and what runs without tuning); every entry passes the
# audit (no spills in 16-bit paths, shared memory in the limit, HMMA / HGMMA) on sm_80 and sm_90a.
# arch None = the CPU interpreter: one small config, tiles chosen so the tests' odd shapes cross
# row / column / clip / text blocks and column splits.
# ----------------------------------------------------------------------------------------------
class Arch(NamedTuple):
    cc: int    # compute capability x 10: 80 (A100), 90 (H100; sm_90a)
    sms: int   # streaming multiprocessors


A100 = Arch(80, 108)
H100 = Arch(90, 132)


def arch_of(device: torch.device) -> Optional[Arch]:
    """The launch target of tensors on `device`: None on the CPU (TRITON_INTERPRET)."""
    if device.type != "cuda":
        return None
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> Arch:
    p = torch.cuda.get_device_properties(index)
    return Arch(p.major * 10 + p.minor, p.multi_processor_count)


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _cfg(num_warps: int, num_stages: int, **meta) -> dict:
    return dict(meta, num_warps=num_warps, num_stages=num_stages)


def _bk(D: int, dtype: torch.dtype) -> int:
    # 128-byte K chunks (64 16-bit / 32 fp32 elements), at most D rounded up to 16
    return min(64 if dtype != torch.float32 else 32, max(16, _p2(D)))


def coarse_lse_configs(D: int, dtype: torch.dtype, arch: Optional[Arch]) -> List[dict]:
    """`_coarse_lse_kernel`: (BM, BN) z tiles.  64 x 64 on one warpgroup (4 warps: a 64 x 64
    wgmma on sm_90a; 8 warps would split it into two thin 64 x 32 ones), 128-row tiles on 8.
    Audited (bf16, D = 512): sm_80 BK = 64 with 3 stages spills 32 bytes, BK = 32 none (161
    registers); sm_90a BK = 64, 3 stages: 144 registers, none."""
    if arch is None:
        return [_cfg(1, 1, BM=8, BN=8, BK=16)]
    bk = _bk(D, dtype)
    first = _cfg(4, 3, BM=64, BN=64, BK=min(bk, 32) if arch.cc < 90 else bk)
    return [first, _cfg(4, 2, BM=64, BN=64, BK=bk), _cfg(8, 3, BM=128, BN=64, BK=bk)]


def coarse_lse_split(Ra: int, Rb: int, arch: Optional[Arch]) -> Tuple[int, int]:
    """(splits, columns per split) of the column axis.  Rows alone give cdiv(Ra, 64) programs, 64
    at B = 4096 for 132 SMs: split the columns until there are >= 2 programs per SM (each split
    >= 256 columns; splits are multiples of 128 columns, every config's BN divides them) and merge
    the partial log-sum-exps (`_coarse_lse_merge_kernel`).  Interpreter: 8-column splits."""
    if Rb <= 0:
        return 1, 1
    gran, min_tiles = (8, 1) if arch is None else (128, 2)
    tiles = _cdiv(Rb, gran)
    want = _cdiv(Rb, gran) if arch is None else _cdiv(2 * arch.sms, _cdiv(Ra, 64))
    n = max(1, min(want, tiles // min_tiles))
    per = _cdiv(tiles, n)
    return _cdiv(tiles, per), per * gran


def coarse_grad_configs(D: int, dtype: torch.dtype, arch: Optional[Arch]) -> List[dict]:
    """`_coarse_grad_kernel`: 64 x 64 z tiles on 4 warps, dA blocks of BD columns (z recomputed
    once per D block: 8x at D = 512 with BD = 64, the trade for no (B, D) fp32 atomics).
    Audited (bf16, D = 512): BD = 128 on 4 warps spills (520 bytes sm_80, 72 sm_90a); BD = 64 on
    4 warps none (254 / 185 registers); BD = 128 on 8 warps none (207 / 190), half the z recompute."""
    if arch is None:
        return [_cfg(1, 1, BM=8, BN=8, BK=16, BD=16)]
    bk, bd = _bk(D, dtype), min(64, max(16, _p2(D)))
    return [_cfg(4, 2, BM=64, BN=64, BK=bk, BD=bd), _cfg(8, 2, BM=64, BN=64, BK=bk, BD=min(128, max(16, _p2(D)))),
            _cfg(4, 2, BM=64, BN=64, BK=bk, BD=min(bd, 32))]


def fine_tile(T: int, Mx: int, My: int, R: int, BB: int, min_cols: int) -> dict:
    """Tile constexprs: R rows (pow2 >= T), BB clips, PX / PY slots per clip for x / y (pow2, and
    BB * P >= min_cols: tl.dot's smallest N on CUDA is 16).  PY = PX without a y group."""
    px, py = _p2(Mx), (_p2(My) if My else 0)
    bb = max(1, min(BB, 128 // max(px, py)))
    PX = max(px, min_cols // bb)
    return dict(R=R, BB=bb, PX=PX, PY=max(py, min_cols // bb) if My else PX)


def fine_waste(T: int, Mx: int, My: int, R: int, BB: int, PX: int, PY: int, **_) -> float:
    """Share of the similarity MMAs of full tiles that multiply padding (rows past AT * T, slots
    past Mx / My)."""
    AT = min(R // T, ATMAX)
    return 1.0 - (AT * T * (Mx + My)) / (R * (PX + (PY if My else 0)))


def fine_waste_unpacked(T: int, Mx: int, My: int) -> float:
    """The same share for the layout before (one text of next_pow2(T) >= 16 rows x BB clips of
    next_pow2(Mx + My) slots): 61% at T = 40, 4 + 1 slots."""
    return 1.0 - (T * (Mx + My)) / (max(16, _p2(T)) * _p2(Mx + My))


def fine_configs(kind: str, T: int, Mx: int, My: int, D: int, dtype: torch.dtype,
                 arch: Optional[Arch]) -> List[dict]:
    """kind "fwd" / "text" (d_text) / "modal" (d_modal).  Rows: 64 for T <= 32 (AT = 64 // T
    texts), else 128 (3 x 40 = 120 live at VALOR's T = 40).  Forward: 16 clips a tile (4 frames +
    1 audio: 64 + 16 columns, none padded; 6% of the MMAs multiply padding), 8 warps (a 128-row
    tile; 4 warps reach 255 registers).  Backward (sim tile and argmaxes recomputed per D block
    of BD = 32 columns, 64 for sm_90a d_modal): "packed" = 3 texts in 128 rows x 8 clips (x 32
    columns, y 16: the y slot padded to 2 for tl.dot's N >= 16), 22% of the similarity MMAs
    multiply padding; "r64" = one text in 64 rows x 8 clips, 48% (61% with 4 clips).  Audited
    (bench/kernel_audit.py, D = 512, text_floor, B 512 / 4096; registers / spill bytes, bf16 and
    fp16, 8 warps, 2 stages):
      d_text   sm_80  packed BK 64: bf16 255 / 0, fp16 255 / 0;  r64: 255 / 0
               sm_90a packed BK 32: 255 / 0, 254 / 0 (BK 64: 36 bytes bf16);  r64: 221-223 / 0
      d_modal  sm_80  packed BK 32 BD 32 (two hi / lo MMAs): 255 / 0 (BK 64: 24 bytes; one
                      MMA over K = 2R: 364-496 bytes, its duplicated operand in registers);
                      r64 x 4 clips: 217-220 / 0
               sm_90a packed BD 64, hi / lo as one MMA over K = 2R (HILO_K2): BK 64 236 / 0
                      bf16, 242 / 0 fp16 (44 KB shared); BK 32 244 / 0, 251 / 0 (22 KB).  With
                      two MMAs the packed tile spilled at BD 16-32 under every BK / stages /
                      warps tried (36-432 bytes: the gradient dots on mma.sync, every warp
                      holding all of d_sim) and at BD 128 (104-308); BD 64 sat at 254-255
                      registers (0-56 bytes; 0 only at BK 32, 2 stages) with the hi dot done
                      twice, once per warpgroup.  So sm_90a ran r64 (48%) before.
               fp32 (tf32 products; not gated) keeps r64 on sm_90a: 64 bytes against 952-2136
               for the packed tile."""
    if kind not in ("fwd", "text", "modal"):
        raise ValueError(f"fine_configs: kind must be fwd, text or modal, got {kind!r}")
    if arch is None:
        t = fine_tile(T, Mx, My, 16 if T <= 8 else _p2(T), 4, 8)
        extra = {"fwd": {}, "text": dict(BD=16), "modal": dict(BD=16, HILO_K2=_FINE_HILO_K2)}[kind]
        return [_cfg(1, 1, BK=16, **t, **extra)]
    R = 64 if T <= 32 else 128
    bk = _bk(D, dtype)
    if kind == "fwd":
        return [_cfg(8, 3, BK=bk, **fine_tile(T, Mx, My, R, 16, 16)),
                _cfg(4, 3, BK=bk, **fine_tile(T, Mx, My, R, 8, 16)), _cfg(8, 3, BK=bk, **fine_tile(T, Mx, My, R, 8, 16))]
    bd = min(32, max(16, _p2(D)))
    r64 = max(64, _p2(T))
    packed = fine_tile(T, Mx, My, R, 8, 16)
    if kind == "text":
        return [_cfg(8, 2, BK=bk if arch.cc < 90 else min(bk, 32), BD=bd, **packed),
                _cfg(8, 2, BK=bk, BD=bd, **fine_tile(T, Mx, My, r64, 8, 16))]
    if arch.cc >= 90 and dtype == torch.float32:  # tf32 products: packed spills 952-2136 bytes, r64 64
        return [_cfg(8, 2, BK=bk, BD=bd, HILO_K2=False, **fine_tile(T, Mx, My, r64, 8, 16))]
    if arch.cc >= 90:
        # BD 64 = the transposed product's M: one 64-row wgmma a warpgroup (4 x 2 warps over 64 x C)
        bd90 = min(64, max(16, _p2(D)))
        return [_cfg(8, 2, BK=bk, BD=bd90, HILO_K2=True, **packed),
                _cfg(8, 2, BK=min(bk, 32), BD=bd90, HILO_K2=True, **packed)]
    return [_cfg(8, 2, BK=min(bk, 32), BD=bd, HILO_K2=False, **packed),
            _cfg(8, 2, BK=bk, BD=bd, HILO_K2=False, **fine_tile(T, Mx, My, r64, 4, 16))]


def _precisions(dtype: torch.dtype, arch: Optional[Arch]) -> Tuple[str, str, bool]:
    """(PREC for the feature products, GPREC for the fp32-by-feature gradient products, EMU).
    16-bit inputs: features as-is on tensor cores; gradient products as a 16-bit hi + lo pair
    (two MMAs with exact products, fp32 accumulation: P / d_sim kept to ~2^-16 relative).  One
    16-bit rounding of P / d_sim ("single", one MMA) is cheaper but too coarse: 15-57% of the bf16
    gradient elements then differ from round(float64 truth), against <= 1.3% with hi / lo (the
    same scheme measured on the csrc kernels, tests/csrc/test_csrc_contrastive.py; here
    tests/kernels/test_contrastive.py::test_gradient_products_single_rounding_is_too_coarse).
    fp32: tf32 when torch allows it for matmuls, else tf32x3.  arch None: the CPU interpreter
    (EMU: 16-bit operands upcast, hi / lo rounded by hand: the products a tensor core forms)."""
    if arch is None:  # only reachable under TRITON_INTERPRET
        return "upcast", (_GPREC_OVERRIDE or "hilo") if dtype != torch.float32 else "ieee", True
    if dtype == torch.float32:
        p = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
        return p, p, False
    return "native", _GPREC_OVERRIDE or "hilo", False


_GPREC_OVERRIDE: Optional[str] = None  # "single": the tests' measurement of the rejected choice
# the interpreter's d_modal hi / lo form (`_gmma` HILO_K2): sm_90a's one MMA over K = 2R by
# default; the tests also run sm_80's two MMAs (False) against float64
_FINE_HILO_K2: bool = True

_TUNED: Dict[tuple, object] = {}
COARSE_KEY = ("Ra", "Rb", "D")
FINE_KEY = ("Bt", "Bm", "T", "Mx", "My", "D")


def tuned(kernel, configs: List[dict], key: Tuple[str, ...]):
    """`kernel` under triton.autotune over `configs` (cached per kernel and config set), keyed by
    the shape arguments; a single config runs without benchmarking (the interpreter's case)."""
    k = (kernel, tuple(tuple(sorted(c.items())) for c in configs))
    t = _TUNED.get(k)
    if t is None:
        tc = [triton.Config({n: v for n, v in c.items() if n not in ("num_warps", "num_stages")},
                            num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]
        t = _TUNED.setdefault(k, triton.autotune(configs=tc, key=list(key))(kernel))
    return t


class Plan(NamedTuple):
    """One launch as the launcher makes it: the kernel, its positional arguments, the constexprs
    fixed by the call, the configurations autotuned over (the first is the default), the
    autotune key and the grid (a function of a configuration).  `run()` launches it; the audit
    (bench/audit_contrastive.py) compiles the same arguments on meta tensors for sm_80 / sm_90a."""
    kernel: object
    args: tuple
    constexprs: dict
    configs: List[dict]
    key: Tuple[str, ...]
    grid: object

    def run(self) -> None:
        tuned(self.kernel, self.configs, self.key)[self.grid](*self.args, **self.constexprs)


def _grad_buffer(x: Tensor, zero: bool = False) -> Tensor:
    """Gradient output for `x`.  The Triton CPU interpreter casts fp32 -> bf16 by truncation (not
    round-to-nearest as CUDA does), so there bf16 gradients are written in fp32 and rounded by
    torch (callers `.to(x.dtype)`, a no-op elsewhere)."""
    dt = torch.float32 if (x.dtype == torch.bfloat16 and x.device.type != "cuda") else x.dtype
    return (torch.zeros if zero else torch.empty)(x.shape, dtype=dt, device=x.device)


def _pow2_scale(bound: Tensor) -> Tensor:
    """2^k with bound * 2^k < 2^12, elementwise (1 where bound is 0 or not finite): the fp16
    pre-scale of P / d_sim so small values stay normal, 16x below fp16's 65504."""
    _, e = torch.frexp(bound)  # bound = m 2^e, 1/2 <= m < 1
    s = torch.ldexp(torch.ones_like(bound), (12 - e).clamp(-60, 60))
    return torch.where((bound > 0) & torch.isfinite(bound), s, torch.ones_like(bound))


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


def coarse_lse_plans(a: Tensor, b: Tensor, temp: Tensor, lab_off: int, valid_b: Optional[Tensor],
                     arch: Optional[Arch]) -> Tuple[List[Plan], Tensor, Tensor]:
    """The two launches of `coarse_lse` on target `arch` (None: the interpreter) and its outputs:
    the column splits (`coarse_lse_split`: enough programs for the SMs), then their merge."""
    Ra, D = a.shape
    Rb = b.shape[0]
    lse = torch.empty(Ra, dtype=torch.float32, device=a.device)
    zl = torch.empty(Ra, dtype=torch.float32, device=a.device)
    nsplit, cps = coarse_lse_split(Ra, Rb, arch)
    part = torch.empty((3, nsplit, Ra), dtype=torch.float32, device=a.device)
    prec, _, _ = _precisions(a.dtype, arch)
    split = Plan(_coarse_lse_kernel,
                 (a, b, temp, _mask_arg(valid_b, lse), part, Ra, Rb, D, a.stride(0), b.stride(0), lab_off, cps),
                 dict(HAS_VALID=valid_b is not None, PREC=prec), coarse_lse_configs(D, a.dtype, arch), COARSE_KEY,
                 lambda m: (triton.cdiv(Ra, m["BM"]), nsplit))
    br = 8 if arch is None else 256
    merge = Plan(_coarse_lse_merge_kernel, (part, lse, zl, Ra, nsplit), {}, [_cfg(4 if arch else 1, 1, BR=br)],
                 ("Ra",), lambda m: (triton.cdiv(Ra, m["BR"]),))
    return [split, merge], lse, zl


def coarse_lse(a: Tensor, b: Tensor, temp: Tensor, lab_off: int = 0,
               valid_b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Rows of a (Ra, D) vs columns b (Rb, D), both contiguous in one dtype; temp (1,).  ->
    (lse (Ra,) fp32 over the valid columns, +inf for a row with none; label logit z_{i, i+lab_off}
    (Ra,) fp32).  valid_b: (Rb,) bool or None (every column)."""
    plans, lse, zl = coarse_lse_plans(a, b, temp, lab_off, valid_b, arch_of(a.device))
    if a.shape[0] > 0:
        for pl in plans:
            pl.run()
    return lse, zl


def coarse_grad_plan(a: Tensor, b: Tensor, temp: Tensor, scale: Tensor, lse_a: Optional[Tensor],
                     lse_b: Optional[Tensor], lab_off: int, lab_coef: float, tsum: bool,
                     valid_a: Optional[Tensor], valid_b: Optional[Tensor], arch: Optional[Arch]
                     ) -> Tuple[Plan, Tensor, Optional[Tensor]]:
    """The launch of `coarse_grad` on target `arch` and its outputs (da, row sums or None)."""
    Ra, D = a.shape
    da = _grad_buffer(a)
    ts = torch.empty(Ra, dtype=torch.float32, device=a.device) if tsum else None
    prec, gprec, emu = _precisions(a.dtype, arch)
    # fp16: |P| <= 2 + |coef| (each exp term <= 1), scaled below 2^12 so small probabilities stay normal
    ps = float(_pow2_scale(torch.tensor(2.0 + abs(float(lab_coef))))) if a.dtype == torch.float16 else 1.0
    plan = Plan(_coarse_grad_kernel,
                (a, b, temp, scale, lse_a if lse_a is not None else scale, lse_b if lse_b is not None else scale,
                 _mask_arg(valid_a, scale), _mask_arg(valid_b, scale), da, ts if ts is not None else scale,
                 Ra, b.shape[0], D, a.stride(0), b.stride(0), da.stride(0), lab_off, float(lab_coef), ps),
                dict(HAS_LSE_A=lse_a is not None, HAS_LSE_B=lse_b is not None, HAS_VALID=valid_a is not None,
                     COMPUTE_TSUM=tsum, PREC=prec, GPREC=gprec, EMU=emu),
                coarse_grad_configs(D, a.dtype, arch), COARSE_KEY,
                lambda m: (triton.cdiv(Ra, m["BM"]), triton.cdiv(D, m["BD"])))
    return plan, da, ts


def coarse_grad(a: Tensor, b: Tensor, temp: Tensor, scale: Tensor, lse_a: Optional[Tensor],
                lse_b: Optional[Tensor], lab_off: int, lab_coef: float, tsum: bool,
                valid_a: Optional[Tensor] = None, valid_b: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """d a (Ra, D) in a's dtype = scale * P @ b (see `_coarse_grad_kernel` for P), and with tsum
    the (Ra,) fp32 row sums of P * z; temp / scale (1,) fp32; valid_a (Ra,) and valid_b (Rb,)
    bool, both or neither."""
    if (valid_a is None) != (valid_b is None):
        raise ValueError("coarse_grad: valid_a and valid_b go together")
    plan, da, ts = coarse_grad_plan(a, b, temp, scale, lse_a, lse_b, lab_off, lab_coef, tsum, valid_a, valid_b,
                                    arch_of(a.device))
    if a.shape[0] > 0:
        plan.run()
    return da.to(a.dtype), ts


# ----------------------------------------------------------------------------------------------
# fine: launchers
# ----------------------------------------------------------------------------------------------
def check_fine_args(text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor], mw: Tensor,
                    mmask: Tensor, tfloor: Optional[Tensor] = None) -> None:
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
    if tfloor is not None and tuple(tfloor.shape) != (Bt,):
        raise ValueError(f"fine similarity: text_floor must be ({Bt},), got {tuple(tfloor.shape)}")


def prepare_fine_args(text, wt, tmask, x, y, mw, mmask, tfloor=None):
    """Validate and lay out the fine launchers' arguments (both backends): contiguous features,
    fp32 weights, uint8 masks and floors (y and tfloor stay None when absent).  Idempotent.
    Returns 7 values without tfloor (the old layout), 8 with it."""
    check_fine_args(text, wt, tmask, x, y, mw, mmask, tfloor)
    text, x = text.contiguous(), x.contiguous()
    y = None if y is None else y.contiguous()
    wt = wt.float().contiguous()
    mw = mw.float().contiguous()
    tmask = tmask.to(torch.uint8).contiguous()
    mmask = mmask.to(torch.uint8).contiguous()
    if tfloor is None:
        return text, wt, tmask, x, y, mw, mmask
    return text, wt, tmask, x, y, mw, mmask, tfloor.to(torch.uint8).contiguous()


def _fine_common(text, x, y, mw, tfloor):
    """Shape arguments and constexpr flags shared by the three fine launches."""
    Bt, T, D = text.shape
    Bm, Mx, _ = x.shape
    My = y.shape[1] if y is not None else 0
    shape = (Bt, Bm, T, Mx, My, D)
    strides = (text.stride(0), text.stride(1), x.stride(0), x.stride(1),
               (y if y is not None else x).stride(0), (y if y is not None else x).stride(1), mw.stride(0))
    return shape, strides, dict(HAS_Y=y is not None, HAS_FLOOR=tfloor is not None, ATMAX=ATMAX)


def _fine_grid_rows(m, Bt: int, T: int) -> int:
    return triton.cdiv(Bt, min(m["R"] // T, ATMAX))


def fine_fwd_plan(text, wt, tmask, x, y, mw, mmask, tfloor, arch: Optional[Arch]) -> Tuple[Plan, Tensor]:
    """The launch of `fine_fwd` on target `arch` (prepared arguments) and its output S."""
    (Bt, Bm, T, Mx, My, D), strides, flags = _fine_common(text, x, y, mw, tfloor)
    S = torch.empty((mw.shape[0], Bt, Bm), dtype=torch.float32, device=text.device)
    prec, _, _ = _precisions(text.dtype, arch)
    plan = Plan(_fine_fwd_kernel,
                (text, wt, tmask, tmask if tfloor is None else tfloor, x, x if y is None else y, mw, mmask, S,
                 Bt, Bm, T, Mx, My, D, *strides, S.stride(0)),
                dict(PREC=prec, **flags), fine_configs("fwd", T, Mx, My, D, text.dtype, arch), FINE_KEY,
                lambda m: (_fine_grid_rows(m, Bt, T), triton.cdiv(Bm, m["BB"])))
    return plan, S


def fine_fwd(text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor], mw: Tensor,
             mmask: Tensor, tfloor: Optional[Tensor] = None) -> Tensor:
    """Fine similarity of every text vs every clip for the groups x, (y, x++y).

    text (Bt, T, D); wt (Bt, T) softmaxed text weights (0 at padding); tmask (Bt, T) real tokens;
    x (Bm, Mx, D), y (Bm, My, D) or None; mw (G, Bm, Mx+My) softmaxed modal weights per group
    (G = 1: x; G = 3: x, y, concatenation), each zero outside its group's slots; mmask (Bm, Mx+My);
    tfloor (Bt,) or None: texts whose modal-side maxima are floored at 0 (text_floor).
    Returns S (G, Bt, Bm) fp32."""
    text, wt, tmask, x, y, mw, mmask, *tf = prepare_fine_args(text, wt, tmask, x, y, mw, mmask, tfloor)
    plan, S = fine_fwd_plan(text, wt, tmask, x, y, mw, mmask, tf[0] if tf else None, arch_of(text.device))
    if S.numel() > 0:
        plan.run()
    return S


def fine_bwd_plans(dS, text, wt, tmask, x, y, mw, mmask, tfloor, arch: Optional[Arch]):
    """The two launches of `fine_bwd` (d_text, d_modal) on target `arch` (prepared arguments, dS
    fp32 contiguous) and its buffers (d_text, g_wt, d_x, d_y, g_mw)."""
    (Bt, Bm, T, Mx, My, D), strides, flags = _fine_common(text, x, y, mw, tfloor)
    d_text, d_x = _grad_buffer(text, zero=True), _grad_buffer(x, zero=True)
    d_y = _grad_buffer(y, zero=True) if y is not None else text.new_empty((0,))
    g_wt = torch.zeros((Bt, T), dtype=torch.float32, device=text.device)
    g_mw = torch.zeros(tuple(mw.shape), dtype=torch.float32, device=text.device)
    prec, gprec, emu = _precisions(text.dtype, arch)
    fp16 = text.dtype == torch.float16
    tot = dS.abs().sum(0) if fp16 else None  # (Bt, Bm): bounds every d_sim entry of the pair
    sc_t, sc_m = (_pow2_scale(tot.amax(1)), _pow2_scale(tot.amax(0))) if fp16 else (dS, dS)
    common = (tmask if tfloor is None else tfloor, x, x if y is None else y, mw, mmask, dS)
    flags.update(HAS_SCALE=fp16, PREC=prec, GPREC=gprec, EMU=emu)
    dy = d_y if y is not None else d_x
    text_plan = Plan(_fine_bwd_text_kernel,
                     (text, wt, tmask, *common, sc_t, d_text, g_wt, Bt, Bm, T, Mx, My, D, *strides, dS.stride(0),
                      d_text.stride(0), d_text.stride(1)),
                     flags, fine_configs("text", T, Mx, My, D, text.dtype, arch), FINE_KEY,
                     lambda m: (_fine_grid_rows(m, Bt, T), triton.cdiv(D, m["BD"])))
    modal_plan = Plan(_fine_bwd_modal_kernel,
                      (text, wt, tmask, *common, sc_m, d_x, dy, g_mw, Bt, Bm, T, Mx, My, D, *strides, dS.stride(0),
                       d_x.stride(0), d_x.stride(1), dy.stride(0), dy.stride(1)),
                      flags, fine_configs("modal", T, Mx, My, D, text.dtype, arch), FINE_KEY,
                      lambda m: (triton.cdiv(Bm, m["BB"]), triton.cdiv(D, m["BD"]) + 1))  # + 1: slot weight grads
    return [text_plan, modal_plan], (d_text, g_wt, d_x, d_y, g_mw)


def fine_bwd(dS: Tensor, text: Tensor, wt: Tensor, tmask: Tensor, x: Tensor, y: Optional[Tensor], mw: Tensor,
             mmask: Tensor, tfloor: Optional[Tensor] = None):
    """-> (d_text, g_wt (Bt, T) fp32, d_x, d_y (empty when y is None), g_mw (G, Bm, Mx+My) fp32);
    g_wt / g_mw are gradients w.r.t. the softmaxed weights.  fp16: d_sim is pre-scaled per text
    (d_text) and per clip (d_modal) by a power of two from a bound on its entries, sum_g |dS_g|."""
    text, wt, tmask, x, y, mw, mmask, *tf = prepare_fine_args(text, wt, tmask, x, y, mw, mmask, tfloor)
    plans, (d_text, g_wt, d_x, d_y, g_mw) = fine_bwd_plans(dS.float().contiguous(), text, wt, tmask, x, y, mw,
                                                           mmask, tf[0] if tf else None, arch_of(text.device))
    if text.shape[0] > 0 and x.shape[0] > 0:
        for pl in plans:
            pl.run()
    return (d_text.to(text.dtype), g_wt, d_x.to(x.dtype), d_y.to(y.dtype) if y is not None else d_y, g_mw)
