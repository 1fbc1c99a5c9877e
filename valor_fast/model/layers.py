"""Transformer building blocks shared by the encoders and the decoder.

Every attention goes through `valor_fast.ops.attention`, so the backend dispatcher (flash-attn,
xformers, SDPA, our Triton kernel, eager math) serves the whole model.  Residual-add + LayerNorm
and bias + GELU go through `valor_fast.ops.fused` (Triton on CUDA, the eager reference on the
CPU); with the "eager" fused backend forced (the unfused baseline of bench/train_step.py) the
blocks take their plain nn.Linear / F.gelu / nn.LayerNorm path instead.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops import fused as fops


def _ln(x: torch.Tensor, ln: nn.LayerNorm, residual: Optional[torch.Tensor] = None):
    """(LayerNorm(x + residual), x + residual) in one fused pass (one read of x and residual,
    one write of each output, instead of add -> write -> read -> normalise)."""
    return fops.add_layer_norm(x, residual, ln.weight, ln.bias, ln.eps)


def _gelu_linear(x: torch.Tensor, fc: nn.Linear, act: str) -> torch.Tensor:
    """act(fc(x)) with the bias add fused into the activation: the matmul runs bias-free and the
    (N, hidden) pre-activation is read once by the bias+GELU kernel."""
    return fops.bias_gelu(F.linear(x, fc.weight), fc.bias, "quick" if act == "quick_gelu" else "none")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, L, H*Dh) -> (B, H, L, Dh)
    B, L, C = x.shape
    return x.view(B, L, heads, C // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (B, H, L, Dh) -> (B, L, H*Dh)
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (BERT / AST / CLIP weight layouts
    all map onto this).  `kv` switches it to cross-attention over another sequence."""

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(kv_dim, dim, bias=bias)
        self.v = nn.Linear(kv_dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias)

    def project_kv(self, kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """K/V heads of a memory sequence: (B, Lk, C) -> 2 x (B, H, Lk, Dh).  Exposed so the
        decoder can compute video/audio K/V once and reuse it across groups and decode steps."""
        return _split_heads(self.k(kv), self.heads), _split_heads(self.v(kv), self.heads)

    def forward(self, x: torch.Tensor, kv: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                kv_heads: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[dict] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = _split_heads(self.q(x), self.heads)  # (B, H, Lq, Dh)
        if kv_heads is not None:
            k, v = kv_heads
        else:
            k, v = self.project_kv(x if kv is None else kv)
        if cache is not None:
            # incremental self-attention: prepend the cached keys/values; store the result unless
            # this is a peek (the trailing [MASK] of captioning is re-fed at every step)
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            if not cache.get("peek", False):
                cache["k"], cache["v"] = k, v
        out = ops.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, bias=bias)
        return self.o(_merge_heads(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act

    def forward(self, x):
        if fops.fused_enabled():
            return self.fc2(_gelu_linear(x, self.fc1, self.act))
        h = self.fc1(x)
        if self.act == "quick_gelu":  # CLIP's x * sigmoid(1.702 x)
            h = h * torch.sigmoid(1.702 * h)
        else:
            h = F.gelu(h)
        return self.fc2(h)


class PreNormBlock(nn.Module):
    """ViT / AST block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)

    def forward(self, x, key_padding_mask=None):
        if not fops.fused_enabled():
            x = x + self.attn(self.ln1(x), key_padding_mask=key_padding_mask)
            return x + self.mlp(self.ln2(x))
        h, _ = _ln(x, self.ln1)
        # h = LN2(x + attn), x = x + attn: the residual add and the norm in one pass; the stream
        # x keeps its own dtype (fp32 under autocast), h takes the attention output's (bf16)
        h, x = _ln(self.attn(h, key_padding_mask=key_padding_mask), self.ln2, x)
        return x + self.mlp(h)


class BertLayer(nn.Module):
    """Post-LN BERT layer.  As an encoder: self-attn -> FFN.  As VALOR's decoder the same
    weights run with a causal mask and an extra cross-attention block between self-attention
    and the FFN (self-attn -> cross-attn -> FFN), attending to video+audio tokens."""

    def __init__(self, dim: int, heads: int, ffn: int, cross: bool = True, eps: float = 1e-12):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ln_attn = nn.LayerNorm(dim, eps=eps)
        self.cross = Attention(dim, heads) if cross else None
        self.ln_cross = nn.LayerNorm(dim, eps=eps) if cross else None
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.ln_ffn = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, key_padding_mask=None, causal=False, memory=None, memory_mask=None,
                memory_repeat: int = 1, cache: Optional[dict] = None, bias: Optional[torch.Tensor] = None):
        """x (N, L, C).  memory (B, Lm, C) with N = memory_repeat * B: its cross-attention K/V are
        projected once and tiled over the `memory_repeat` stacked groups (the three MGC groups
        share one pass); with a `cache` they are projected at the first step only.  `bias`
        (H, L, L): an additive self-attention score bias (the prompted decoder's mask)."""
        fused = fops.fused_enabled()
        a = self.attn(x, key_padding_mask=key_padding_mask, causal=causal, cache=cache, bias=bias)
        x = _ln(a, self.ln_attn, x)[0] if fused else self.ln_attn(x + a)
        if memory is not None or (cache is not None and "mk" in cache):
            if self.cross is None:
                raise RuntimeError("this BertLayer was built without cross-attention")
            if cache is not None and "mk" in cache:
                kv = cache["mk"], cache["mv"]
            else:
                kv = self.cross.project_kv(memory)                     # 2 x (B, H, Lm, Dh)
                if memory_repeat > 1:
                    kv = tuple(t.repeat(memory_repeat, 1, 1, 1) for t in kv)  # (G*B, H, Lm, Dh)
                if cache is not None:
                    cache["mk"], cache["mv"] = kv
            c = self.cross(x, kv_heads=kv, key_padding_mask=memory_mask)
            x = _ln(c, self.ln_cross, x)[0] if fused else self.ln_cross(x + c)
        if fused:
            return _ln(self.fc2(_gelu_linear(x, self.fc1, "gelu")), self.ln_ffn, x)[0]
        return self.ln_ffn(x + self.fc2(F.gelu(self.fc1(x))))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT-style init: normal(0, 0.02) for linear/embedding, LN to (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
