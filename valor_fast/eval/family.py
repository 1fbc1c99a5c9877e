"""Evaluation of the family models (CoAVT, VLSA) on a split, through eval/dispatch.py.

CoAVT: text -> AV, text -> V, text -> A retrieval (and the reverse) by the contrastive score S
of the text [CLS] feature and a stream's query outputs (tasks.coavt.query_similarity, the
training similarity); with eval.rerank_k = k > 0 each query's top-k candidates are re-scored
by the matching head over the AV stream, score = the match-class logit averaged over the
queries + S (BLIP-2's practice: LAVIS `compute_sim_matrix` / `compute_itm`; whether CoAVT
re-ranks could not be read, docs/family.md), reported as retrieval_rerank/t2av and
retrieval_rerank/av2t.  Captioning: beam search over the LM head conditioned on the AV query
outputs (model.decoding.NextTokenStepper), scored with eval.metrics.caption_metrics.

VLSA: retrieval between every pair of text, video and audio (T<->V, T<->A, V<->A) by the cosine
of the global features of unmasked inputs.

Text queries follow eval.retrieval_captions as VALOR's evaluation does: first (one caption a
clip) or all (every caption; a clip is found by its best-ranked caption).
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.tokenizer import tokenize
from ..model.decoding import NextTokenStepper
from ..tasks.coavt import query_similarity
from ..utils.log import get_logger
from .caption import generate
from .metrics import caption_metrics, check_finite, cross_retrieval_metrics, retrieval_metrics

log = get_logger(__name__)
_BELOW = 1e4   # re-ranking: candidates outside a query's top-k keep their contrastive order below it


def _text_queries(b: dict, cfg: Config, device, n_seen: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """(ids, mask, clip of each query) of one batch, numbering its clips from n_seen."""
    if cfg.eval.retrieval_captions not in ("first", "all"):
        raise ValueError(f"eval.retrieval_captions must be first or all, got {cfg.eval.retrieval_captions!r}")
    if cfg.eval.retrieval_captions == "all":
        flat = [c for caps in b["captions"] for c in caps]
        ids, mask = (x.to(device) for x in tokenize(flat, cfg.data.max_text_len))
        return ids, mask, [n_seen + i for i, caps in enumerate(b["captions"]) for _ in caps]
    return b["text_ids"], b["text_mask"], list(range(n_seen, n_seen + len(b["video_id"])))


def _pad_cat(xs: List[torch.Tensor], value=0) -> torch.Tensor:
    """Concatenate (B_i, L_i, ...) tensors along dim 0, padding dim 1 to the longest."""
    L = max(x.shape[1] for x in xs)
    pads = [(0, 0) * (x.dim() - 2) + (0, L - x.shape[1]) for x in xs]
    return torch.cat([F.pad(x, p, value=value) for x, p in zip(xs, pads)])


def _finish(metrics: Dict[str, float], n_clips: int, n_queries: int, t0: float) -> Dict[str, float]:
    metrics["eval/clips"] = float(n_clips)
    metrics["eval/queries"] = float(n_queries)
    metrics["eval/seconds"] = time.time() - t0
    return metrics


# ---- CoAVT ---------------------------------------------------------------------------------------

class _CoAVTStore:
    """What one pass over the split keeps: per-stream query features, text features, and (for
    re-ranking) the AV tokens and text hidden states, on the host."""

    def __init__(self, keep_tokens: bool):
        self.q: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {"av": [], "v": [], "a": []}
        self.text: List[torch.Tensor] = []
        self.keep = keep_tokens
        self.av, self.av_mask, self.th, self.tmask = [], [], [], []
        self.text_to_clip: List[int] = []
        self.ids: List[str] = []
        self.preds: Dict[str, str] = {}
        self.refs: Dict[str, List[str]] = {}


def _coavt_batch(model, b: dict, cfg: Config, device, st: _CoAVTStore, captions: bool, source=None) -> None:
    s = model.encode_av(b["video"], b["audio"], b.get("has_audio"))
    q_av = None
    for k in st.q:
        q = model.queries(s[k], s["av_mask"] if k == "av" else None)
        q_av = q if k == "av" else q_av
        tok, w = model.query_features(q)
        st.q[k].append((tok.float(), w.float()))
    ids, mask, owners = _text_queries(b, cfg, device, len(st.ids))
    th = model.encode_text(ids, mask)
    st.text.append(model.text_feature(th, mask).float())
    st.text_to_clip.extend(owners)
    if st.keep:
        st.av.append(s["av"].cpu())
        st.av_mask.append((torch.ones(s["av"].shape[:2], dtype=torch.bool) if s["av_mask"] is None
                           else s["av_mask"].cpu()))
        st.th.append(th.cpu())
        st.tmask.append(mask.cpu())
    st.ids.extend(b["video_id"])
    if captions:
        check_finite(q_av, "decoder memory (AV query outputs)",
                     f"{source or 'model'}, batch starting at clip {b['video_id'][0]!r}")
        for vid, text, caps in zip(b["video_id"], generate(model, q_av, None, cfg.eval, stepper=NextTokenStepper),
                                   b["captions"]):
            st.preds[vid], st.refs[vid] = text, list(caps)


def _match_scores(model, av, av_mask, th, tmask, clip_idx, text_idx, device, chunk: int = 64) -> torch.Tensor:
    """Match-class logits (averaged over the queries) of the (text, clip) pairs, in chunks."""
    out = []
    for i in range(0, len(clip_idx), chunk):
        c, t = clip_idx[i:i + chunk], text_idx[i:i + chunk]
        logits = model.match_logits(av[c].to(device), av_mask[c].to(device), th[t].to(device), tmask[t].to(device))
        out.append(logits[:, 1].float())
    return torch.cat(out)


def rerank_scores(model, S: torch.Tensor, k: int, av, av_mask, th, tmask, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(text -> clip, clip -> text) scores (N_text, N_clip) re-ranked by the matching head: each
    query's top-k candidates by S get match logit + S, the others S - 1e4 (below every top-k
    candidate, in their contrastive order).  av (N_clip, Lm, C), th (N_text, L, C)."""
    k = min(k, S.shape[1], S.shape[0])
    out = []
    for scores, by_text in ((S, True), (S.t(), False)):
        top = scores.topk(k, dim=1).indices                                  # (Q, k)
        rows = torch.arange(scores.shape[0], device=S.device)[:, None].expand(-1, k).reshape(-1)
        cand = top.reshape(-1)
        clip_idx, text_idx = (cand, rows) if by_text else (rows, cand)
        m = _match_scores(model, av, av_mask, th, tmask, clip_idx.cpu(), text_idx.cpu(), device).to(S.device)
        final = scores - _BELOW
        final[rows, cand] = scores[rows, cand] + m
        out.append(final)
    return out[0], out[1].t()


