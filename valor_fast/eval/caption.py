"""Caption generation: beam search over VALOR's masked decoding.

VALOR decodes by feeding `[CLS] w1 .. wt [MASK]` under the causal mask and reading the last
position.  With the KV cache, the prefix `[CLS] w1 .. wt` is committed once per step and the
trailing [MASK] is a peek (its keys are never stored), so a step costs two one-token passes
instead of a pass over the whole prefix.  The video/audio cross-attention K/V are computed once
per clip and shared by every beam and step.

Generation never emits a special or reserved id: every id below FIRST_WORD_ID ([PAD], [unused*],
[UNK], [CLS], [MASK]) is masked out of the next-token distribution, [SEP] excepted (it ends a
caption).  The caption text is decoded with skip_special_tokens, so such an id would otherwise
vanish from the text silently (an undertrained decoder's "[PAD] [PAD] ..." reads as "").
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..model.valor import VALOR
from ..tasks.mgc import CLS_ID, FIRST_WORD_ID, MASK_ID, SEP_ID


def banned_token_mask(vocab: int, device=None) -> torch.Tensor:
    """(vocab,) bool, True for the ids generation must never emit: all ids below FIRST_WORD_ID
    (bert-base-uncased: [PAD] 0, [unused0-98] 1-99, [UNK] 100, [CLS] 101, [MASK] 103,
    [unused99-993] 104-998) except [SEP] 102."""
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)
    banned[:min(FIRST_WORD_ID, vocab)] = True
    if SEP_ID < vocab:
        banned[SEP_ID] = False
    return banned


def _expand(t: torch.Tensor, k: int) -> torch.Tensor:
    # (B, ...) -> (B*k, ...), each row repeated k times consecutively
    return t.repeat_interleave(k, dim=0)


class _Stepper:
    """Next-token log-probabilities for a batch of prefixes, cached or not."""

    def __init__(self, model: VALOR, memory, memory_mask, use_cache: bool):
        self.model, self.memory, self.mmask, self.use_cache = model, memory, memory_mask, use_cache
        self.caches = [dict() for _ in model.text.layers] if use_cache else None
        self.prefix: Optional[torch.Tensor] = None  # (N, t) committed tokens
        self._banned: Optional[torch.Tensor] = None  # (V,) bool, built at the first peek

    def reorder(self, idx: torch.Tensor) -> None:
        self.prefix = self.prefix[idx]
        if self.caches is not None:
            for c in self.caches:
                c["k"], c["v"] = c["k"][idx], c["v"][idx]
                # beams of one clip share its memory, so the memory K/V need no reordering

    def start(self, n: int, device, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        # prompt (n, P): `[CLS] question [SEP]` for QA; captions start from [CLS] alone
        self.prefix = (torch.full((n, 1), CLS_ID, dtype=torch.long, device=device) if prompt is None
                       else prompt.to(device))
        if self.use_cache:
            # first pass: projects the memory K/V into the caches once per clip
            self.model.decode(self.prefix, None, self.memory, self.mmask, caches=self.caches, offset=0)
        return self._peek()

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.prefix.shape[1]
        self.prefix = torch.cat([self.prefix, tokens[:, None]], 1)
        if self.use_cache:
            self.model.decode(tokens[:, None], None, None, self.mmask, caches=self.caches, offset=t)
        return self._peek()

    def _peek(self) -> torch.Tensor:
        n, t = self.prefix.shape
        mask_tok = torch.full((n, 1), MASK_ID, dtype=torch.long, device=self.prefix.device)
        if self.use_cache:
            for c in self.caches:
                c["peek"] = True
            h = self.model.decode(mask_tok, None, None, self.mmask, caches=self.caches, offset=t)
            for c in self.caches:
                c["peek"] = False
        else:
            h = self.model.decode(torch.cat([self.prefix, mask_tok], 1), None, self.memory, self.mmask)
        logits = self.model.lm_logits(h[:, -1]).float()                           # (N, V)
        if self._banned is None:
            self._banned = banned_token_mask(logits.shape[-1], logits.device)
        # out of place: SCST samples through this with gradients on
        return torch.log_softmax(logits.masked_fill(self._banned, float("-inf")), dim=-1)


@torch.no_grad()
def beam_search(model: VALOR, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None,
                beam: int = 3, max_len: int = 30, length_penalty: float = 1.0,
                use_cache: bool = True, prompt: Optional[torch.Tensor] = None) -> List[List[int]]:
    """memory (B, Lm, C) -> best token ids (without [CLS]/[SEP]) for each clip.

    prompt (B, P), optional: a prefix every hypothesis of a clip starts from (QA: `[CLS] question
    [SEP]`, all rows of one length: bucket questions by length); the prefix is not returned.

    Hypothesis score = sum log p / len ** length_penalty, len counting [SEP]; a hypothesis ends
    at [SEP] or at max_len tokens.  beam=1 is greedy search.
    """
    if beam < 1 or max_len < 1:
        raise ValueError(f"beam ({beam}) and max_len ({max_len}) must be >= 1")
    B, dev = memory.shape[0], memory.device
    mem = _expand(memory, beam)                                      # (B*K, Lm, C)
    mmask = None if memory_mask is None else _expand(memory_mask, beam)
    st = _Stepper(model, mem, mmask, use_cache)
    if prompt is not None and (prompt.dim() != 2 or prompt.shape[0] != B):
        raise ValueError(f"prompt must be (B={B}, P), got {tuple(prompt.shape)}")
    P = 1 if prompt is None else prompt.shape[1]
    logp = st.start(B * beam, dev, None if prompt is None else _expand(prompt, beam))  # (B*K, V)
    V = logp.shape[-1]
    scores = torch.zeros(B, beam, device=dev)
    scores[:, 1:] = float("-inf")                                    # all beams start equal: keep one
    finished: List[List[tuple]] = [[] for _ in range(B)]
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    for t in range(max_len):
        cand = (scores[:, :, None] + logp.view(B, beam, V)).view(B, -1)   # (B, K*V)
        top, idx = cand.topk(2 * beam, dim=-1)                      # room for beams that end
        new_scores = torch.full((B, beam), float("-inf"), device=dev)
        new_src = torch.zeros(B, beam, dtype=torch.long, device=dev)
        new_tok = torch.full((B, beam), SEP_ID, dtype=torch.long, device=dev)
        for b in range(B):
            if not alive[b]:
                continue
            k = 0
            for s, i in zip(top[b].tolist(), idx[b].tolist()):
                src, tok = divmod(i, V)
                if s == float("-inf"):
                    break
                if tok == SEP_ID or t == max_len - 1:
                    seq = st.prefix[b * beam + src, P:].tolist() + ([] if tok == SEP_ID else [tok])
                    length = t + 1
                    finished[b].append((s / (length ** length_penalty), seq))
                else:
                    new_scores[b, k], new_src[b, k], new_tok[b, k] = s, src, tok
                    k += 1
                if k == beam:
                    break
            # stop once the best finished hypothesis beats what any live beam can still reach
            if len(finished[b]) >= beam or k == 0:
                best_done = max(f[0] for f in finished[b]) if finished[b] else float("-inf")
                best_live = new_scores[b].max().item() / ((t + 1) ** length_penalty) if k else float("-inf")
                if best_done >= best_live or k == 0:
                    alive[b] = False
        if not bool(alive.any()):
            break
        scores = torch.where(alive[:, None], new_scores, torch.full_like(new_scores, float("-inf")))
        src = (new_src + torch.arange(B, device=dev)[:, None] * beam).view(-1)
        st.reorder(src)
        logp = st.push(new_tok.view(-1))
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]
