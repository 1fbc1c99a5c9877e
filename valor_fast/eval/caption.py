"""Text generation for evaluation and inference: `model.decoding.beam_search` with the BERT
vocabulary's ids (`data.tokenizer.DECODE_IDS`) and the eval settings, decoded to strings."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..config import EvalConfig
from ..data.tokenizer import DECODE_IDS, get_tokenizer
from ..model.decoding import beam_search


def generate(model, memory: torch.Tensor, memory_mask: Optional[torch.Tensor], ev: EvalConfig,
             beam: Optional[int] = None, max_len: Optional[int] = None,
             prompt: Optional[torch.Tensor] = None, task_prompt: Optional[torch.Tensor] = None) -> List[str]:
    """memory (B, Lm, C) -> one text a clip: beam search (`beam` 0 or None: eval.beam;
    `max_len` None: eval.max_len; eval.length_penalty), special tokens dropped.  `prompt` (B, P):
    the prefix each clip's text continues (QA: `[CLS] question [SEP]`), not returned.
    `task_prompt` (B, P): the decoder's prompt stream (QA's question on a model.task_prompts
    model); None = the model's own (VALOR-L's caption prompt, or none)."""
    seqs = beam_search(model, memory, memory_mask, beam=beam or ev.beam, max_len=ev.max_len if max_len is None else max_len,
                       length_penalty=ev.length_penalty, prompt=prompt, task_prompt=task_prompt, **DECODE_IDS)
    tok = get_tokenizer()
    return [tok.decode(s, skip_special_tokens=True) for s in seqs]