@torch.no_grad()
def evaluate_coavt(model, loader, cfg: Config, device, captions: bool = True, autocast=None,
                   source=None) -> Dict[str, float]:
    """CoAVT retrieval (t2av, t2v, t2a and the reverse; retrieval_rerank/... with eval.rerank_k)
    and captioning (caption/...) on `loader`'s split.  `source` names the model in the
    NonFiniteScoresError of NaN/Inf scores."""
    was_training = model.training
    model.eval()
    t0 = time.time()
    ctx = autocast or contextlib.nullcontext
    st = _CoAVTStore(keep_tokens=cfg.eval.rerank_k > 0)
    for batch in loader:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with ctx():
            _coavt_batch(model, b, cfg, device, st, captions, source)
    text = torch.cat(st.text)
    metrics: Dict[str, float] = {}
    for k in ("av", "v", "a"):
        tok, w = (torch.cat(x) for x in zip(*st.q[k]))
        S = query_similarity(text, tok, w)
        metrics.update(retrieval_metrics(S, st.text_to_clip, k, source=source))
        if k == "av" and cfg.eval.rerank_k > 0:
            with ctx():
                t2c, c2t = rerank_scores(model, S, cfg.eval.rerank_k, _pad_cat(st.av), _pad_cat(st.av_mask, False),
                                         _pad_cat(st.th), _pad_cat(st.tmask, False), device)
            metrics.update(_reranked(t2c, c2t, st.text_to_clip, source))
    if captions and st.preds:
        metrics.update(caption_metrics(st.preds, st.refs))
        metrics["caption/n_clips"] = float(len(st.preds))
        for vid in sorted(st.preds)[:3]:
            log.info("caption %s: %r (ref: %r)", vid, st.preds[vid], st.refs[vid][0])
    model.train(was_training)
    return _finish(metrics, len(st.ids), len(st.text_to_clip), t0)


