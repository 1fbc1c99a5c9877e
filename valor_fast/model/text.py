"""BERT text encoder; the same layers serve as VALOR's causal multimodal decoder."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import fused as fops
from .layers import BertLayer


class BertEmbeddings(nn.Module):
    """word + position + token type (row 0: one segment), LayerNorm.  With `prompts`, a learned
    row (upstream's `prompt_embedding`) replaces the token type for task-prompt tokens."""

    def __init__(self, vocab: int, dim: int, max_pos: int = 512, type_vocab: int = 2, eps: float = 1e-12,
                 prompts: bool = False):
        super().__init__()
        self.word = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Embedding(max_pos, dim)
        self.token_type = nn.Embedding(type_vocab, dim)
        self.prompt = nn.Embedding(1, dim) if prompts else None
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids: torch.Tensor, offset: int = 0, prompt: bool = False) -> torch.Tensor:
        L = ids.shape[1]
        if offset + L > self.position.num_embeddings:
            raise ValueError(f"text of {offset + L} tokens exceeds the {self.position.num_embeddings} positions")
        if prompt and self.prompt is None:
            raise ValueError("task-prompt tokens need a model built with model.task_prompts=true")
        pos = torch.arange(offset, offset + L, device=ids.device)
        # token type 0 everywhere (single segment): add row 0 of the table; a prompt its own row
        kind = self.prompt.weight[0] if prompt else self.token_type.weight[0]
        x = self.word(ids) + self.position(pos)[None] + kind
        return self.ln(x)


# additive score offset of a disallowed (query, key) pair in the prompted decoder (BERT's -10000:
# exp(-10000) is 0 in every float type, so it equals leaving the key out)
_NEG = -10000.0


def prompt_decoder_bias(L: int, P: int, heads: int, dtype, device) -> torch.Tensor:
    """(heads, L+P, L+P) self-attention bias of the causal decoder over [text (L); prompt (P)]:
    text row i sees text columns <= i and the whole prompt; prompt rows see only the prompt
    (upstream model/bert.py:869-885)."""
    allow = torch.ones(L + P, L + P, dtype=torch.bool, device=device)
    allow[:L, :L] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    allow[L:, :L] = False
    bias = torch.zeros(L + P, L + P, dtype=dtype, device=device).masked_fill(~allow, _NEG)
    return bias.expand(heads, L + P, L + P)


class BertLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> vocab projection tied to the word embeddings."""

    def __init__(self, dim: int, vocab: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        if fops.fused_enabled():
            g = fops.bias_gelu(F.linear(h, self.dense.weight), self.dense.bias, "none")
            return fops.add_layer_norm(g, None, self.ln.weight, self.ln.bias, self.ln.eps)[0]
        return self.ln(F.gelu(self.dense(h)))

    def forward(self, h: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(h), word_weight, self.bias)


class BertText(nn.Module):
    """Bidirectional encoder (`encode`) and causal decoder with cross-attention (`decode`).  Both
    take an optional task prompt (N, P) ids (0 = padding): the sequence is then [text ; prompt]
    with the prompt at positions 0.. and the prompt embedding row, and the text rows come back."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ffn: int, max_pos: int = 512,
                 prompts: bool = False):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.embeddings = BertEmbeddings(vocab, dim, max_pos, prompts=prompts)
        self.layers = nn.ModuleList([BertLayer(dim, heads, ffn, cross=True) for _ in range(layers)])
        self.lm_head = BertLMHead(dim, vocab)

    def _append_prompt(self, x: torch.Tensor, mask: Optional[torch.Tensor], prompt: torch.Tensor):
        """(embedded text (N, L, d), its key mask) -> ([text ; prompt] (N, L+P, d), key mask (N, L+P))."""
        if prompt.dim() != 2 or prompt.shape[0] != x.shape[0]:
            raise ValueError(f"prompt must be (N={x.shape[0]}, P) ids, got {tuple(prompt.shape)}")
        prompt = prompt.to(x.device)
        p = self.embeddings(prompt, prompt=True)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return torch.cat([x, p.to(x.dtype)], 1), torch.cat([mask, prompt != 0], 1)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ids (B, L), mask (B, L) bool -> (B, L, dim); `prompt` (B, P) takes part bidirectionally."""
        x = self.embeddings(ids)
        L = ids.shape[1]
        if prompt is not None:
            x, mask = self._append_prompt(x, mask, prompt)
        for layer in self.layers:
            x = layer(x, key_padding_mask=mask)
        return x[:, :L]

    def decode(self, ids: torch.Tensor, mask: Optional[torch.Tensor], memory: Optional[torch.Tensor],
               memory_mask: Optional[torch.Tensor], memory_repeat: int = 1,
               caches: Optional[List[dict]] = None, offset: int = 0,
               prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal pass: ids (N, L) -> hidden (N, L, dim), cross-attending to memory (B, Lm, dim)
        with N = memory_repeat * B.  `caches` (one dict per layer) turns on incremental decoding:
        after the first call, ids hold one new token at position `offset` and memory may be None
        (its K/V are cached).  `prompt` (N, P), first / uncached calls only: the task prompt
        (its keys are cached with the text's; it never sees the text, so they stay exact)."""
        x = self.embeddings(ids, offset=offset)
        # the first (prompt) pass is causal; later cached passes feed one new token that may see
        # every cached key, so no mask is needed then
        incremental = caches is not None and "k" in caches[0]
        if incremental and ids.shape[1] != 1:
            raise ValueError(f"cached decoding takes one new token a step, got {ids.shape[1]}")
        L, bias = ids.shape[1], None
        if prompt is not None:
            if incremental:
                raise ValueError("a task prompt goes with the first decoding call (its keys are cached)")
            x, mask = self._append_prompt(x, mask, prompt)
            bias = prompt_decoder_bias(L, prompt.shape[1], self.heads, x.dtype, x.device)
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            x = layer(x, key_padding_mask=mask, causal=not incremental and bias is None, memory=memory,
                      memory_mask=memory_mask, memory_repeat=memory_repeat, cache=cache, bias=bias)
        return x[:, :L]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h, self.embeddings.word.weight)

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-row cross-entropy (N,) fp32 of the LM head at hidden rows h (N, C), without the
        (N, V) logits: the vocabulary is walked in chunks (ops.fused.lm_head_cross_entropy)."""
        return fops.lm_head_cross_entropy(self.lm_head.transform(h), self.embeddings.word.weight,
                                          self.lm_head.bias, labels, label_smoothing, reduction="none")
