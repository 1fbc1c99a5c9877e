"""Open-ended video QA as conditioned generation (VALOR's protocol): the decoder reads
`[CLS] question [SEP] answer [SEP]` under the causal mask, cross-attending to the clip's video and
audio tokens; training is the MGC masked-token loss restricted to the answer positions (the
question is a prompt, never predicted); inference feeds `[CLS] question [SEP]` and generates the
answer until [SEP]; the metric is exact match after normalisation.

With model.task_prompts (VALOR-L) the layout is upstream's (model/pretrain.py:1266-1273): the
question, with 'answer the question' spliced after its [CLS], is the decoder's prompt stream
(its own positions, the prompt embedding row) and the text is `[CLS] answer [SEP]`.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..config import LossConfig
from ..data.tokenizer import CLS_ID, SEP_ID
from ..model.args import TASK_PROMPT_IDS
from ..model.valor import VALOR
from .base import Task, masked_mean, register_task, sample_generators
from .mga import parse_groups
from .mgc import audio_presence, mask_plan, masking_draws, mgc_group_losses, plan_of

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^a-z0-9 ]+")


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation or articles, single spaces (the usual open-ended QA rule)."""
    s = _PUNCT.sub(" ", s.lower())
    return " ".join(_ARTICLES.sub(" ", s).split())


def encode_qa(tokenizer, question: str, answer: Optional[str], max_len: int) -> Tuple[List[int], int]:
    """Token ids `[CLS] q [SEP] (a [SEP])` and the prompt length (through the first [SEP]).  The
    question is truncated (from its end) so that the answer always fits in max_len."""
    q = tokenizer(question, add_special_tokens=False)["input_ids"]
    a = [] if answer is None else tokenizer(answer, add_special_tokens=False)["input_ids"] + [SEP_ID]
    room = max_len - 2 - len(a)
    if room < 1:
        raise ValueError(f"answer {answer!r} ({len(a)} tokens with [SEP]) does not fit in {max_len} tokens")
    q = q[:room]
    ids = [CLS_ID] + q + [SEP_ID] + a
    return ids, len(q) + 2


def question_prompt(tokenizer, question: str, max_len: int) -> List[int]:
    """model.task_prompts QA: `[CLS] answer the question <question> [SEP]` (upstream splices the
    prompt's inner words after the question's [CLS]), at most max_len ids."""
    inner = list(TASK_PROMPT_IDS["qa"])
    q = tokenizer(question, add_special_tokens=False)["input_ids"][:max(max_len - 2 - len(inner), 0)]
    return [CLS_ID] + inner + q + [SEP_ID]


