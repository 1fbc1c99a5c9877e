"""BERT text encoder; the same layers serve as VALOR's causal multimodal decoder."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import fused as fops
from .layers import BertLayer


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, max_pos: int = 512, type_vocab: int = 2, eps: float = 1e-12):
        super().__init__()
        self.word = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Embedding(max_pos, dim)
        self.token_type = nn.Embedding(type_vocab, dim)
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        L = ids.shape[1]
        if offset + L > self.position.num_embeddings:
            raise ValueError(f"text of {offset + L} tokens exceeds the {self.position.num_embeddings} positions")
        pos = torch.arange(offset, offset + L, device=ids.device)
        # token type 0 everywhere (single segment): add row 0 of the table
        x = self.word(ids) + self.position(pos)[None] + self.token_type.weight[0]
        return self.ln(x)


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
    """Bidirectional encoder (`encode`) and causal decoder with cross-attention (`decode`)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ffn: int, max_pos: int = 512):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.embeddings = BertEmbeddings(vocab, dim, max_pos)
        self.layers = nn.ModuleList([BertLayer(dim, heads, ffn, cross=True) for _ in range(layers)])
        self.lm_head = BertLMHead(dim, vocab)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L), mask (B, L) bool -> (B, L, dim)."""
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, key_padding_mask=mask)
        return x

    def decode(self, ids: torch.Tensor, mask: Optional[torch.Tensor], memory: Optional[torch.Tensor],
               memory_mask: Optional[torch.Tensor], memory_repeat: int = 1,
               caches: Optional[List[dict]] = None, offset: int = 0) -> torch.Tensor:
        """Causal pass: ids (N, L) -> hidden (N, L, dim), cross-attending to memory (B, Lm, dim)
        with N = memory_repeat * B.  `caches` (one dict per layer) turns on incremental decoding:
        after the first call, ids hold one new token at position `offset` and memory may be None
        (its K/V are cached)."""
        x = self.embeddings(ids, offset=offset)
        # the first (prompt) pass is causal; later cached passes feed one new token that may see
        # every cached key, so no mask is needed then
        incremental = caches is not None and "k" in caches[0]
        if incremental and ids.shape[1] != 1:
            raise ValueError(f"cached decoding takes one new token a step, got {ids.shape[1]}")
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            x = layer(x, key_padding_mask=mask, causal=not incremental, memory=memory,
                      memory_mask=memory_mask, memory_repeat=memory_repeat, cache=cache)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h, self.embeddings.word.weight)

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-row cross-entropy (N,) fp32 of the LM head at hidden rows h (N, C), without the
        (N, V) logits: the vocabulary is walked in chunks (ops.fused.lm_head_cross_entropy)."""
        return fops.lm_head_cross_entropy(self.lm_head.transform(h), self.embeddings.word.weight,
                                          self.lm_head.bias, labels, label_smoothing, reduction="none")
