"""Decoding over VALOR's masked decoder: the step state machine (`Stepper`), beam search (beam 1 =
greedy) and sampling; `NextTokenStepper` steps a plain next-token decoder (CoAVT's) through the
same beam search.

VALOR decodes by feeding `[CLS] w1 .. wt [MASK]` under the causal mask and reading the last
position.  With the KV cache, the prefix `[CLS] w1 .. wt` is committed once per step and the
trailing [MASK] is a peek (its keys are never stored), so a step costs two one-token passes
instead of a pass over the whole prefix.  The video/audio cross-attention K/V are computed once
per clip and shared by every beam and step.

The token ids come in as arguments (`bos_id` starts a caption, `eos_id` ends it, `mask_id` is the
peeked position): model/ knows no tokenizer.  For the BERT vocabulary they are
`valor_fast.data.tokenizer.DECODE_IDS` (`beam_search(model, memory, mask, **DECODE_IDS)`).

Generation never emits a reserved id: with `first_word_id` (DECODE_IDS: 999 for bert-base-uncased)
every id below it except eos ([PAD] 0, [unused0-98] 1-99, [UNK] 100, [CLS] 101, [MASK] 103,
[unused99-993] 104-998) gets -inf before the search or draw.  Caption text is decoded with
skip_special_tokens, so such an id would otherwise vanish from the text silently (an undertrained
decoder's "[PAD] [PAD] ..." reads as "").
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def banned_token_mask(vocab: int, first_word_id: int, eos_id: int, device=None) -> torch.Tensor:
    """(vocab,) bool, True for the ids generation must never emit: every id below first_word_id
    except eos_id (which ends a sequence)."""
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)
    banned[:min(max(first_word_id, 0), vocab)] = True
    if 0 <= eos_id < vocab:
        banned[eos_id] = False
    return banned


def _expand(t: torch.Tensor, k: int) -> torch.Tensor:
    # (B, ...) -> (B*k, ...), each row repeated k times consecutively
    return t.repeat_interleave(k, dim=0)


class Stepper:
    """Next-token log-probabilities for a batch of prefixes, cached or not.  `start` feeds the
    first prefix ([bos] or a prompt) and `push` commits one token a row, each returning the (N, V)
    log-probabilities of the next token; `reorder` follows the beams.  `model`: a VALOR (what is
    used: `decode`, `lm_logits` and `text.layers`).  `task_prompt` (N, P), optional: the decoder's
    prompt stream (QA's question prompt on a model.task_prompts model; None = the model's own
    caption prompt, if it has one): fed with the first cached pass (its keys stay in the cache)
    or with every uncached pass.  `first_word_id` > 0: ids below it, `eos_id` excepted, get log-probability
    -inf (`banned_token_mask`)."""

    def __init__(self, model, memory: torch.Tensor, memory_mask: Optional[torch.Tensor], use_cache: bool,
                 *, bos_id: int, mask_id: int, task_prompt: Optional[torch.Tensor] = None,
                 eos_id: int = -1, first_word_id: int = 0):
        self.model, self.memory, self.mmask, self.use_cache = model, memory, memory_mask, use_cache
        self.bos_id, self.mask_id, self.eos_id, self.first_word_id = bos_id, mask_id, eos_id, first_word_id
        self._banned: Optional[torch.Tensor] = None  # (V,) bool, built at the first peek
        self.task_prompt = task_prompt
        self.caches = [dict() for _ in model.text.layers] if use_cache else None
        self.prefix: Optional[torch.Tensor] = None  # (N, t) committed tokens

    def _prompt_kw(self) -> dict:
        return {} if self.task_prompt is None else {"prompt": self.task_prompt}

    def reorder(self, idx: torch.Tensor) -> None:
        self.prefix = self.prefix[idx]
        if self.task_prompt is not None:
            self.task_prompt = self.task_prompt[idx]
        if self.caches is not None:
            for c in self.caches:
                c["k"], c["v"] = c["k"][idx], c["v"][idx]
                # beams of one clip share its memory, so the memory K/V need no reordering

    def start(self, n: int, device, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        # prompt (n, P): `[CLS] question [SEP]` for QA; captions start from [bos] alone
        self.prefix = (torch.full((n, 1), self.bos_id, dtype=torch.long, device=device) if prompt is None
                       else prompt.to(device))
        if self.use_cache:
            # first pass: projects the memory K/V into the caches once per clip
            self.model.decode(self.prefix, None, self.memory, self.mmask, caches=self.caches, offset=0,
                              **self._prompt_kw())
        return self._peek()

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.prefix.shape[1]
        self.prefix = torch.cat([self.prefix, tokens[:, None]], 1)
        if self.use_cache:
            self.model.decode(tokens[:, None], None, None, self.mmask, caches=self.caches, offset=t)
        return self._peek()

    def _peek(self) -> torch.Tensor:
        n, t = self.prefix.shape
        mask_tok = torch.full((n, 1), self.mask_id, dtype=torch.long, device=self.prefix.device)
        if self.use_cache:
            for c in self.caches:
                c["peek"] = True
            h = self.model.decode(mask_tok, None, None, self.mmask, caches=self.caches, offset=t)
            for c in self.caches:
                c["peek"] = False
        else:
            h = self.model.decode(torch.cat([self.prefix, mask_tok], 1), None, self.memory, self.mmask,
                                  **self._prompt_kw())
        return self._logp(h)

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (N, V) from the hidden state at the read position, with
        the ids below first_word_id (but eos) banned."""
        logits = self.model.lm_logits(h[:, -1]).float()                            # (N, V)
        if self.first_word_id > 0:
            if self._banned is None:
                self._banned = banned_token_mask(logits.shape[-1], self.first_word_id, self.eos_id,
                                                 logits.device)
            # out of place: sampling runs through here with gradients on
            logits = logits.masked_fill(self._banned, float("-inf"))
        return torch.log_softmax(logits, dim=-1)


