"""Evaluation on a split: retrieval (T->V, T->A, T->AV and reverse) and captioning."""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from ..config import Config
from ..model.valor import VALOR, Features
from ..tasks.mga import similarity_matrix
from ..tasks.mgc import audio_presence, group_memory_masks
from ..utils.log import get_logger
from .caption import generate
from .metrics import caption_metrics, check_finite, duplicate_ids, retrieval_metrics

log = get_logger(__name__)


def _cat_features(fs) -> Features:
    mask = None if fs[0].mask is None else None  # masks re-padded below for text
    return Features(torch.cat([f.tokens for f in fs]), torch.cat([f.weight for f in fs]), mask,
                    torch.cat([f.pooled for f in fs]))


def _pad_text(feats, masks):
    """Concatenate text features of batches with different lengths: pad to the longest."""
    L = max(f.tokens.shape[1] for f in feats)
    toks, ws, ms = [], [], []
    for f, m in zip(feats, masks):
        p = L - f.tokens.shape[1]
        toks.append(torch.nn.functional.pad(f.tokens, (0, 0, 0, p)))
        ws.append(torch.nn.functional.pad(f.weight, (0, p)))
        ms.append(torch.nn.functional.pad(m, (0, p), value=False))
    return Features(torch.cat(toks), torch.cat(ws), torch.cat(ms), torch.cat([f.pooled for f in feats]))


def split_source(loader, cfg: Config) -> str:
    """'split <name> (<annotation file>)' of an evaluation loader, for reports."""
    split = getattr(getattr(loader, "dataset", None), "split", None) or getattr(loader, "split", None)
    ann = {"train": cfg.data.train_ann, "val": cfg.data.val_ann, "test": cfg.data.test_ann}.get(split)
    import os
    where = ann if ann is None or ":" in ann or os.path.isabs(ann) else os.path.join(cfg.data.root, ann)
    return f"split {split!r} ({where})" if split else "the evaluation split"


def report_duplicates(ids, loader, cfg: Config) -> int:
    """Log every id an evaluation split lists more than once (each copy is scored as its own
    clip, a tied distractor of the other in retrieval; captioning keeps one prediction per id)
    with the annotation file; returns how many ids repeat."""
    dup = duplicate_ids(ids)
    if dup:
        log.warning("%s lists %d video id(s) more than once, each copy scored as a clip: %s", split_source(loader, cfg),
                    len(dup), ", ".join(f"{i!r} x{c}" for i, c in dup.items()))
    return len(dup)


def _check_batch(feats, b, source: Optional[str]) -> None:
    """Non-finite embeddings of a batch: NonFiniteScoresError naming the model (`source`) and the
    batch's first clip, before anything is scored (one host sync a batch)."""
    src = f"{source}, batch starting at clip {b['video_id'][0]!r}" if source else None
    for what, f in feats:
        check_finite(f.pooled, what, src)


