"""What to measure for a task: the dispatch from `train.task` to the evaluation it needs."""
from __future__ import annotations

from typing import Dict, Optional

from ..config import Config
from ..tasks import get_task


def evaluation_of(cfg: Config) -> str:
    """The evaluation of cfg.train.task: retrieval, caption (retrieval + captioning) or qa."""
    return get_task(cfg.train.task).evaluation


def evaluate_task(model, loader, cfg: Config, device, amp=None, kind: Optional[str] = None,
                  source: Optional[str] = None, captions_out: Optional[dict] = None) -> Dict[str, float]:
    """The metrics of the task on `loader`'s split: retrieval only, captioning (+ retrieval), or
    QA, measured for cfg.model.family (VALOR: eval/evaluate.py, eval/qa.py; CoAVT, VLSA:
    eval/family.py).  `kind` overrides the task's own evaluation.  `source` names the model
    scored (its checkpoint): non-finite embeddings raise NonFiniteScoresError naming it.
    `captions_out`: see `evaluate.evaluate` (VALOR captioning only)."""
    kind = kind or evaluation_of(cfg)
    if kind not in ("retrieval", "caption", "qa"):
        raise ValueError(f"evaluation must be retrieval, caption or qa, got {kind!r}")
    if cfg.model.family != "valor":
        # the family models (CoAVT, VLSA) measure the same kinds their own way: eval/family.py
        if kind == "qa":
            raise ValueError(f"evaluation qa needs VALOR's QA decoder; model.family={cfg.model.family} evaluates "
                             "retrieval (+ captioning for coavt)")
        from .family import evaluate_family
        return evaluate_family(model, loader, cfg, device, captions=kind == "caption", autocast=amp, source=source)
    if kind == "qa":
        from ..data.annotations import read_annotations
        from .qa import evaluate_qa
        train_answers = [str(q["answer"]) for r in read_annotations(cfg.data.root, cfg.data.train_ann) for q in r["qa"]]
        return evaluate_qa(model, loader, cfg, device, autocast=amp, train_answers=train_answers,
                           max_answer_len=cfg.eval.qa_max_answer_len, source=source)
    from .evaluate import evaluate
    return evaluate(model, loader, cfg, device, captions=kind == "caption", autocast=amp, source=source,
                    captions_out=captions_out)