class NextTokenStepper(Stepper):
    """The stepper of a plain next-token decoder (CoAVT's LM: position t predicts token t + 1):
    the next-token distribution is read at the last committed position, so a step is one
    one-token pass and nothing is peeked (`mask_id` is unused).  Same interface as `Stepper`;
    `model` needs `decode(ids, mask, memory, memory_mask, caches=, offset=)`, `lm_logits` and
    `text.layers`."""

    def start(self, n: int, device, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.prefix = (torch.full((n, 1), self.bos_id, dtype=torch.long, device=device) if prompt is None
                       else prompt.to(device))
        h = self.model.decode(self.prefix, None, self.memory, self.mmask, caches=self.caches, offset=0)
        return self._logp(h)

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.prefix.shape[1]
        self.prefix = torch.cat([self.prefix, tokens[:, None]], 1)
        if self.use_cache:
            h = self.model.decode(tokens[:, None], None, None, self.mmask, caches=self.caches, offset=t)
        else:
            h = self.model.decode(self.prefix, None, self.memory, self.mmask)
        return self._logp(h)


@torch.no_grad()
def beam_search(model, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None,
                beam: int = 3, max_len: int = 30, length_penalty: float = 1.0,
                use_cache: bool = True, prompt: Optional[torch.Tensor] = None,
                *, bos_id: int, eos_id: int, mask_id: int, first_word_id: int = 0,
                task_prompt: Optional[torch.Tensor] = None, stepper: type = Stepper) -> List[List[int]]:
    """memory (B, Lm, C) -> best token ids (without bos/eos) for each clip.

    prompt (B, P), optional: a prefix every hypothesis of a clip starts from (QA: `[CLS] question
    [SEP]`, all rows of one length: bucket questions by length); the prefix is not returned.
    task_prompt (B, P), optional: the decoder's prompt stream (`Stepper`), e.g. QA's question on a
    model.task_prompts model (rows of one length: no padding, the cached steps attend to all of it).

    Hypothesis score = sum log p / len ** length_penalty, len counting eos; a hypothesis ends
    at eos or at max_len tokens.  beam=1 is greedy search.  first_word_id: see `Stepper`.
    `stepper`: Stepper (VALOR's masked decoder) or NextTokenStepper (a plain next-token decoder:
    CoAVT).
    """
    if beam < 1 or max_len < 1:
        raise ValueError(f"beam ({beam}) and max_len ({max_len}) must be >= 1")
    B, dev = memory.shape[0], memory.device
    mem = _expand(memory, beam)                                      # (B*K, Lm, C)
    mmask = None if memory_mask is None else _expand(memory_mask, beam)
    for name, p in (("prompt", prompt), ("task_prompt", task_prompt)):
        if p is not None and (p.dim() != 2 or p.shape[0] != B):
            raise ValueError(f"{name} must be (B={B}, P), got {tuple(p.shape)}")
    if task_prompt is not None and stepper is not Stepper:
        raise ValueError("task_prompt feeds VALOR's prompt stream: only the masked-decoder Stepper takes it")
    st = stepper(model, mem, mmask, use_cache, bos_id=bos_id, mask_id=mask_id, eos_id=eos_id,
                 first_word_id=first_word_id,
                 task_prompt=None if task_prompt is None else _expand(task_prompt.to(dev), beam))
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
        new_tok = torch.full((B, beam), eos_id, dtype=torch.long, device=dev)
        for b in range(B):
            if not alive[b]:
                continue
            k = 0
            for s, i in zip(top[b].tolist(), idx[b].tolist()):
                src, tok = divmod(i, V)
                if s == float("-inf"):
                    break
                if tok == eos_id or t == max_len - 1:
                    seq = st.prefix[b * beam + src, P:].tolist() + ([] if tok == eos_id else [tok])
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


def sample(model, memory: torch.Tensor, memory_mask: Optional[torch.Tensor], max_len: int,
           generator: Optional[torch.Generator] = None, greedy: bool = False,
           *, bos_id: int, eos_id: int, mask_id: int, first_word_id: int = 0
           ) -> Tuple[List[List[int]], torch.Tensor]:
    """memory (N, Lm, C) -> (token lists without eos, summed log-probabilities (N,) with grad).
    One sequence a row, drawn by Gumbel-max from `generator` (greedy: the argmax).  A sequence
    ends at its first eos (whose log-probability counts) or after max_len tokens.

    The cached decoder runs with gradients on: autograd flows through the cached keys/values, so
    a sample of T tokens costs 2T one-token passes rather than T full passes.  first_word_id: see
    `Stepper`."""
    N, dev = memory.shape[0], memory.device
    st = Stepper(model, memory, memory_mask, use_cache=True, bos_id=bos_id, mask_id=mask_id, eos_id=eos_id,
                 first_word_id=first_word_id)
    logp = st.start(N, dev)                                            # (N, V)
    total = torch.zeros(N, device=dev)
    alive = torch.ones(N, dtype=torch.bool, device=dev)
    seqs: List[List[int]] = [[] for _ in range(N)]
    for t in range(max_len):
        if greedy:
            tok = logp.argmax(-1)
        else:
            u = torch.rand(logp.shape, generator=generator, device="cpu").to(dev)
            tok = (logp.detach() - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(-1)   # Gumbel-max draw
        total = total + torch.where(alive, logp.gather(1, tok[:, None])[:, 0], torch.zeros_like(total))
        for i in torch.nonzero(alive & (tok != eos_id)).flatten().tolist():
            seqs[i].append(int(tok[i]))
        alive = alive & (tok != eos_id)
        if not bool(alive.any()) or t == max_len - 1:
            break
        # finished rows keep being fed (their extra tokens are ignored) so the batch stays aligned
        logp = st.push(torch.where(alive, tok, torch.full_like(tok, eos_id)))
    return seqs, total


__all__ = ["NextTokenStepper", "Stepper", "banned_token_mask", "beam_search", "sample"]