def _reranked(t2c: torch.Tensor, c2t: torch.Tensor, text_to_clip: List[int], source=None) -> Dict[str, float]:
    """retrieval_rerank/t2av/... from the text-query scores, retrieval_rerank/av2t/... from the
    clip-query scores (each direction re-ranked over its own queries' top-k)."""
    fwd = retrieval_metrics(t2c, text_to_clip, "av", source=source)
    rev = retrieval_metrics(c2t, text_to_clip, "av", source=source)
    out = {k.replace("retrieval/", "retrieval_rerank/"): v for k, v in fwd.items() if "/t2av/" in k}
    out.update({k.replace("retrieval/", "retrieval_rerank/"): v for k, v in rev.items() if "/av2t/" in k})
    return out


# ---- VLSA ----------------------------------------------------------------------------------------

def _vlsa_batch(model, b: dict, cfg: Config, device, feats: Dict[str, list], text_to_clip: List[int],
                n_seen: int) -> None:
    gv, hv = model.encode_video(b["video"])
    ga, ha = model.encode_audio(b["audio"])
    ids, mask, owners = _text_queries(b, cfg, device, n_seen)
    gt, ht = model.encode_text(ids, mask)
    feats["v"].append(model.global_feature("video", model.pooled(gv, hv)).float())
    feats["a"].append(model.global_feature("audio", model.pooled(ga, ha)).float())
    feats["t"].append(model.global_feature("text", model.pooled(gt, ht, mask)).float())
    text_to_clip.extend(owners)


@torch.no_grad()
def evaluate_vlsa(model, loader, cfg: Config, device, autocast=None, source=None) -> Dict[str, float]:
    """VLSA retrieval: t2v, t2a, v2a and the reverse (v2t, a2t, a2v) on `loader`'s split."""
    was_training = model.training
    model.eval()
    t0 = time.time()
    ctx = autocast or contextlib.nullcontext
    feats: Dict[str, list] = {"t": [], "v": [], "a": []}
    text_to_clip: List[int] = []
    n = 0
    for batch in loader:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with ctx():
            _vlsa_batch(model, b, cfg, device, feats, text_to_clip, n)
        n += len(b["video_id"])
    t, v, a = (torch.cat(feats[k]) for k in ("t", "v", "a"))
    metrics = cross_retrieval_metrics(t @ v.t(), text_to_clip, "t", "v", source)
    metrics.update(cross_retrieval_metrics(t @ a.t(), text_to_clip, "t", "a", source))
    metrics.update(cross_retrieval_metrics(v @ a.t(), list(range(n)), "v", "a", source))
    model.train(was_training)
    return _finish(metrics, n, len(text_to_clip), t0)


def evaluate_family(model, loader, cfg: Config, device, captions: bool, autocast=None,
                    source=None) -> Dict[str, float]:
    """The evaluation of cfg.model.family (coavt | vlsa); VLSA has no captioner."""
    if cfg.model.family == "coavt":
        return evaluate_coavt(model, loader, cfg, device, captions=captions, autocast=autocast, source=source)
    if cfg.model.family == "vlsa":
        if captions:
            raise ValueError("VLSA has no text decoder: evaluate it with retrieval (train.task=vlsa_pretrain, "
                             "or valor-fast eval --no-caption)")
        return evaluate_vlsa(model, loader, cfg, device, autocast=autocast, source=source)
    raise ValueError(f"evaluate_family: model.family={cfg.model.family!r} is not a family model")
