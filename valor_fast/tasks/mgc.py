"""MGC: multimodal grouping captioning.  Masked captioning under a causal mask, conditioned on
each group; the three groups share ONE decoder pass (stacked along the batch, each with its own
cross-attention key mask) and the video/audio cross-attention K/V are computed once."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from ..data.tokenizer import FIRST_WORD_ID, MASK_ID
from ..model.valor import VALOR
from .mga import parse_groups


def check_maskable(mask: torch.Tensor, eligible: Optional[torch.Tensor] = None) -> None:
    """Host-side validation (reads values): every row has a token after [CLS] to predict."""
    ok = mask.clone() if eligible is None else (mask & eligible.to(mask.device))
    ok[:, 0] = False
    bad = (~ok.any(1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"every caption needs at least one token after [CLS] to mask; row(s) {bad[:8]} have none")


def masking_draws(mask: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(B, L, 3) uniforms for `mask_tokens`: row b's real tokens draw from generators[b] (one
    generator per sample, so a sample's draws depend neither on the other samples nor on the
    batch's padded length), padding gets 1.0 (never selected).  Host side."""
    if len(generators) != mask.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {mask.shape[0]}")
    d = torch.ones(*mask.shape, 3)
    for b, g in enumerate(generators):
        m = mask[b].cpu()
        d[b, m] = torch.rand(int(m.sum()), 3, generator=g)
    return d


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, prob: float = 0.6, vocab: int = 30522,
                generator: Optional[torch.Generator] = None,
                draws: Optional[torch.Tensor] = None,
                eligible: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Select `prob` of the non-pad tokens (never position 0), at least one a sequence; of the
    selected 80% -> [MASK], 10% -> a random word id, 10% unchanged.  `eligible` (B, L) bool, if
    given, narrows the candidates further (QA: the answer tokens only, the question is a prompt).

    Returns (input ids, selected (B, L) bool).  Labels are the original ids at selected positions.
    `draws` (B, >=L, 3) uniforms (`masking_draws`), if given, replace the generator.  Sync-free:
    a row without an eligible token is validated on the host (`check_maskable`: always when
    drawing here or on CPU tensors; on a GPU the tasks' prepare validated it) and would select
    nothing.
    """
    if ids.shape != mask.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} differ")
    dev = ids.device
    eligible = mask.clone() if eligible is None else (mask & eligible.to(mask.device))
    eligible[:, 0] = False
    if draws is None or dev.type == "cpu":
        check_maskable(eligible)
    if draws is not None:
        if draws.shape[0] != ids.shape[0] or draws.shape[1] < ids.shape[1] or draws.shape[2] != 3:
            raise ValueError(f"draws must be (B, >=L, 3) for ids {tuple(ids.shape)}, got {tuple(draws.shape)}")
        d = draws[:, :ids.shape[1]].to(dev)
    else:
        d = torch.rand(*ids.shape, 3, generator=generator, device="cpu").to(dev)
    r = d[..., 0]
    sel = (r < prob) & eligible
    # guarantee one selected token per row: the eligible position with the smallest draw (no
    # branch on the values, so no host sync)
    none = ~sel.any(1)
    first = r.masked_fill(~eligible, 2.0).argmin(1)
    pos = torch.arange(ids.shape[1], device=dev)
    sel = sel | (none[:, None] & eligible & (pos[None, :] == first[:, None]))
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


PLAN_KEYS = ("mgc_input", "mgc_positions", "mgc_labels", "mgc_groups", "mgc_counts")


def mask_plan(ids: torch.Tensor, mask: torch.Tensor, groups: Iterable[str], prob: float = 0.6,
              vocab: int = 30522, has_audio: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, draws: Optional[torch.Tensor] = None,
              eligible: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """What MGC predicts, decided where `ids` lives (the tasks' prepare: on the host, before the
    batch moves, so the step needs no data-dependent shapes from the device):

    mgc_input (B, L) the masked input ids; for the G groups stacked on the batch (G*B rows),
    mgc_positions (N,) flat positions in (G*B*L) of the selected tokens, mgc_labels (N,) their ids,
    mgc_groups (N,) their group, mgc_counts (G,) tokens per group.  Clips without audio
    (has_audio False) predict nothing in T-A; they keep T-AV, conditioned on their video."""
    groups = parse_groups(groups)
    B, L = ids.shape
    G = len(groups)
    inp, sel = mask_tokens(ids, mask, prob, vocab, generator, draws, eligible)
    sel_g = sel.repeat(G, 1)                                                 # (G*B, L)
    if has_audio is not None and "ta" in groups:
        gi = groups.index("ta")
        sel_g[gi * B:(gi + 1) * B] &= has_audio.to(sel.device)[:, None]
    pos = sel_g.flatten().nonzero().squeeze(1)                               # (N,) row-major
    group = torch.div(pos, B * L, rounding_mode="floor")
    return {"mgc_input": inp, "mgc_positions": pos, "mgc_labels": ids.repeat(G, 1).flatten()[pos],
            "mgc_groups": group, "mgc_counts": torch.bincount(group, minlength=G)}


def plan_of(batch: dict) -> Optional[Dict[str, torch.Tensor]]:
    """The mask plan a prepared batch carries (None if it carries none)."""
    if PLAN_KEYS[0] not in batch:
        return None
    return {k: batch[k] for k in PLAN_KEYS}


def global_token_counts(counts: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(tokens per group summed over ranks, world).  Rank loss = local sum * world / global
    count, so that gradient averaging gives exactly the gradient of the global batch's mean."""
    from ..ops.distributed import all_reduce_sum, world
    return all_reduce_sum(counts), world()


def mgc_group_losses(model: VALOR, plan: Dict[str, torch.Tensor], mask: torch.Tensor, memory: torch.Tensor,
                     n_video: int, groups: Iterable[str], has_audio: Optional[torch.Tensor] = None,
                     label_smoothing: float = 0.0, grouped: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-group mean token losses (G,), present (G,) bool) for a `mask_plan`; a group without a
    selected token anywhere (over all ranks) has loss exactly 0 and present False.  No host sync.
    grouped=True: one decoder pass over the G groups stacked on the batch, memory K/V projected
    once; grouped=False: one pass per group with its own K/V projection (the unfused baseline,
    as upstream VALOR runs it) - same losses."""
    groups = parse_groups(groups)
    inp = plan["mgc_input"]
    B, L = inp.shape
    G = len(groups)
    # groups stacked along the batch: (G*B, L); the memory's K/V are projected once per layer
    # and tiled over the groups, each group seeing its own keys through `mmask`
    mmask = group_memory_masks(groups, B, n_video, memory.shape[1] - n_video, has_audio, inp.device)
    if grouped:
        hid = model.decode(inp.repeat(G, 1), mask.repeat(G, 1), memory, mmask, memory_repeat=G)  # (G*B, L, C)
    else:
        hid = torch.cat([model.decode(inp, mask, memory, mmask[gi * B:(gi + 1) * B])
                         for gi in range(G)], 0)
    h = hid.reshape(G * B * L, hid.shape[-1]).index_select(0, plan["mgc_positions"])   # (N, C): selected rows
    # (N,) fp32; the LM head + CE never holds the (N, V) logits (chunked over the vocabulary)
    # unless the unfused "eager" baseline is forced
    nll = model.lm_loss(h, plan["mgc_labels"], label_smoothing)
    sums = torch.zeros(G, device=inp.device, dtype=nll.dtype).index_add(0, plan["mgc_groups"], nll)
    counts, world = global_token_counts(plan["mgc_counts"].to(nll.dtype))
    means = sums * world / counts.clamp(min=1) if world > 1 else sums / counts.clamp(min=1)
    return means, counts > 0


def mgc_loss(model: VALOR, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, n_video: int,
             groups: Iterable[str], prob: float = 0.6, has_audio: Optional[torch.Tensor] = None,
             label_smoothing: float = 0.0, generator: Optional[torch.Generator] = None,
             draws: Optional[torch.Tensor] = None, grouped: bool = True,
             eligible: Optional[torch.Tensor] = None,
             plan: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Per-group masked-captioning losses {group: scalar}, every group of `groups` (a group with
    no selected token is a masked 0, see `mgc_group_losses`).  `plan` (from `mask_plan`, made
    host-side by the tasks' prepare) or, without one, the plan is made here from `draws` /
    `generator` (direct callers)."""
    groups = parse_groups(groups)
    if plan is None:
        plan = mask_plan(ids, mask, groups, prob, model.cfg.vocab_size, has_audio, generator, draws, eligible)
    means, _ = mgc_group_losses(model, plan, mask, memory, n_video, groups, has_audio, label_smoothing, grouped)
    return {g: means[gi] for gi, g in enumerate(groups)}
