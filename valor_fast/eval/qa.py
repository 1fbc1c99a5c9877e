"""Open-ended QA evaluation: generate an answer for every (clip, question) of a split, exact-match
accuracy after normalisation, and answer-vocabulary statistics."""
from __future__ import annotations

import collections
import contextlib
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..config import Config
from ..model.valor import VALOR
from ..tasks.mgc import audio_presence, group_memory_masks
from ..tasks.qa import encode_qa, normalize_answer, question_prompt
from .caption import generate


def answer_stats(gt: Sequence[str], train_answers: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Vocabulary of the normalised ground-truth answers: distinct answers, the share of the most
    frequent one (what a constant answer scores), and with training answers, the share of test
    questions whose answer was seen in training (an upper bound for a closed-vocabulary model)."""
    g = [normalize_answer(a) for a in gt]
    out = {"qa/answers_distinct": float(len(set(g)))}
    if g:
        out["qa/top_answer_share"] = collections.Counter(g).most_common(1)[0][1] / len(g)
    if train_answers is not None and g:
        seen = {normalize_answer(a) for a in train_answers}
        out["qa/answers_seen_in_train"] = sum(a in seen for a in g) / len(g)
    return out


@torch.no_grad()
def evaluate_qa(model: VALOR, loader, cfg: Config, device, autocast=None,
                train_answers: Optional[Sequence[str]] = None, beam: Optional[int] = None,
                max_answer_len: int = 8, predictions: Optional[List[dict]] = None,
                source: Optional[str] = None) -> Dict[str, float]:
    """Every QA pair of every clip in `loader`.  Questions are bucketed by token length so a batch
    of prompts shares one length (the cached decoder keeps one position per step); the clip's
    memory is computed once and reused by all its questions.  `predictions`, if a list, receives
    {video_id, question, answer, prediction, correct} rows.  Non-finite memory (a broken model)
    raises NonFiniteScoresError naming `source`."""
    from .metrics import check_finite
    from ..data.tokenizer import get_tokenizer
    tok = get_tokenizer()
    was_training = model.training
    model.eval()
    ctx = autocast or contextlib.nullcontext
    beam = beam or cfg.eval.beam
    t0 = time.time()
    gts, correct, n = [], 0, 0
    for batch in loader:
        with ctx():
            vt = model.encode_video(batch["video"].to(device))
            at = model.encode_audio(batch["audio"].to(device))
            memory, n_video = model.memory(vt, at)
            check_finite(memory, "decoder memory (video + audio tokens)",
                         f"{source}, batch starting at clip {batch['video_id'][0]!r}" if source else None)
            has_audio = audio_presence(batch, cfg.loss)
            mm = group_memory_masks([cfg.eval.caption_group], memory.shape[0], n_video, memory.shape[1] - n_video,
                                    None if has_audio is None else has_audio.to(device), device)
            # prompt length -> [(clip row, qa dict, ids)]; the question is the text's prefix, or
            # with model.task_prompts the decoder's prompt stream (the answer starts at [CLS])
            buckets = collections.defaultdict(list)
            prompted = bool(getattr(model.cfg, "task_prompts", False))
            for i, qas in enumerate(batch["qa"]):
                for qa in qas:
                    if prompted:
                        ids = question_prompt(tok, qa["question"], cfg.data.max_text_len)
                    else:
                        ids, _ = encode_qa(tok, qa["question"], None, cfg.data.max_text_len - max_answer_len)
                    buckets[len(ids)].append((i, qa, ids))
            for _, items in sorted(buckets.items()):
                rows = torch.tensor([i for i, _, _ in items], device=device)
                prompt = torch.tensor([ids for _, _, ids in items], device=device)
                kw = {"task_prompt": prompt} if prompted else {"prompt": prompt}
                out = generate(model, memory[rows], mm[rows], cfg.eval, beam=beam, max_len=max_answer_len, **kw)
                for (i, qa, _), pred in zip(items, out):
                    ok = normalize_answer(pred) == normalize_answer(str(qa["answer"]))
                    correct += ok
                    n += 1
                    gts.append(str(qa["answer"]))
                    if predictions is not None:
                        predictions.append({"video_id": batch["video_id"][i], "question": qa["question"],
                                            "answer": qa["answer"], "prediction": pred, "correct": bool(ok)})
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_qa: the split has no QA pairs (annotations need a 'qa' list)")
    m = {"qa/accuracy": correct / n, "qa/questions": float(n), "qa/seconds": time.time() - t0}
    m.update(answer_stats(gts, train_answers))
    return m
