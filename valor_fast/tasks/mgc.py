"""MGC: multimodal grouping captioning.  Masked captioning under a causal mask, conditioned on
each group; the three groups share ONE decoder pass (stacked along the batch, each with its own
cross-attention key mask) and the video/audio cross-attention K/V are computed once."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from ..data.tokenizer import FIRST_WORD_ID, MASK_ID
from ..model.valor import VALOR
from .mga import parse_groups


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, prob: float = 0.6, vocab: int = 30522,
                generator: Optional[torch.Generator] = None,
                draws: Optional[torch.Tensor] = None,
                eligible: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Select `prob` of the non-pad tokens (never position 0), at least one a sequence; of the
    selected 80% -> [MASK], 10% -> a random word id, 10% unchanged.  `eligible` (B, L) bool, if
    given, narrows the candidates further (QA: the answer tokens only, the question is a prompt).

    Returns (input ids, selected (B, L) bool).  Labels are the original ids at selected positions.
    `draws` (B, >=L, 3) uniforms, if given, replace the generator: the trainer draws them per
    sample of the global batch, so masking does not depend on how the batch is split over ranks.
    """
    if ids.shape != mask.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} differ")
    dev = ids.device
    eligible = mask.clone() if eligible is None else (mask & eligible.to(mask.device))
    eligible[:, 0] = False
    if not bool(eligible.any(1).all()):
        raise ValueError("every caption needs at least one token after [CLS] to mask")
    if draws is not None:
        if draws.shape[0] != ids.shape[0] or draws.shape[1] < ids.shape[1] or draws.shape[2] != 3:
            raise ValueError(f"draws must be (B, >=L, 3) for ids {tuple(ids.shape)}, got {tuple(draws.shape)}")
        d = draws[:, :ids.shape[1]].to(dev)
    else:
        d = torch.rand(*ids.shape, 3, generator=generator, device="cpu").to(dev)
    r = d[..., 0]
    sel = (r < prob) & eligible
    # guarantee one selected token per row: pick the eligible position with the smallest draw
    none = ~sel.any(1)
    if bool(none.any()):
        first = r.masked_fill(~eligible, 2.0).argmin(1)
        sel[none, first[none]] = True
    u = d[..., 1]
    rnd = (FIRST_WORD_ID + (d[..., 2] * (vocab - FIRST_WORD_ID)).long()).clamp_(max=vocab - 1)
    out = ids.clone()
    out = torch.where(sel & (u < 0.8), torch.full_like(ids, MASK_ID), out)
    out = torch.where(sel & (u >= 0.8) & (u < 0.9), rnd, out)
    return out, sel


def group_memory_masks(groups, B: int, n_video: int, n_audio: int, has_audio: Optional[torch.Tensor],
                       device) -> torch.Tensor:
    """Cross-attention key masks, (G*B, Lm) bool, for the stacked groups over cat(video, audio)."""
    rows = []
    aud = torch.ones(B, dtype=torch.bool, device=device) if has_audio is None else has_audio.to(device)
    for g in groups:
        vm = torch.full((B, n_video), g in ("tv", "tav"), dtype=torch.bool, device=device)
        am = (aud[:, None] & (g in ("ta", "tav"))).expand(B, n_audio)
        rows.append(torch.cat([vm, am], 1))
    return torch.cat(rows, 0)


def mgc_loss(model: VALOR, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, n_video: int,
             groups: Iterable[str], prob: float = 0.6, has_audio: Optional[torch.Tensor] = None,
             label_smoothing: float = 0.0, generator: Optional[torch.Generator] = None,
             draws: Optional[torch.Tensor] = None, grouped: bool = True,
             eligible: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Per-group masked-captioning losses.  grouped=True: one decoder pass over the G groups
    stacked on the batch, memory K/V projected once; grouped=False: one pass per group with its
    own K/V projection (the unfused baseline, as upstream VALOR runs it) - same losses."""
    groups = parse_groups(groups)
    B, L = ids.shape
    G = len(groups)
    inp, sel = mask_tokens(ids, mask, prob, model.cfg.vocab_size, generator, draws, eligible)
    # groups stacked along the batch: (G*B, L); the memory's K/V are projected once per layer
    # and tiled over the groups, each group seeing its own keys through `mmask`
    mmask = group_memory_masks(groups, B, n_video, memory.shape[1] - n_video, has_audio, ids.device)
    if grouped:
        hid = model.decode(inp.repeat(G, 1), mask.repeat(G, 1), memory, mmask, memory_repeat=G)  # (G*B, L, C)
    else:
        hid = torch.cat([model.decode(inp, mask, memory, mmask[gi * B:(gi + 1) * B])
                         for gi in range(G)], 0)
    sel_g = sel.repeat(G, 1)
    if has_audio is not None and not bool(has_audio.all()):
        for gi, g in enumerate(groups):
            if g == "ta":
                sel_g[gi * B:(gi + 1) * B] &= has_audio[:, None]
    labels = ids.repeat(G, 1)[sel_g]
    h = hid[sel_g]                                                          # (N_sel, C): only selected rows
    # (N_sel,) fp32; the LM head + CE never holds the (N_sel, V) logits (chunked over the
    # vocabulary) unless the unfused "eager" baseline is forced
    nll = model.lm_loss(h, labels, label_smoothing)
    row_group = torch.arange(G, device=ids.device).repeat_interleave(B)[:, None].expand(G * B, L)[sel_g]
    # per-group mean over the selected tokens.  Under data parallelism the token counts are
    # summed over ranks, so that gradient averaging gives exactly the gradient of the global
    # batch's mean (rank loss = local sum * world / global count)
    sums = torch.zeros(G, device=ids.device, dtype=nll.dtype).index_add(0, row_group, nll)
    counts = torch.bincount(row_group, minlength=G).to(nll.dtype)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        c = counts.detach().clone()
        dist.all_reduce(c)
        means = sums * world / c.clamp(min=1)
        present = c > 0
    else:
        means = sums / counts.clamp(min=1)
        present = counts > 0
    return {g: means[gi] for gi, g in enumerate(groups) if bool(present[gi])}
