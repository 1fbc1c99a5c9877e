"""Retrieval and captioning metrics."""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..utils.deps import HAS_COCOEVAL
from ..utils.log import get_logger

log = get_logger(__name__)


def retrieval_ranks(sim: torch.Tensor, gt: Sequence[Sequence[int]]) -> np.ndarray:
    """Rank (1-based) of the best-ranked ground truth for every query row.

    sim (Q, N); gt[q] lists the correct columns of query q.  Ties are broken pessimistically:
    a correct item tied with wrong ones ranks after all of them, so a constant model cannot
    score R@1 = 1.
    """
    sim = sim.float().cpu()
    ranks = []
    for q, cols in enumerate(gt):
        if len(cols) == 0:
            raise ValueError(f"query {q} has no ground-truth item")
        row = sim[q]
        best = row[list(cols)].max()
        others = torch.ones_like(row, dtype=torch.bool)
        others[list(cols)] = False
        ranks.append(int((row[others] >= best).sum()) + 1)
    return np.asarray(ranks)


def recall_metrics(ranks: np.ndarray, prefix: str) -> Dict[str, float]:
    return {f"{prefix}/R@1": float((ranks <= 1).mean()), f"{prefix}/R@5": float((ranks <= 5).mean()),
            f"{prefix}/R@10": float((ranks <= 10).mean()), f"{prefix}/MdR": float(np.median(ranks)),
            f"{prefix}/MnR": float(ranks.mean())}


def retrieval_metrics(sim: torch.Tensor, text_to_clip: Sequence[int], name: str) -> Dict[str, float]:
    """sim (N_text, N_clip); text_to_clip[t] = the clip of caption t.  Both directions:
    `retrieval/t2<name>` and `retrieval/<name>2t` (a clip may own several captions)."""
    t2c = retrieval_ranks(sim, [[c] for c in text_to_clip])
    owners: List[List[int]] = [[] for _ in range(sim.shape[1])]
    for t, c in enumerate(text_to_clip):
        owners[c].append(t)
    c2t = retrieval_ranks(sim.t(), owners)
    out = recall_metrics(t2c, f"retrieval/t2{name}")
    out.update(recall_metrics(c2t, f"retrieval/{name}2t"))
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
