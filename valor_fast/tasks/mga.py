"""MGA: multimodal grouping alignment.  Symmetric InfoNCE between text and each group
(T-V, T-A, T-AV) with the model's learnable temperature, coarse or fine similarity."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from .. import ops
from ..kernels.contrastive import upstream_text_floor
from ..model.valor import VALOR, Features

GROUP_KEYS = {"tv": "v", "ta": "a", "tav": "av"}


def parse_groups(groups) -> list:
    if isinstance(groups, str):
        groups = [g.strip() for g in groups.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUP_KEYS]
    if bad or not groups:
        raise ValueError(f"unknown MGA/MGC groups {bad or groups}; choose from {sorted(GROUP_KEYS)}")
    return list(groups)


def group_similarity(model: VALOR, t: Features, v: Features, a: Features, mode: str) -> Dict[str, tuple]:
    """The op's `groups` argument for the three groups (fine: token features; coarse: pooled)."""
    if mode == "fine":
        return {"v": (v.tokens, v.weight, v.mask), "a": (a.tokens, a.weight, a.mask), "av": ("v", "a")}
    if mode == "coarse":
        return {"v": v.pooled, "a": a.pooled, "av": model.av_pooled(v, a)}
    raise ValueError(f"loss.mga_mode must be 'fine' or 'coarse', got {mode!r}")


def _text_arg(t: Features, mode: str):
    return t.tokens if mode == "fine" else t.pooled


PADDINGS = ("upstream", "exclude")


def text_floor(t: Features, padding: str = "upstream", text_len: int = 42) -> Optional[torch.Tensor]:
    """The fine op's `text_floor` (B,) bool for loss.fine_padding: upstream - the captions with
    fewer than `text_len` real tokens, whose padding upstream lets into the clip-side max as 0
    (upstream pads every caption to 42 positions, whatever our batch's padded length); exclude -
    None (padding takes part in no max)."""
    if padding not in PADDINGS:
        raise ValueError(f"loss.fine_padding must be one of {PADDINGS}, got {padding!r}")
    if padding == "exclude" or t.mask is None:
        return None
    return upstream_text_floor(t.mask, text_len)


def gather_features(t: Features, v: Features, a: Features, has_audio: Optional[torch.Tensor]):
    """Negatives from every rank: all-gather the features (gradient back to the owner).  Text
    token axes are padded to the longest over ranks first (padding is masked)."""
    from ..ops.distributed import gather_no_grad, gather_with_grad, pad_to_global_max, world
    if world() == 1:
        return t, v, a, has_audio
    def g(f: Features, pad_tokens: bool) -> Features:
        tok, w, m = f.tokens, f.weight, f.mask
        if pad_tokens:
            tok, w = pad_to_global_max(tok, 1), pad_to_global_max(w, 1)
            m = pad_to_global_max(m, 1, False)
        return Features(gather_with_grad(tok), gather_with_grad(w), None if m is None else gather_no_grad(m),
                        gather_with_grad(f.pooled))
    ha = None if has_audio is None else gather_no_grad(has_audio)
    return g(t, True), g(v, False), g(a, False), ha


def mga_group_losses(model: VALOR, t: Features, v: Features, a: Features, mode: str, groups: Iterable[str],
                     has_audio: Optional[torch.Tensor] = None, gather: bool = True,
                     padding: str = "upstream", text_len: int = 42
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """({group: loss}, {group: present}) for every group name (tv, ta, tav).  Clips without audio
    (has_audio False) leave the T-A and T-AV terms: the op's `valid` masks drop every pair
    involving them, and with fewer than 2 such clips (over all ranks) the term is exactly 0 and
    not present.  No host sync.  Under data parallelism the features are gathered so every rank
    scores the global batch.  padding / text_len: loss.fine_padding / loss.fine_text_len (fine
    mode, `text_floor`)."""
    groups = parse_groups(groups)
    if gather:
        t, v, a, has_audio = gather_features(t, v, a, has_audio)
    spec = group_similarity(model, t, v, a, mode)
    want = {GROUP_KEYS[g] for g in groups}
    sel = {k: s for k, s in spec.items() if k in want or (k in ("v", "a") and "av" in want and mode == "fine")}
    valid = None if has_audio is None else {k: has_audio for k in sel if k in ("a", "av")}
    kw = dict(mode=mode, text_weight=t.weight if mode == "fine" else None,
              text_mask=t.mask if mode == "fine" else None)
    if mode == "fine":
        kw.update(_floor_kw(t, padding, text_len))
    res = ops.grouped_contrastive_loss(_text_arg(t, mode), sel, model.temp(), valid=valid or None, **kw)
    B = t.pooled.shape[0]
    dev = t.pooled.device
    everyone = torch.full((), B >= 2, dtype=torch.bool, device=dev)
    with_audio = everyone if has_audio is None else has_audio.sum() >= 2
    present = {"v": everyone, "a": with_audio, "av": with_audio}
    return ({g: res[GROUP_KEYS[g]] for g in groups}, {g: present[GROUP_KEYS[g]] for g in groups})


def mga_loss(model: VALOR, t: Features, v: Features, a: Features, mode: str, groups: Iterable[str],
             has_audio: Optional[torch.Tensor] = None, gather: bool = True,
             padding: str = "upstream", text_len: int = 42) -> Dict[str, torch.Tensor]:
    """Loss per group name (tv, ta, tav), every group of `groups` (see `mga_group_losses`)."""
    return mga_group_losses(model, t, v, a, mode, groups, has_audio, gather, padding, text_len)[0]


def _floor_kw(t: Features, padding: str, text_len: int) -> dict:
    # the op's keyword only when a floor applies: exclude calls the op exactly as before
    floor = text_floor(t, padding, text_len)
    return {} if floor is None else {"text_floor": floor}


@torch.no_grad()
def similarity_matrix(model: VALOR, t: Features, v: Features, a: Features, group: str, mode: str,
                      padding: str = "upstream", text_len: int = 42) -> torch.Tensor:
    """(N_text, N_clip) similarity for retrieval scoring (fine: with loss.fine_padding's rule)."""
    spec = group_similarity(model, t, v, a, mode)
    key = GROUP_KEYS[group]
    if mode == "coarse":
        return t.pooled @ spec[key].t()
    kw = _floor_kw(t, padding, text_len)
    if key == "av":
        mod = torch.cat([v.tokens, a.tokens], 1)
        w = torch.cat([v.weight, a.weight], 1)
        return ops.fine_similarity(t.tokens, t.weight, t.mask, mod, w, None, **kw)
    m = spec[key]
    return ops.fine_similarity(t.tokens, t.weight, t.mask, m[0], m[1], m[2], **kw)
