"""MGC: multimodal grouping captioning.  Masked captioning under a causal mask, conditioned on
each group; the three groups share ONE decoder pass (stacked along the batch, each with its own
cross-attention key mask) and the video/audio cross-attention K/V are computed once."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from ..data.tokenizer import MASK_ID, UPSTREAM_FIRST_RANDOM_ID
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


def _redraw_counts(n: torch.Tensor, prob: float, u: torch.Tensor, max_n: int) -> torch.Tensor:
    """(B,) counts k ~ Binomial(n, prob) conditioned on k >= 1, by inverse CDF of the uniforms
    u (B,); n (B,) <= max_n candidates a row.  float64, vectorised (no branch on values: no host
    sync).  A row with n = 0 gets 1 (it has nothing to select anyway)."""
    p = min(max(float(prob), 1e-12), 1.0 - 1e-12)
    nf = n.to(torch.float64)[:, None]                                                   # (B, 1)
    k = torch.arange(1, max(max_n, 1) + 1, device=n.device, dtype=torch.float64)[None]   # (1, K)
    logpmf = (torch.lgamma(nf + 1) - torch.lgamma(k + 1) - torch.lgamma((nf - k).clamp(min=0) + 1)
              + k * math.log(p) + (nf - k) * math.log1p(-p))
    pmf = torch.where(k <= nf, logpmf.exp(), torch.zeros_like(logpmf))
    cdf = pmf.cumsum(1) / pmf.sum(1, keepdim=True).clamp(min=1e-300)
    # k = 1 + #{j : cdf_j < u}, at most n (cdf reaches 1 at k = n up to rounding)
    return torch.minimum(1 + (cdf < u.to(torch.float64)[:, None]).sum(1), n.clamp(min=1))


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, prob: float = 0.6, vocab: int = 30522,
                generator: Optional[torch.Generator] = None,
                draws: Optional[torch.Tensor] = None,
                eligible: Optional[torch.Tensor] = None,
                random_from: int = UPSTREAM_FIRST_RANDOM_ID) -> Tuple[torch.Tensor, torch.Tensor]:
    """Select each non-pad token (never position 0) with probability `prob`; of the selected 80%
    -> [MASK], 10% -> a uniform random id in [random_from, vocab), 10% unchanged.  A row that
    selects nothing is redrawn, as upstream VALOR does (model/modeling.py:141): its count is then
    k ~ Binomial(n, prob) conditioned on k >= 1 (inverse CDF of the row's unused position-0 draw)
    and its k candidates with the smallest draws are selected - exactly the distribution of
    redrawing the whole row until it selects one.  `eligible` (B, L) bool, if given, narrows the
    candidates further (QA: the answer tokens only, the question is a prompt).

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
    # the redraw of a row that selected nothing: k from the conditioned binomial (position 0 is
    # never a candidate, so its draw is free for it), then the k smallest draws of the row
    none = ~sel.any(1)
    k = _redraw_counts(eligible.sum(1), prob, d[:, 0, 0], ids.shape[1])
    rank = r.masked_fill(~eligible, 2.0).argsort(1).argsort(1)                # 0 = smallest draw
    sel = torch.where(none[:, None], eligible & (rank < k[:, None]), sel)
    u = d[..., 1]
    rnd = (random_from + (d[..., 2] * (vocab - random_from)).long()).clamp_(max=vocab - 1)
    out = ids.clone()
    out = torch.where(sel & (u < 0.8), torch.full_like(ids, MASK_ID), out)
    out = torch.where(sel & (u >= 0.8) & (u < 0.9), rnd, out)
    return out, sel


def audio_presence(batch: dict, cfg) -> Optional[torch.Tensor]:
    """The batch's has_audio as the tasks use it under loss.missing_audio (`cfg` a LossConfig):
    mask - as given (clips without audio leave the audio groups); zeros - None (upstream: the
    all-zero spectrogram takes part in every group)."""
    if cfg.missing_audio not in ("mask", "zeros"):
        raise ValueError(f"loss.missing_audio must be mask or zeros, got {cfg.missing_audio!r}")
    return batch.get("has_audio") if cfg.missing_audio == "mask" else None


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
              eligible: Optional[torch.Tensor] = None,
              random_from: int = UPSTREAM_FIRST_RANDOM_ID) -> Dict[str, torch.Tensor]:
    """What MGC predicts, decided where `ids` lives (the tasks' prepare: on the host, before the
    batch moves, so the step needs no data-dependent shapes from the device):

    mgc_input (B, L) the masked input ids; for the G groups stacked on the batch (G*B rows),
    mgc_positions (N,) flat positions in (G*B*L) of the selected tokens, mgc_labels (N,) their ids,
    mgc_groups (N,) their group, mgc_counts (G,) tokens per group.  Clips without audio
    (has_audio False) predict nothing in T-A; they keep T-AV, conditioned on their video.
    random_from: first id of the random replacements (loss.mask_random_from)."""
    groups = parse_groups(groups)
    B, L = ids.shape
    G = len(groups)
    inp, sel = mask_tokens(ids, mask, prob, vocab, generator, draws, eligible, random_from)
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
                     label_smoothing: float = 0.0, grouped: bool = True,
                     prompt: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-group mean token losses (G,), present (G,) bool) for a `mask_plan`; a group without a
    selected token anywhere (over all ranks) has loss exactly 0 and present False.  No host sync.
    grouped=True: one decoder pass over the G groups stacked on the batch, memory K/V projected
    once; grouped=False: one pass per group with its own K/V projection (the unfused baseline,
    as upstream VALOR runs it) - same losses.  `prompt` (B, P): a per-sample decoder prompt
    (QA's question with model.task_prompts); None = the model's own (the caption prompt, if any)."""
    groups = parse_groups(groups)
    inp = plan["mgc_input"]
    B, L = inp.shape
    G = len(groups)
    # groups stacked along the batch: (G*B, L); the memory's K/V are projected once per layer
    # and tiled over the groups, each group seeing its own keys through `mmask`
    mmask = group_memory_masks(groups, B, n_video, memory.shape[1] - n_video, has_audio, inp.device)
    if grouped:
        hid = model.decode(inp.repeat(G, 1), mask.repeat(G, 1), memory, mmask, memory_repeat=G,
                           prompt=None if prompt is None else prompt.repeat(G, 1))  # (G*B, L, C)
    else:
        hid = torch.cat([model.decode(inp, mask, memory, mmask[gi * B:(gi + 1) * B], prompt=prompt)
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
             plan: Optional[Dict[str, torch.Tensor]] = None,
             random_from: int = UPSTREAM_FIRST_RANDOM_ID) -> Dict[str, torch.Tensor]:
    """Per-group masked-captioning losses {group: scalar}, every group of `groups` (a group with
    no selected token is a masked 0, see `mgc_group_losses`).  `plan` (from `mask_plan`, made
    host-side by the tasks' prepare) or, without one, the plan is made here from `draws` /
    `generator` (direct callers)."""
    groups = parse_groups(groups)
    if plan is None:
        plan = mask_plan(ids, mask, groups, prob, model.cfg.vocab_size, has_audio, generator, draws, eligible,
                         random_from)
    means, _ = mgc_group_losses(model, plan, mask, memory, n_video, groups, has_audio, label_smoothing, grouped)
    return {g: means[gi] for gi, g in enumerate(groups)}
