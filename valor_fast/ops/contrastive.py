"""MGA contrastive losses: the public entry points, their dispatch, and the torch backend.

Shapes: coarse text (B, D) vs modal (B, D); fine text (Bt, T, D) with weights/masks (Bt, T)
vs modal (Bm, M, D) with weights/masks (Bm, M).  Masks are bool, True = real token; weights
are pre-softmax logits.  logits = S / temperature; loss = mean of the text->modal and
modal->text cross-entropies with the matching pair on the diagonal.

The spec (`*_ref`) sits at the top of valor_fast.kernels.contrastive with the Triton kernels;
the custom ops over each kernel backend (Triton, and CUDA C++ through valor_fast.ops._cuda) come
from valor_fast.ops.contrastive_op.  This module picks the backend per call and holds the
torch backend: the references' similarity with an InfoNCE that masks invalid samples without a
host sync.  Negatives from other ranks arrive only through valor_fast.ops.distributed: gather
the features first (full batch on every rank), or pass `negatives=gather_negatives(...)` for
the local loss.

Backend choice, per call (valor_fast.ops.backend.BackendSwitch):
  1. a backend forced in code (`set_backend` / `use_backend`, for tests and benchmarks),
  2. else the env var VALOR_FAST_CONTRASTIVE=triton|cuda|torch|auto (read per call),
  3. else auto: CUDA tensors -> triton (valor_fast.kernels.contrastive) when triton is installed,
     else cuda (csrc/contrastive.cu via ctypes) when the library was built, else torch;
     CPU tensors -> torch.  Forcing triton on CPU needs TRITON_INTERPRET=1; forcing cuda needs
     CUDA tensors and the built library.
Auto also falls back to torch for inputs the kernels do not take (float64, D > MAX_D, T > MAX_T,
more than MAX_SLOTS modal tokens per clip: valor_fast.kernels.contrastive's limits).  The C
kernels take no sample masks: a valid-masked coarse call on cuda goes to triton (else torch),
logged once.  Both kernel backends use tensor cores (Triton's tl.dot; csrc's mma.sync with
ldmatrix and cp.async, 3xTF32 for fp32).  Triton stays first in auto until a GPU benchmark
(bench/bench_contrastive.py) says otherwise: neither has been timed on a GPU yet.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import valor_fast.kernels.contrastive as kc

from ..utils.deps import HAS_TRITON, INSTALL_HINTS
from . import _cuda
from .backend import BackendSwitch, triton_device_reason
from .contrastive_op import make_ops
from .distributed import Negatives

BACKENDS = ("triton", "cuda", "torch")
_ENV = "VALOR_FAST_CONTRASTIVE"


# ---- backend switch --------------------------------------------------------------------------

def _probe() -> Dict[str, Tuple[bool, str]]:
    # the CUDA C++ library is loaded (and its runtime probed) on the first call that asks for it,
    # in _check: loading it at import would initialise CUDA in every process that imports ops
    return {"triton": (True, "installed") if HAS_TRITON else (False, f"triton not installed ({INSTALL_HINTS['triton']})"),
            "cuda": (True, "libvalor_fast_cuda.so, loaded on first use"), "torch": (True, "torch")}


def _check(backend: str, device: torch.device, unsupported: Optional[str] = None) -> Optional[str]:
    # a forced kernel backend takes any input its device allows: an unsupported shape or dtype is
    # left to the kernel's own error, which names it
    if backend == "triton":
        return triton_device_reason(device)
    if backend == "cuda":
        if device.type != "cuda":
            return f"{device.type} tensors (the CUDA C++ backend needs CUDA tensors)"
        if not _cuda.available():
            return _cuda.why_unavailable()
    return None


def _auto(device: torch.device, unsupported: Optional[str] = None) -> Tuple[str, str]:
    if device.type != "cuda":
        return "torch", f"{device.type} tensors"
    if unsupported is not None:
        return "torch", unsupported
    if HAS_TRITON:
        return "triton", "CUDA"
    if _cuda.available():
        return "cuda", f"CUDA, triton not installed ({INSTALL_HINTS['triton']})"
    return "torch", f"triton not installed ({INSTALL_HINTS['triton']}) and csrc not built"


SWITCH = BackendSwitch("contrastive", _ENV, BACKENDS, _probe, _auto, _check)
set_backend = SWITCH.set_backend
use_backend = SWITCH.use_backend
get_forced_backend = SWITCH.forced


def available_backends(device: torch.device) -> List[str]:
    """Backends that can run on tensors of `device` in this process."""
    return [b for b in ("torch", "triton", "cuda") if SWITCH.why_not(b, device=device) is None]


def _choose(op: str, device: torch.device, unsupported: Optional[str], masked: bool = False) -> str:
    """`unsupported`: why the kernels cannot take these inputs, or None.  `masked`: a coarse call
    with valid masks, which the CUDA C++ kernels do not take."""
    backend = SWITCH.choose(op, device=device, unsupported=unsupported)
    if backend == "cuda" and masked:
        backend = "triton" if SWITCH.why_not("triton", device=device) is None else "torch"
        SWITCH.log(op, backend, "the CUDA C++ kernels take no valid masks")
    return backend


# custom ops of both kernel backends, registered at import (never inside a torch.compile trace)
TRITON_OPS = make_ops("", kc)
CUDA_OPS = make_ops("cuda_", _cuda)


def _kernel_ops(backend: str):
    return TRITON_OPS if backend == "triton" else CUDA_OPS


# ---- torch backend: InfoNCE, masked without host syncs ---------------------------------------

def masked_ce_rows(logits: torch.Tensor, offset: int, row_valid: torch.Tensor,
                   col_valid: torch.Tensor) -> torch.Tensor:
    """(R, C) logits -> (R,) cross-entropy of row i against label column offset + i, softmax over
    the valid columns only; 0 at invalid rows.  No host sync: masks stay tensors.  Excluded
    columns are -inf (exp gives exactly 0, so the valid rows' values are those of the subset);
    excluded rows are zeroed first so their log-sum-exp is finite and their gradient exactly 0."""
    z = logits.masked_fill(~col_valid[None, :], float("-inf")).masked_fill(~row_valid[:, None], 0.0)
    label = torch.arange(offset, offset + logits.shape[0], device=logits.device)
    ce = torch.logsumexp(z, dim=1) - logits.gather(1, label[:, None]).squeeze(1)
    return torch.where(row_valid, ce, torch.zeros_like(ce))


def masked_mean_loss(ce_sum: torch.Tensor, n_valid: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * ce_sum / (2 n) for n >= 2 valid samples, else exactly 0 with zero gradients."""
    n = n_valid.to(ce_sum.dtype)
    loss = ce_sum * (scale / 2.0) / n.clamp(min=1.0)
    return torch.where(n_valid >= 2, loss, torch.zeros_like(loss))


def masked_info_nce(s_rows: torch.Tensor, s_cols: torch.Tensor, offset: int, valid_rows: torch.Tensor,
                    valid_cols: torch.Tensor, world: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE over the valid samples of logits (already divided by the temperature).
    s_rows (B, N): these rows vs all columns; s_cols (N, B): all rows vs these columns; the label
    of local sample i is offset + i; valid_rows (B,), valid_cols (N,) bool.  Square case: N == B,
    offset 0, the same mask twice.  Local case (this rank's B of the N = world * B gathered): the
    loss is scaled by world / (2 n_global), so the mean over ranks is the full-batch loss."""
    ce = (masked_ce_rows(s_rows, offset, valid_rows, valid_cols).sum()
          + masked_ce_rows(s_cols.t(), offset, valid_rows, valid_cols).sum())
    return masked_mean_loss(ce, valid_cols.sum(), float(world))


def info_nce(sim: torch.Tensor, temperature: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) similarity with matches on the diagonal; valid (B,) bool:
    only pairs of valid samples take part (`masked_info_nce`)."""
    if valid is None:
        return kc.info_nce_ref(sim, temperature)
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"InfoNCE needs a square (B, B) similarity, got {tuple(sim.shape)}")
    kc.check_valid(valid, sim.shape[0])
    logits = kc.acc_dtype(sim) / kc.acc_dtype(temperature)
    return masked_info_nce(logits, logits, 0, valid, valid)


def info_nce_local(s_rows: torch.Tensor, s_cols: torch.Tensor, temperature: torch.Tensor, offset: int,
                   valid_rows: Optional[torch.Tensor] = None, valid_cols: Optional[torch.Tensor] = None,
                   world: int = 1) -> torch.Tensor:
    """InfoNCE of this rank's rows against all gathered columns (open_clip's local_loss).
    s_rows (B, N): local texts vs all clips; s_cols (N, B): all texts vs local clips.  The label of
    local row i is column offset + i.  Equals `info_nce` when B == N and offset == 0.  With masks
    (valid_rows (B,) local, valid_cols (N,) gathered) see `masked_info_nce`."""
    B = s_rows.shape[0]
    if s_cols.shape != s_rows.shape[::-1] or not 0 <= offset <= s_rows.shape[1] - B:
        raise ValueError(f"info_nce_local: s_rows {tuple(s_rows.shape)}, s_cols {tuple(s_cols.shape)}, "
                         f"offset {offset} do not fit")
    t = kc.acc_dtype(temperature)
    if valid_rows is not None:
        return masked_info_nce(kc.acc_dtype(s_rows) / t, kc.acc_dtype(s_cols) / t, offset, valid_rows, valid_cols,
                               world)
    target = torch.arange(offset, offset + B, device=s_rows.device)
    return 0.5 * (F.cross_entropy(kc.acc_dtype(s_rows) / t, target)
                  + F.cross_entropy(kc.acc_dtype(s_cols).t() / t, target))


def _local_masks(name: str, valid: Optional[torch.Tensor], neg: Optional[Negatives]):
    """(valid of this rank's rows, valid of the gathered columns) for group `name`."""
    if neg is None:
        return valid, None
    vc = neg.valid.get(name)
    if (valid is None) != (vc is None):
        raise ValueError(f"group {name!r}: valid and the negatives' valid masks go together (pass the same "
                         f"valid to gather_negatives)")
    return valid, vc


# ---- coarse ----------------------------------------------------------------------------------

def _coarse_unsupported(text: torch.Tensor) -> Optional[str]:
    if text.dtype not in kc.DTYPES:
        return f"dtype {text.dtype}"
    if text.shape[-1] > kc.MAX_D:
        return f"D={text.shape[-1]} > {kc.MAX_D}"
    return None


def _coarse_torch(text, modal, temperature, neg, name, valid, vc):
    t, m = kc.acc_dtype(text), kc.acc_dtype(modal)
    if neg is None:
        return info_nce(t @ m.t(), temperature, valid)
    return info_nce_local(t @ kc.acc_dtype(neg.groups[name]).t(), kc.acc_dtype(neg.text) @ m.t(), temperature,
                          neg.offset, valid, vc, neg.world)


def _coarse(text, modal, temperature, valid=None, neg: Optional[Negatives] = None, name: str = "m"):
    if text.dim() != 2 or modal.dim() != 2 or text.shape != modal.shape:
        raise ValueError(f"coarse mode needs text and modal of equal shape (B, D); got "
                         f"{tuple(text.shape)} and {tuple(modal.shape)}")
    if temperature.numel() != 1:
        raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
    kc.check_valid(valid, text.shape[0])
    valid, vc = _local_masks(name, valid, neg)
    backend = _choose("coarse", text.device, _coarse_unsupported(text), masked=valid is not None)
    if backend == "torch":
        return _coarse_torch(text, modal, temperature, neg, name, valid, vc)
    ops = _kernel_ops(backend)
    if neg is None:
        s = ops.coarse_sum(text, modal, temperature, valid=valid)
    else:
        s = ops.coarse_sum(text, modal, temperature, neg.text, neg.groups[name], neg.offset, valid, vc)
    if valid is None:
        return s / (2 * text.shape[0])  # the mean over this rank's rows of both directions
    return masked_mean_loss(s, (valid if vc is None else vc).sum(), float(1 if neg is None else neg.world))


# ---- fine ------------------------------------------------------------------------------------

def _fine_unsupported(text, parts, floored: bool = False) -> Optional[str]:
    dts = {text.dtype} | {p[0].dtype for p in parts}
    if not dts <= set(kc.DTYPES):
        return f"dtype {sorted(map(str, dts))}"
    if text.shape[-1] > kc.MAX_D:
        return f"D={text.shape[-1]} > {kc.MAX_D}"
    T = text.shape[1] + (1 if floored else 0)  # the floor rides as one more token
    if T > kc.MAX_T:
        return f"T={T} > {kc.MAX_T}" + (" (with the text_floor token)" if floored else "")
    slots = sum(p[0].shape[1] for p in parts)
    if slots > kc.MAX_SLOTS:
        return f"{slots} modal tokens per clip > {kc.MAX_SLOTS}"
    return None


def _ones_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _floor_as_token(text, wt, tmask, text_floor):
    """The floor as one more text token: a zero feature (similarity exactly 0 with every modal
    token), real for the modal-side max of the floored texts only, weight 0 on the text side, last
    (so an exact-0 tie goes to the real token: first index wins).  Its gradients are dropped."""
    Bt, _, D = text.shape
    text = torch.cat([text, text.new_zeros((Bt, 1, D))], 1)
    wt = torch.cat([wt, wt.new_zeros((Bt, 1))], 1)
    return text, wt, torch.cat([tmask, text_floor[:, None]], 1)


def _fine_sims(backend: str, text, text_weight, text_mask, parts, text_floor=None) -> List[torch.Tensor]:
    """parts: [(modal, weight, mask)] of one group, or two groups x, y -> [S_x] or [S_x, S_y, S_x++y],
    each (Bt, Bm).  text_floor: (Bt,) bool or None (see kc.fine_similarity_ref)."""
    for m, w, k in parts:
        kc.check_fine_inputs(text, text_weight, text_mask, m, w, k)
    kc.check_text_floor(text_floor, text.shape[0])
    if backend == "torch":
        out = [kc.fine_similarity_ref(text, text_weight, text_mask, *p, text_floor) for p in parts]
        if len(parts) == 2:
            cat = kc.resolve_groups({"x": parts[0], "y": parts[1], "xy": ("x", "y")}, "fine")["xy"]
            out.append(kc.fine_similarity_ref(text, text_weight, text_mask, *cat, text_floor))
        return out
    wt = kc.masked_softmax(text_weight, text_mask, text)  # (Bt, T), zero at padding
    tmask = _ones_mask(text) if text_mask is None else text_mask
    if text_floor is not None:
        text, wt, tmask = _floor_as_token(text, wt, tmask, text_floor)
    if len(parts) == 1:
        x, wx, mx = parts[0]
        mw = kc.masked_softmax(wx, mx, x)[None]  # (1, Bm, Mx)
        mmask = _ones_mask(x) if mx is None else mx
        y = None
    else:
        (x, wx, mx), (y, wy, my) = parts
        px, py = kc.masked_softmax(wx, mx, x), kc.masked_softmax(wy, my, y)  # (Bm, Mx), (Bm, My)
        zx, zy = torch.zeros_like(px), torch.zeros_like(py)
        lx = torch.zeros(x.shape[:2], device=x.device) if wx is None else wx
        ly = torch.zeros(y.shape[:2], device=y.device) if wy is None else wy
        mx_ = _ones_mask(x) if mx is None else mx
        my_ = _ones_mask(y) if my is None else my
        mmask = torch.cat([mx_, my_], 1)  # (Bm, Mx+My)
        pxy = kc.masked_softmax(torch.cat([kc.acc_dtype(lx), kc.acc_dtype(ly)], 1), mmask, x)  # softmax over the concatenation
        # group weights in the kernel's slot layout, zero outside the group's slots: (3, Bm, Mx+My)
        mw = torch.stack([torch.cat([px, zy], 1), torch.cat([zx, py], 1), pxy])
    S = _kernel_ops(backend).fine_sim_groups(text, wt, tmask, x, y, mw, mmask)
    return list(S.unbind(0))


def _fine_jobs(groups: Dict[str, kc.GroupSpec]):
    """Plan the kernel calls: a concatenation of two plain groups shares one call with both
    parts; other plain groups get one call each; longer concatenations are materialised.
    -> [(parts, names)] where names[i] is the group whose S is the call's i-th output (or None)."""
    plain = {n: s for n, s in groups.items() if not kc.is_concat(s)}
    for n, s in plain.items():
        if not (isinstance(s, (tuple, list)) and len(s) == 3 and isinstance(s[0], torch.Tensor)):
            raise ValueError(f"fine mode: group {n!r} must be (modal, modal_weight, modal_mask) or a tuple "
                             f"of group names, got {type(s).__name__}")
    jobs, done = [], set()
    for n, s in groups.items():
        if not kc.is_concat(s):
            continue
        bad = [p for p in s if p not in plain]
        if bad:
            raise ValueError(f"group {n!r} concatenates {s}, but {bad} are not plain groups")
        if len(s) == 2:
            names = [None if s[0] in done else s[0], None if s[1] in done or s[1] == s[0] else s[1], n]
            jobs.append(([tuple(plain[s[0]]), tuple(plain[s[1]])], names))
            done.update(x for x in names if x is not None)
        else:
            jobs.append(([kc.resolve_groups({**plain, n: s}, "fine")[n]], [n]))
            done.add(n)
    for n, s in plain.items():
        if n not in done:
            jobs.append(([tuple(s)], [n]))
    return jobs


def _fine_group_sims(backend, text, text_weight, text_mask, groups, text_floor=None) -> Dict[str, torch.Tensor]:
    out = {}
    for parts, names in _fine_jobs(groups):
        for name, S in zip(names, _fine_sims(backend, text, text_weight, text_mask, parts, text_floor)):
            if name is not None:
                out[name] = S
    return out


def _fine_backend(text, groups, neg: Optional[Negatives], floored: bool = False) -> str:
    plain_parts = [tuple(s) for s in groups.values() if not kc.is_concat(s)]
    unsupported = None
    for t in (text,) if neg is None else (text, neg.text):
        for s in plain_parts:
            unsupported = unsupported or _fine_unsupported(t, [s], floored)
    cat_slots = [sum(groups[p][0].shape[1] for p in s) for s in groups.values()
                 if kc.is_concat(s) and all(p in groups and not kc.is_concat(groups[p]) for p in s)]
    if unsupported is None and cat_slots and max(cat_slots) > kc.MAX_SLOTS:
        unsupported = f"{max(cat_slots)} concatenated modal tokens per clip > {kc.MAX_SLOTS}"
    return _choose("fine", text.device, unsupported)


def _fine_group_losses(text, groups, temperature, text_weight, text_mask, valid, neg: Optional[Negatives],
                       text_floor=None):
    if text.dim() != 3:
        raise ValueError(f"fine mode needs text (B, T, D), got {tuple(text.shape)}")
    if temperature.numel() != 1:
        raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
    kc.check_text_floor(text_floor, text.shape[0])
    if neg is not None and (text_floor is None) != (neg.text_floor is None):
        raise ValueError("text_floor and the negatives' text_floor go together (pass the same text_floor to "
                         "gather_negatives)")
    backend = _fine_backend(text, groups, neg, text_floor is not None)
    if neg is None:
        S = _fine_group_sims(backend, text, text_weight, text_mask, groups, text_floor)
        return {n: info_nce(s, temperature, valid.get(n)) for n, s in S.items()}
    # local: this rank's texts vs all clips, and all texts vs this rank's clips
    rows = _fine_group_sims(backend, text, text_weight, text_mask, neg.groups, text_floor)
    cols = _fine_group_sims(backend, neg.text, neg.text_weight, neg.text_mask, groups, neg.text_floor)
    out = {}
    for n in rows:
        vr, vc = _local_masks(n, valid.get(n), neg)
        out[n] = info_nce_local(rows[n], cols[n], temperature, neg.offset, vr, vc, neg.world)
    return out


# ---- public ----------------------------------------------------------------------------------

def fine_similarity(text, text_weight, text_mask, modal, modal_weight, modal_mask,
                    text_floor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(Bt, Bm) weighted token-wise max-similarity (differentiable), without (Bt, Bm, T, M) on the
    kernel backends.  text_floor (Bt,) bool: where True, that text's modal-side maxima over its
    real tokens are floored at 0 (upstream VALOR's padded max, docs/upstream.md P1;
    valor_fast.kernels.contrastive.upstream_text_floor gives upstream's rule); None: no floor."""
    kc.check_fine_inputs(text, text_weight, text_mask, modal, modal_weight, modal_mask)
    kc.check_text_floor(text_floor, text.shape[0])
    part = (modal, modal_weight, modal_mask)
    backend = _choose("fine", text.device, _fine_unsupported(text, [part], text_floor is not None))
    return _fine_sims(backend, text, text_weight, text_mask, [part], text_floor)[0]


def _no_coarse_floor(mode: str, text_floor) -> None:
    if text_floor is not None and mode == "coarse":
        raise ValueError("text_floor is for mode='fine' (the modal-side token max); coarse has no token max")


def contrastive_loss(text, modal, temperature, *, mode="coarse", text_weight=None, text_mask=None,
                     modal_weight=None, modal_mask=None, valid: Optional[torch.Tensor] = None,
                     text_floor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE (scalar fp32, or float64 for float64 inputs) between text and one modality.

    valid (B,) bool: only samples marked True take part (an invalid row leaves the mean over rows
    of both directions, an invalid column every softmax denominator); exactly 0 with zero
    gradients when fewer than 2 are valid.  The mask stays a tensor: no host sync.  Invalid
    samples' features are still computed, so they must be finite.  Under data parallelism, gather
    the features (and the mask) with valor_fast.ops.distributed first.  text_floor (B,) bool, fine
    only: see `fine_similarity`."""
    _no_coarse_floor(mode, text_floor)
    if mode == "coarse":
        return _coarse(text, modal, temperature, valid)
    if mode == "fine":
        kc.check_fine_inputs(text, text_weight, text_mask, modal, modal_weight, modal_mask)
        kc.check_valid(valid, text.shape[0])
        return _fine_group_losses(text, {"m": (modal, modal_weight, modal_mask)}, temperature, text_weight,
                                  text_mask, {} if valid is None else {"m": valid}, None, text_floor)["m"]
    raise ValueError(f"mode must be 'coarse' or 'fine', got {mode!r}")


def grouped_contrastive_loss(text, groups, temperature, *, mode, text_weight=None, text_mask=None,
                             valid: Optional[Dict[str, torch.Tensor]] = None,
                             negatives: Optional[Negatives] = None,
                             text_floor: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Loss per group.  coarse: groups name -> modal (B, D).  fine: name -> (modal, weight, mask) or
    a tuple of group names to concatenate (("v", "a") for T-AV); a two-part concatenation is fused
    with its parts (one read of the features for all three groups).  valid: group name -> (B,)
    bool mask (e.g. {"a": has_audio, "av": has_audio}); a group without one uses every sample;
    semantics as in `contrastive_loss`.  text_floor (B,) bool, fine only: every group's modal-side
    maxima of the marked texts floored at 0 (see `fine_similarity`).

    negatives (the local loss, see valor_fast.ops.distributed): `gather_negatives(text, groups,
    text_weight=..., text_mask=..., valid=..., text_floor=...)` of these same arguments; this
    rank's rows are then scored against every rank's columns, and the mean over ranks of the
    result is the full-batch loss.  Without it, the loss is over the batch given (gather it first
    for global negatives)."""
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"groups must be a non-empty dict name -> spec, got {type(groups).__name__}")
    kc.check_valid_groups(valid, groups, text.shape[0])
    _no_coarse_floor(mode, text_floor)
    valid = valid or {}
    if negatives is not None and not isinstance(negatives, Negatives):
        raise ValueError(f"negatives must come from valor_fast.ops.distributed.gather_negatives, "
                         f"got {type(negatives).__name__}")
    if mode == "coarse":
        for n, s in groups.items():
            if not isinstance(s, torch.Tensor):
                raise ValueError(f"coarse mode: group {n!r} must be a (B, D) tensor, got {type(s).__name__}")
        return {n: _coarse(text, s, temperature, valid.get(n), negatives, n) for n, s in groups.items()}
    if mode == "fine":
        return _fine_group_losses(text, groups, temperature, text_weight, text_mask, valid, negatives, text_floor)
    raise ValueError(f"mode must be 'coarse' or 'fine', got {mode!r}")