@torch.no_grad()
def evaluate(model: VALOR, loader, cfg: Config, device, captions: bool = True,
             max_caption_clips: Optional[int] = None, autocast=None, source: Optional[str] = None,
             captions_out: Optional[dict] = None) -> Dict[str, float]:
    """Retrieval with the split's first caption of every clip as the query (eval.retrieval_captions
    = first, MSRVTT-1kA style) or every caption (= all: VATEX / AudioCaps; clip->text counts the
    best-ranked of its captions), and captioning of every clip (ground truth = all its captions).
    Returns flat metrics.  `source` names the model (its checkpoint) in the error for NaN/Inf
    embeddings or scores: a broken model is refused, never scored.  `captions_out`, a dict: filled
    with {video_id: (prediction, references)} of the captioned clips (the run's summary.md)."""
    if cfg.eval.retrieval_captions not in ("first", "all"):
        raise ValueError(f"eval.retrieval_captions must be first or all, got {cfg.eval.retrieval_captions!r}")
    all_caps = cfg.eval.retrieval_captions == "all"
    text_to_clip = []
    was_training = model.training
    model.eval()
    t0 = time.time()
    tf, tmask, vf, af, ids, refs, preds = [], [], [], [], [], {}, {}
    n_cap = 0
    mode = cfg.eval.retrieval_mode or cfg.loss.mga_mode
    import contextlib
    ctx = autocast or contextlib.nullcontext
    for batch in loader:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with ctx():
            vt, at = model.encode_video(b["video"]), model.encode_audio(b["audio"])
            if all_caps:   # every caption of every clip in this batch is a query
                from ..data.tokenizer import tokenize
                flat = [c for caps in b["captions"] for c in caps]
                t_ids, t_mask = (x.to(device) for x in tokenize(flat, cfg.data.max_text_len))
                text_to_clip.extend(len(ids) + i for i, caps in enumerate(b["captions"]) for _ in caps)
            else:
                t_ids, t_mask = b["text_ids"], b["text_mask"]
                text_to_clip.extend(range(len(ids), len(ids) + len(b["video_id"])))
            th = model.encode_text(t_ids, t_mask)
            tf.append(model.text_features(th, t_mask))
            tmask.append(t_mask)
            vf.append(model.video_features(vt))
            af.append(model.audio_features(at))
            _check_batch((("text embeddings", tf[-1]), ("video embeddings", vf[-1]), ("audio embeddings", af[-1])),
                         b, source)
            ids.extend(b["video_id"])
            if captions and (max_caption_clips is None or n_cap < max_caption_clips):
                memory, n_video = model.memory(vt, at)
                mm = group_memory_masks([cfg.eval.caption_group], memory.shape[0], n_video,
                                        memory.shape[1] - n_video, audio_presence(b, cfg.loss), device)
                out = generate(model, memory, mm, cfg.eval)
                for vid, text, caps in zip(b["video_id"], out, b["captions"]):
                    preds[vid] = text
                    refs[vid] = list(caps)
                n_cap += len(out)
    t = _pad_text(tf, tmask)
    v, a = _cat_features(vf), _cat_features(af)
    metrics: Dict[str, float] = {"eval/duplicate_ids": float(report_duplicates(ids, loader, cfg))}
    n = len(ids)
    for g, name in (("tv", "v"), ("ta", "a"), ("tav", "av")):
        sim = similarity_matrix(model, t, v, a, g, mode, cfg.loss.fine_padding, cfg.loss.fine_text_len)
        metrics.update(retrieval_metrics(sim, text_to_clip, name, source=source))
    if captions and preds:
        metrics.update(caption_metrics(preds, refs))
        metrics["caption/n_clips"] = float(len(preds))
        if captions_out is not None:
            captions_out.update({k: (preds[k], refs[k]) for k in sorted(preds)})
        first = sorted(preds)[:3]
        for k in first:
            log.info("caption %s: %r (ref: %r)", k, preds[k], refs[k][0])
    metrics["eval/clips"] = float(n)
    metrics["eval/queries"] = float(len(text_to_clip))
    metrics["eval/seconds"] = time.time() - t0
    model.train(was_training)
    return metrics


def format_table(metrics: Dict[str, float]) -> str:
    rows = []
    for pre, tag in (("retrieval", ""), ("retrieval_rerank", " (re-ranked)")):
        for g in ("t2av", "t2v", "t2a", "av2t", "v2t", "a2t", "v2a", "a2v"):
            k = f"{pre}/{g}"
            if f"{k}/R@1" in metrics:
                rows.append(f"  {g:>5}  R@1 {metrics[k+'/R@1']:.3f}  R@5 {metrics[k+'/R@5']:.3f}  "
                            f"R@10 {metrics[k+'/R@10']:.3f}  MdR {metrics[k+'/MdR']:.1f}{tag}")
    cap = [f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("caption/") and k != "caption/n_clips"]
    if cap:
        rows.append("  caption " + "  ".join(cap))
    qa = [f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("qa/") and k != "qa/seconds"]
    if qa:
        rows.append("  qa " + "  ".join(qa))
    return "\n".join(rows)