def _pad_rows(rows: List[List[int]]) -> torch.Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def qa_batch(qa_lists: Sequence[Sequence[dict]], tokenizer, max_len: int,
             generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
             prompted: bool = False) -> Dict[str, torch.Tensor]:
    """One QA pair per clip, drawn with `generator` (one for the batch, or one per clip: the
    trainer's per-sample generators) -> qa_ids (B, L), qa_mask (B, L) bool, answer_mask (B, L)
    bool (the answer and its [SEP]).  prompted (model.task_prompts): qa_ids is `[CLS] answer
    [SEP]` and qa_prompt (B, P) the question prompt (`question_prompt`, 0-padded)."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator] * len(qa_lists)
    if len(gens) != len(qa_lists):
        raise ValueError(f"{len(gens)} generators for {len(qa_lists)} clips")
    rows, prompts = [], []
    for i, qas in enumerate(qa_lists):
        if not qas:
            raise ValueError(f"clip {i} of the batch has no QA pairs; QA fine-tuning needs annotations "
                             "with a 'qa' list [{'question', 'answer'}] (or qa_mapper.json)")
        k = int(torch.randint(len(qas), (), generator=gens[i])) if len(qas) > 1 else 0
        if prompted:   # the text is `[CLS] answer [SEP]`; the answer tokens start at 1
            ids = [CLS_ID] + encode_qa(tokenizer, "", str(qas[k]["answer"]), max_len)[0][2:]
            prompts.append(question_prompt(tokenizer, qas[k]["question"], max_len))
        else:
            ids, p = encode_qa(tokenizer, qas[k]["question"], str(qas[k]["answer"]), max_len)
            prompts.append(p)
        rows.append(ids)
    L = max(len(r) for r in rows)
    out = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    ans = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        out[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
        first = 1 if prompted else p
        ans[i, first:len(r)] = True
    res = {"qa_ids": out, "qa_mask": mask, "answer_mask": ans}
    if prompted:
        res["qa_prompt"] = _pad_rows(prompts)
    return res


def qa_step_losses(model: VALOR, batch: dict, cfg: LossConfig,
                   generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """MGC on the answer tokens, conditioned on the configured groups (default T-AV).  The mask
    plan comes from the batch (`QATask.prepare`), else it is drawn here from `generator`; with
    neither it is an error (never the unseeded global generator)."""
    vt = model.encode_video(batch["video"])
    at = model.encode_audio(batch["audio"])
    memory, n_video = model.memory(vt, at)
    has_audio = audio_presence(batch, cfg)
    plan = plan_of(batch)
    if plan is None:
        if generator is None:
            raise ValueError("a QA batch needs QATask.prepare's mask plan or a generator for its masking draws")
        plan = mask_plan(batch["qa_ids"], batch["qa_mask"], cfg.groups, cfg.mask_prob, model.cfg.vocab_size,
                         has_audio, generator, eligible=batch["answer_mask"], random_from=cfg.mask_random_from)
    means, present = mgc_group_losses(model, plan, batch["qa_mask"], memory, n_video, cfg.groups, has_audio,
                                      cfg.label_smoothing, grouped=cfg.grouped_decoder, prompt=batch.get("qa_prompt"))
    groups = parse_groups(cfg.groups)
    losses = {f"qa/{g}": means[gi] for gi, g in enumerate(groups)}
    losses["loss"] = masked_mean(means, present)
    return losses


@register_task("qa")
class QATask(Task):
    """QA fine-tuning objective as a module (the FSDP / DDP root, like PretrainTask).
    `prepare` turns a host batch's QA lists into token tensors before it moves to the device."""

    evaluation = "qa"

    def __init__(self, model: VALOR, cfg: LossConfig, max_len: int):
        super().__init__(model)
        self.cfg, self.max_len = cfg, max_len
        self.groups = parse_groups(cfg.groups)
        self._tok = None

    @classmethod
    def from_config(cls, model: VALOR, cfg) -> "QATask":
        return cls(model, cfg.loss, cfg.data.max_text_len)

    def loss_keys(self) -> Tuple[str, ...]:
        return ("loss",) + tuple(f"qa/{g}" for g in self.groups)

    def flop_groups(self) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        return (), tuple(self.groups)   # no MGA: the decoder over the answer per group

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """Host side: each clip's QA pair and then its masking draws from the clip's own
        generator (`sample_generators`), the tokens, the MGC mask plan over the answer."""
        if self._tok is None:
            from ..data.tokenizer import get_tokenizer   # data is a sibling layer; imported lazily
            self._tok = get_tokenizer()
        gens = sample_generators(generator, batch["index"])
        batch = dict(batch)
        batch.update(qa_batch(batch["qa"], self._tok, self.max_len, gens, prompted=self.model.cfg.task_prompts))
        draws = masking_draws(batch["qa_mask"], gens)
        batch.update(mask_plan(batch["qa_ids"], batch["qa_mask"], self.groups, self.cfg.mask_prob,
                               self.model.cfg.vocab_size, audio_presence(batch, self.cfg), draws=draws,
                               eligible=batch["answer_mask"], random_from=self.cfg.mask_random_from))
        return batch

    def forward(self, batch: dict, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        return qa_step_losses(self.model, batch, self.cfg, generator)
