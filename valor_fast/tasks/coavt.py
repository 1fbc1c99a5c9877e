"""CoAVT pretraining objectives (arXiv 2401.12264), as pure functions and one task module.

  contrastive   symmetric InfoNCE between the text [CLS] feature and the query outputs over
                each stream: AV-T (the tri-modal alignment) plus the bi-modal A-T and V-T.  The
                similarity of a text t and a stream's query features q_1..q_Nq is the fused op's
                fine form with the text as one token: S = 1/2 [max_j <t, q_j> + sum_j
                softmax(w)_j <t, q_j>] (w: learned query weights).  Features are all-gathered,
                so every rank scores the global batch.
  matching      binary AV-text matching through the query encoder (queries attend to the text
                and cross-attend to the AV tokens): each pair, plus for each text one negative
                AV and for each AV one negative text, mined from the AV-T similarities of the
                gathered batch.  Rule `sample` (default; BLIP-2 / ALBEF): a negative is drawn
                with probability softmax(S / temperature) over the non-matching clips; rule
                `hardest`: the most similar non-matching clip.  Clips with the same dataset
                index (a bad-media replacement can repeat one) are never negatives.
  lm            next-token cross-entropy of the BERT layers run causally, cross-attending to the
                AV query outputs (label smoothing 0.1, as BLIP-2's ITG).

total = contrastive_weight * (avt + at + vt) + matching_weight * match + lm_weight * lm, every
weight 1 by default (docs/family.md: the paper's weights could not be read here; BLIP-2, which
this objective set follows, sums its three losses unweighted).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..config import CoAVTLossConfig
from ..model.coavt import STREAMS, CoAVT
from ..model.flops import coavt_flops_per_sample
from ..ops.distributed import gather_features, gather_no_grad, rank, world
from .base import Task, register_task
from .family_common import check_family_data, global_mean, global_rand

KEYS = ("coavt/avt", "coavt/at", "coavt/vt", "coavt/match", "coavt/lm")
_GROUP_KEY = {"av": "coavt/avt", "a": "coavt/at", "v": "coavt/vt"}


CoAVTLossArgs = CoAVTLossConfig
"""The objective's settings: the `coavt` section of the run's Config (valor_fast/config.py)."""


def query_similarity(text: torch.Tensor, q_tok: torch.Tensor, q_weight: torch.Tensor) -> torch.Tensor:
    """(Nt, D) text features vs (Nc, Nq, D) query features -> (Nt, Nc), the contrastive S."""
    return ops.fine_similarity(text[:, None], None, None, q_tok, q_weight, None)


def contrastive_losses(text: torch.Tensor, groups: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                       temperature: torch.Tensor, has_audio: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """InfoNCE per stream over already gathered features: text (N, D), groups name -> (query
    tokens (N, Nq, D), weights (N, Nq)).  The "a" stream scores only clips with audio (the op's
    `valid` mask: no host sync; exactly 0 when fewer than two have it); "av" keeps every clip (a
    clip's missing audio is masked in it)."""
    spec = {k: (tok, w, None) for k, (tok, w) in groups.items()}
    valid = {"a": has_audio.bool()} if has_audio is not None and "a" in spec else None
    return ops.grouped_contrastive_loss(text[:, None], spec, temperature, mode="fine", valid=valid)


def mine_negatives(sim: torch.Tensor, exclude: torch.Tensor, rule: str,
                   temperature: Optional[torch.Tensor] = None, draws: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One negative per anchor: sim (R, N) anchor-candidate similarities, exclude (R, N) bool
    True = not a negative (the positive, repeats of its clip).  hardest: argmax of sim over the
    candidates.  sample: the candidate j where the cumulative softmax(sim / temperature) over
    the candidates first exceeds draws (R,) in [0, 1) (inverse-CDF sampling), in float64.
    -> (R,) long."""
    if sim.shape != exclude.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and exclude {tuple(exclude.shape)} differ")
    # a value read, so on CPU tensors only; on a GPU CoAVTTask.prepare checked the batch on the host
    if exclude.device.type == "cpu" and not bool((~exclude).any(1).all()):
        raise ValueError("matching needs a negative for every anchor: the gathered batch holds fewer than "
                         "two distinct clips")
    s = sim.detach().double().masked_fill(exclude, float("-inf"))
    if rule == "hardest":
        return s.argmax(1)
    if rule != "sample":
        raise ValueError(f"hard_negatives must be 'sample' or 'hardest', got {rule!r}")
    if temperature is None or draws is None or draws.shape != sim.shape[:1]:
        raise ValueError("hard_negatives=sample needs a temperature and one uniform draw per anchor "
                         "(batch['coavt_draws'] from CoAVTTask.prepare)")
    p = torch.softmax(s / temperature.detach().double(), dim=1)           # 0 at excluded entries
    cdf = p.cumsum(1)
    target = draws.to(cdf).clamp(0, 1)[:, None] * cdf[:, -1:]
    idx = (cdf <= target).sum(1)                                          # first j with cdf_j > target
    last = (~exclude).long().cumsum(1).argmax(1)                          # last candidate: round-off guard
    return torch.minimum(idx, last)


def matching_loss(model: CoAVT, memory: torch.Tensor, memory_mask: Optional[torch.Tensor], text: torch.Tensor,
                  text_mask: torch.Tensor, rows: torch.Tensor, neg_av: torch.Tensor,
                  neg_text: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the matching head over 3R pairs of the gathered batch: (text r, AV r)
    matched, (text r, AV neg_av[r]) and (text neg_text[r], AV r) not.  memory (N, Lm, C) AV
    tokens, text (N, L, C) text hidden states, rows (R,) this rank's clips in the gathered
    batch.  The mean over ranks is the global mean (every rank scores 3R pairs)."""
    av_idx = torch.cat([rows, neg_av, rows])
    t_idx = torch.cat([rows, rows, neg_text])
    mm = None if memory_mask is None else memory_mask[av_idx]
    logits = model.match_logits(memory[av_idx], mm, text[t_idx], text_mask[t_idx])
    R = rows.shape[0]
    labels = torch.zeros(3 * R, dtype=torch.long, device=logits.device)
    labels[:R] = 1
    return F.cross_entropy(logits, labels)


def lm_plan(ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(flat positions (N,) in (B * (L-1)) of the decoder rows that predict a real token, their
    labels (N,)): position i predicts token i + 1 wherever it is real.  A value read: made on the
    host (CoAVTTask.prepare) so the step has no data-dependent shape."""
    sel = mask[:, 1:]
    pos = sel.flatten().nonzero().squeeze(1)
    return pos, ids[:, 1:].flatten()[pos]


def lm_loss(model: CoAVT, ids: torch.Tensor, mask: torch.Tensor, query_hidden: torch.Tensor,
            label_smoothing: float = 0.0, plan: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Next-token cross-entropy, mean over the global batch's predicted tokens: position i
    (causal, cross-attending to the query outputs) predicts token i + 1 wherever it is real.
    `plan`: `lm_plan(ids, mask)` made on the host (else made here)."""
    h = model.decode(ids[:, :-1], mask[:, :-1], query_hidden)            # (B, L-1, C)
    pos, labels = plan if plan is not None else lm_plan(ids, mask)
    pos, labels = pos.to(h.device), labels.to(h.device)
    nll = model.lm_loss(h.reshape(-1, h.shape[-1]).index_select(0, pos), labels, label_smoothing)
    return global_mean(nll.sum(), nll.new_tensor(float(pos.shape[0])))


KEY_ORDER = ("loss",) + KEYS


@register_task("coavt_pretrain")
class CoAVTTask(Task):
    """The CoAVT objective as the data-parallel root module: forward(batch) -> {"loss", *KEYS}
    (the same keys every step).  `prepare` makes the host-side draws (negative sampling) and
    plans (LM positions, whether every clip has audio)."""

    family = "coavt"
    evaluation = "caption"     # retrieval (T->AV, T->V, T->A) + captioning: eval/family.py

    def __init__(self, model: CoAVT, cfg: Optional[CoAVTLossConfig] = None):
        super().__init__(model)
        self.cfg = cfg or CoAVTLossConfig()
        if self.cfg.hard_negatives not in ("sample", "hardest"):
            raise ValueError(f"coavt.hard_negatives must be sample or hardest, got {self.cfg.hard_negatives!r}")
        self.mined: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        """(negative AV per local text, negative text per local AV) of the last step, indices
        into the gathered batch (for tests and inspection)."""

    @classmethod
    def from_config(cls, model: CoAVT, cfg) -> "CoAVTTask":
        check_family_data(cfg)
        return cls(model, cfg.coavt)

    def loss_keys(self) -> Tuple[str, ...]:
        return KEY_ORDER

    def flops_per_sample(self, cfg) -> float:
        return coavt_flops_per_sample(self.model.args, frames=cfg.data.frames_train, text_len=cfg.data.max_text_len,
                                      audio_slices=cfg.data.audio_slices)

    def prepare(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        B = batch["text_ids"].shape[0]
        idx = batch.get("index")
        if world() == 1 and B > 0 and (B < 2 or (idx is not None and len(set(idx.tolist())) < 2)):
            raise ValueError("CoAVT matching needs a negative for every anchor: the batch holds fewer than two "
                             "distinct clips (raise train.batch_size)")
        out = {**batch, "coavt_draws": global_rand(B, 2, generator=generator)}
        out["lm_positions"], out["lm_labels"] = lm_plan(batch["text_ids"], batch["text_mask"])
        ha = batch.get("has_audio")
        out["audio_complete"] = ha is None or bool(ha.all())     # host side: the joint layer runs unmasked
        return out

    def _mine(self, batch, t_all, av_all, temp):
        B = batch["text_ids"].shape[0]
        dev = t_all.device
        rows = torch.arange(B, device=dev) + rank() * B
        idx = batch.get("index")
        idx_all = gather_no_grad(idx.to(dev)) if idx is not None else torch.arange(t_all.shape[0], device=dev)
        same = idx_all[:, None] == idx_all[None, :]                       # (N, N), symmetric
        with torch.no_grad():
            S = query_similarity(t_all.detach(), av_all[0].detach(), av_all[1].detach())  # (N text, N AV)
        draws = batch.get("coavt_draws")
        d = (None, None) if draws is None else (draws[:, 0].to(dev), draws[:, 1].to(dev))
        rule = self.cfg.hard_negatives
        neg_av = mine_negatives(S[rows], same[rows], rule, temp, d[0])
        neg_t = mine_negatives(S[:, rows].t(), same[rows], rule, temp, d[1])
        self.mined = (neg_av.detach(), neg_t.detach())
        return rows, neg_av, neg_t

    def forward(self, batch: dict) -> Dict[str, torch.Tensor]:
        m, c = self.model, self.cfg
        ids, mask, ha = batch["text_ids"], batch["text_mask"], batch.get("has_audio")
        s = m.encode_av(batch["video"], batch["audio"], None if batch.get("audio_complete") else ha)
        th = m.encode_text(ids, mask)
        q = {k: m.queries(s[k], s["av_mask"] if k == "av" else None) for k in STREAMS}
        t_all = gather_features(m.text_feature(th, mask))
        f_all = {k: tuple(gather_features(x) for x in m.query_features(q[k])) for k in STREAMS}
        ha_all = None if ha is None else gather_no_grad(ha.to(th.device))
        temp = m.temp()
        con = contrastive_losses(t_all, f_all, temp, ha_all)
        rows, neg_av, neg_t = self._mine(batch, t_all, f_all["av"], temp)
        mm = s["av_mask"]
        if ha is not None and mm is None:   # every rank gathers a mask when any clip may lack audio
            mm = torch.ones(s["av"].shape[:2], dtype=torch.bool, device=th.device)
        match = matching_loss(m, gather_features(s["av"]), None if mm is None else gather_no_grad(mm),
                              gather_features(th, pad_dim=1), gather_features(mask, pad_dim=1, pad_value=False),
                              rows, neg_av, neg_t)
        plan = (batch["lm_positions"], batch["lm_labels"]) if "lm_positions" in batch else None
        lm = lm_loss(m, ids, mask, q["av"], c.label_smoothing, plan)
        out = {_GROUP_KEY[k]: v for k, v in con.items()}
        out["coavt/match"], out["coavt/lm"] = match, lm
        out["loss"] = (c.contrastive_weight * (out["coavt/avt"] + out["coavt/at"] + out["coavt/vt"])
                       + c.matching_weight * match + c.lm_weight * lm)
        return out
