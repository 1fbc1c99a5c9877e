"""Retrieval and captioning metrics."""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.deps import HAS_COCOEVAL
from ..utils.log import get_logger

log = get_logger(__name__)


class NonFiniteScoresError(FloatingPointError):
    """Embeddings or similarities hold NaN/Inf: the model is broken and is not scored."""


def check_finite(x: torch.Tensor, what: str, source: Optional[str] = None) -> None:
    """Raise NonFiniteScoresError naming `what` (e.g. "text embeddings", "t2v similarity") and
    `source` (the checkpoint scored) when `x` holds NaN/Inf.  One host sync."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0].tolist()]
        src = f" of {source}" if source else ""
        raise NonFiniteScoresError(f"{what}{src} hold {int(bad.sum())} non-finite value(s) out of {x.numel()} "
                                   f"(first at index {tuple(first)}): the model produces NaN/Inf, so it is not "
                                   f"scored")


def duplicate_ids(ids: Sequence[Hashable]) -> Dict[Hashable, int]:
    """{id: count} of every id listed more than once (in first-seen order); {} when unique.
    An evaluation split with duplicates scores a clip twice in retrieval (its copy is a tied
    distractor) and keeps one caption prediction per id: report them, never drop silently."""
    counts = Counter(ids)
    return {i: c for i, c in counts.items() if c > 1}


def require_unique_ids(ids: Sequence[Hashable], split: str, source: Optional[str] = None) -> None:
    """ValueError naming the split (and file) and the first duplicated ids with their counts."""
    dup = duplicate_ids(ids)
    if dup:
        src = f" ({source})" if source else ""
        some = ", ".join(f"{i!r} x{c}" for i, c in list(dup.items())[:5])
        raise ValueError(f"evaluation split {split!r}{src} lists {len(dup)} id(s) more than once: {some}"
                         f"{' ...' if len(dup) > 5 else ''}; each clip must appear once")


def _gt_mask(shape, gt: Sequence[Sequence[int]]) -> torch.Tensor:
    Q, N = shape
    if len(gt) != Q:
        raise ValueError(f"{len(gt)} ground-truth lists for {Q} queries")
    rows, cols = [], []
    for q, cs in enumerate(gt):
        if len(cs) == 0:
            raise ValueError(f"query {q} has no ground-truth item")
        for c in cs:
            if not 0 <= int(c) < N:
                raise ValueError(f"query {q}: ground-truth item {c} outside the {N} candidates")
            rows.append(q)
            cols.append(int(c))
    mask = torch.zeros(Q, N, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def rank_counts(sim: torch.Tensor, gt: Sequence[Sequence[int]], source: Optional[str] = None,
                what: str = "similarity") -> Tuple[np.ndarray, np.ndarray]:
    """(greater, tied) per query: wrong candidates scoring above / equal to the query's
    best-scoring correct item (its other correct items are not competitors).  Non-finite
    scores are refused (NonFiniteScoresError naming `what` and `source`): with NaN every
    comparison is False and a broken model would rank first everywhere."""
    sim = sim.detach().float().cpu()
    check_finite(sim, what, source)
    mask = _gt_mask(tuple(sim.shape), gt)
    best = torch.where(mask, sim, torch.full_like(sim, -float("inf"))).amax(1, keepdim=True)   # (Q, 1)
    others = ~mask
    greater = ((sim > best) & others).sum(1)
    tied = ((sim == best) & others).sum(1)
    return greater.numpy(), tied.numpy()


def retrieval_ranks(sim: torch.Tensor, gt: Sequence[Sequence[int]], source: Optional[str] = None,
                    what: str = "similarity") -> np.ndarray:
    """Rank (1-based) of the best-ranked ground truth for every query row.

    sim (Q, N); gt[q] lists the correct columns of query q.  Ties are broken pessimistically:
    rank = 1 + the wrong candidates scoring >= the best correct one, so a correct item tied with
    wrong ones ranks after all of them and a constant model never scores above chance (every
    rank is N).  NaN/Inf scores are an error naming `source` (see rank_counts).
    """
    greater, tied = rank_counts(sim, gt, source, what)
    return greater + tied + 1


def recall_metrics(ranks: np.ndarray, prefix: str) -> Dict[str, float]:
    return {f"{prefix}/R@1": float((ranks <= 1).mean()), f"{prefix}/R@5": float((ranks <= 5).mean()),
            f"{prefix}/R@10": float((ranks <= 10).mean()), f"{prefix}/MdR": float(np.median(ranks)),
            f"{prefix}/MnR": float(ranks.mean())}


def expected_recall_metrics(greater: np.ndarray, tied: np.ndarray, prefix: str) -> Dict[str, float]:
    """Recall with ties broken uniformly at random, in expectation: R@k = mean over queries of
    P(rank <= k) = clip((k - greater) / (tied + 1), 0, 1); MnR the expected rank.  A constant
    model scores exactly chance (R@k = k/N, MnR = (N+1)/2).  MdR: median of expected ranks."""
    g, t = greater.astype(np.float64), tied.astype(np.float64)
    out = {f"{prefix}/R@{k}": float(np.clip((k - g) / (t + 1), 0, 1).mean()) for k in (1, 5, 10)}
    exp_rank = 1 + g + t / 2
    out[f"{prefix}/MdR"] = float(np.median(exp_rank))
    out[f"{prefix}/MnR"] = float(exp_rank.mean())
    return out


def retrieval_metrics(sim: torch.Tensor, text_to_clip: Sequence[int], name: str, source: Optional[str] = None,
                      ties: str = "pessimistic") -> Dict[str, float]:
    """sim (N_text, N_clip); text_to_clip[t] = the clip of caption t.  Both directions:
    `retrieval/t2<name>` and `retrieval/<name>2t` (a clip may own several captions).
    `source` (the checkpoint scored) names the model in the error for NaN/Inf scores.
    ties: pessimistic (a tie counts against the model) | expected (uniformly random tie-break,
    in expectation: a constant model scores exactly chance)."""
    return cross_retrieval_metrics(sim, text_to_clip, "t", name, source, ties)


def cross_retrieval_metrics(sim: torch.Tensor, row_to_col: Sequence[int], rows: str, cols: str,
                            source: Optional[str] = None, ties: str = "pessimistic") -> Dict[str, float]:
    """Retrieval both ways between two sets: sim (N_rows, N_cols), row_to_col[r] = the column
    item of row r (a column may own several rows).  Keys `retrieval/<rows>2<cols>/...` (each
    row a query) and `retrieval/<cols>2<rows>/...` (each column a query, found by its
    best-ranked row): e.g. rows "t", cols "v" for text <-> video, rows "v", cols "a" for video
    <-> audio.  ties and source as in `retrieval_metrics`."""
    if ties not in ("pessimistic", "expected"):
        raise ValueError(f"ties must be pessimistic or expected, got {ties!r}")
    owners: List[List[int]] = [[] for _ in range(sim.shape[1])]
    for t, c in enumerate(row_to_col):
        owners[c].append(t)
    out: Dict[str, float] = {}
    for mat, gt, prefix in ((sim, [[c] for c in row_to_col], f"{rows}2{cols}"), (sim.t(), owners, f"{cols}2{rows}")):
        greater, tied = rank_counts(mat, gt, source, f"{prefix} similarity")
        if ties == "pessimistic":
            out.update(recall_metrics(greater + tied + 1, f"retrieval/{prefix}"))
        else:
            out.update(expected_recall_metrics(greater, tied, f"retrieval/{prefix}"))
    return out


_PUNCT = re.compile(r"[^a-z0-9' ]+")


def simple_tokenize(s: str) -> str:
    """Lower-case, strip punctuation (the PTB tokenizer needs Java; this keeps scoring Java-free)."""
    return " ".join(_PUNCT.sub(" ", s.lower()).split())


def caption_metrics(predictions: Dict[str, str], references: Dict[str, List[str]],
                    meteor: bool = True) -> Dict[str, float]:
    """BLEU-4, ROUGE-L, CIDEr (and METEOR where Java exists) via pycocoevalcap; keys
    `caption/BLEU-4` etc. on pycocoevalcap's scale."""
    if not HAS_COCOEVAL:
        raise RuntimeError("caption metrics need pycocoevalcap (pip install pycocoevalcap)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = set(predictions) ^ set(references)
    if missing:
        raise ValueError(f"predictions and references cover different ids, e.g. {sorted(missing)[:3]}")
    res = {k: [simple_tokenize(v) or "empty"] for k, v in predictions.items()}
    gts = {k: [simple_tokenize(r) for r in v] for k, v in references.items()}
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out["caption/BLEU-4"] = float(bleu[3])
    out["caption/ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["caption/CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        import shutil
        if shutil.which("java") is None:
            log.warning("METEOR skipped: it needs Java (apt-get install default-jre-headless)")
        else:
            try:
                from pycocoevalcap.meteor.meteor import Meteor
                m = Meteor()
                out["caption/METEOR"] = float(m.compute_score(gts, res)[0])
                try:
                    m.close()
                except Exception:
                    pass
            except Exception as e:  # Java present but METEOR failed to start: report, keep going
                log.warning("METEOR skipped: %s", e)
    return out
