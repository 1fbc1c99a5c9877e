"""MGA contrastive losses: public entry points and the eager (torch) reference.

Shapes: coarse text (B, D) vs modal (B, D); fine text (Bt, T, D) with weights/masks (Bt, T)
vs modal (Bm, M, D) with weights/masks (Bm, M).  Masks are bool, True = real token; weights
are pre-softmax logits.  logits = S / temperature; loss = mean of the text->modal and
modal->text cross-entropies with the matching pair on the diagonal.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

NEG = float("-inf")


def _acc(x: torch.Tensor) -> torch.Tensor:
    # accumulate in fp32 at least; float64 inputs stay float64 (the tests' reference precision)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_fine(text, text_weight, text_mask, modal, modal_weight, modal_mask):
    if text.dim() != 3 or modal.dim() != 3:
        raise ValueError(f"fine similarity needs text (B, T, D) and modal (B, M, D); got "
                         f"text {tuple(text.shape)}, modal {tuple(modal.shape)}")
    if text.shape[-1] != modal.shape[-1]:
        raise ValueError(f"feature sizes differ: text D={text.shape[-1]}, modal D={modal.shape[-1]}")
    for name, t, ref in (("text_weight", text_weight, text), ("text_mask", text_mask, text),
                         ("modal_weight", modal_weight, modal), ("modal_mask", modal_mask, modal)):
        if t is not None and tuple(t.shape) != tuple(ref.shape[:2]):
            raise ValueError(f"{name} must be {tuple(ref.shape[:2])}, got {tuple(t.shape)}")


def _masked_softmax(w: Optional[torch.Tensor], mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # (B, N) weights -> softmax over real tokens; uniform when no weights are given.
    if w is None:
        w = torch.zeros(like.shape[:2], dtype=torch.float32, device=like.device)
    w = _acc(w)
    if mask is not None:
        w = w.masked_fill(~mask, NEG)
    return torch.softmax(w, dim=-1)


def fine_similarity_ref(text, text_weight, text_mask, modal, modal_weight, modal_mask) -> torch.Tensor:
    """VALOR's weighted token-wise max-similarity, eager: materialises (Bt, Bm, T, M).

    S(a, b) = 1/2 [ sum_i softmax(w_a)_i max_j <a_i, b_j> + sum_j softmax(w_b)_j max_i <a_i, b_j> ]
    with padded tokens excluded from the max and the softmax.
    """
    _check_fine(text, text_weight, text_mask, modal, modal_weight, modal_mask)
    sim = torch.einsum("atd,bmd->abtm", _acc(text), _acc(modal))  # (Bt, Bm, T, M)
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
    wt = _masked_softmax(text_weight, text_mask, text)    # (Bt, T)
    wm = _masked_softmax(modal_weight, modal_mask, modal)  # (Bm, M)
    # padded rows hold -inf maxima but zero weight: zero them so 0 * -inf does not give nan
    t2m = torch.where(wt[:, None, :] > 0, t2m, torch.zeros_like(t2m))
    m2t = torch.where(wm[None, :, :] > 0, m2t, torch.zeros_like(m2t))
    s_t = (t2m * wt[:, None, :]).sum(-1)
    s_m = (m2t * wm[None, :, :]).sum(-1)
    return 0.5 * (s_t + s_m)


def info_nce(sim: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) similarity with matches on the diagonal."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"InfoNCE needs a square (B, B) similarity, got {tuple(sim.shape)}")
    logits = _acc(sim) / _acc(temperature)
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def contrastive_loss_ref(text, modal, temperature, *, mode="coarse", text_weight=None, text_mask=None,
                         modal_weight=None, modal_mask=None) -> torch.Tensor:
    if mode == "coarse":
        if text.dim() != 2 or modal.dim() != 2 or text.shape != modal.shape:
            raise ValueError(f"coarse mode needs text and modal of equal shape (B, D); got "
                             f"{tuple(text.shape)} and {tuple(modal.shape)}")
        sim = _acc(text) @ _acc(modal).t()
    elif mode == "fine":
        sim = fine_similarity_ref(text, text_weight, text_mask, modal, modal_weight, modal_mask)
    else:
        raise ValueError(f"mode must be 'coarse' or 'fine', got {mode!r}")
    return info_nce(sim, temperature)


GroupSpec = Union[torch.Tensor, Tuple]


def resolve_groups(groups: Dict[str, GroupSpec], mode: str) -> Dict[str, GroupSpec]:
    """Expand a fine-mode ("v", "a") concatenation spec into (modal, weight, mask)."""
    out = {}
    for name, spec in groups.items():
        if mode == "fine" and isinstance(spec, tuple) and spec and all(isinstance(s, str) for s in spec):
            parts = []
            for s in spec:
                if s not in groups or isinstance(groups[s], tuple) and all(isinstance(x, str) for x in groups[s]):
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


def grouped_contrastive_loss_ref(text, groups, temperature, *, mode, text_weight=None, text_mask=None):
    res = {}
    for name, spec in resolve_groups(groups, mode).items():
        if mode == "fine":
            modal, mw, mm = spec
            res[name] = contrastive_loss_ref(text, modal, temperature, mode="fine", text_weight=text_weight,
                                             text_mask=text_mask, modal_weight=mw, modal_mask=mm)
        else:
            res[name] = contrastive_loss_ref(text, spec, temperature, mode="coarse")
    return res


# ---- public entry points (dispatch to fused backends arrives with the contrastive-kernel issue) ----

def fine_similarity(text, text_weight, text_mask, modal, modal_weight, modal_mask) -> torch.Tensor:
    return fine_similarity_ref(text, text_weight, text_mask, modal, modal_weight, modal_mask)


def contrastive_loss(text, modal, temperature, *, mode="coarse", text_weight=None, text_mask=None,
                     modal_weight=None, modal_mask=None) -> torch.Tensor:
    return contrastive_loss_ref(text, modal, temperature, mode=mode, text_weight=text_weight,
                                text_mask=text_mask, modal_weight=modal_weight, modal_mask=modal_mask)


def grouped_contrastive_loss(text, groups, temperature, *, mode, text_weight=None, text_mask=None):
    return grouped_contrastive_loss_ref(text, groups, temperature, mode=mode, text_weight=text_weight,
                                        text_mask=text_mask)
