"""VLSA (arXiv 2405.07202, "Unified Video-Language Pre-training with Synchronized Audio"): one
transformer, its weights shared by the three modalities, over video patches, text tokens and
spectrogram patches.  Architecture only; the losses live in valor_fast.tasks.vlsa, and what the
paper fixes versus what we chose is in docs/family.md.

    video (B, n, 3, H, W) -> VideoPatchEmbed (its own projection, position, frame time)  --+
    text ids (B, L)       -> word + position embeddings (BERT-style table)               --+-> [global
    audio (B, S, T, mel)  -> AudioPatchEmbed (its own projection, position, slice time)  --+   tokens;
    patches] + modality embedding -> the shared pre-norm transformer -> (global tokens, patches).

Each modality runs the shared transformer on its own sequence (so a modality's global tokens
see that modality only and retrieval encodes each side once); masked modelling swaps masked
video / audio patches for a learned [MASK] embedding and masked words for [MASK] ids, and the
heads reconstruct pixels, fbank values and token ids at the masked places.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import fused as fops
from .args import VLSA_SIZES, VLSAArgs, vlsa_args  # noqa: F401  (the args live in model/args.py)
from .layers import PreNormBlock, _gelu_linear, _ln, init_weights
from .patch_embed import AudioPatchEmbed, VideoPatchEmbed
from .text import BertEmbeddings, BertLMHead

MODALITIES = ("video", "text", "audio")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # features and logits in fp32 at least (bf16 under autocast); float64 stays float64 (tests)
    return x.to(torch.promote_types(x.dtype, torch.float32))


class MatchHead(nn.Module):
    """Binary matching logit of a (global audio, global video|text) pair: fc(2C -> C) -> GELU ->
    fc(C -> 1), the bias + GELU fused."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, dim)
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([a, x], -1)
        h = _gelu_linear(h, self.fc1, "gelu") if fops.fused_enabled() else F.gelu(self.fc1(h))
        return _fp32(self.fc2(h).squeeze(-1))


class VLSA(nn.Module):
    def __init__(self, args: VLSAArgs):
        super().__init__()
        self.args = a = args
        C, D = a.width, a.contra_dim
        self.video_embed = VideoPatchEmbed(a.image_size, a.patch_size, C, a.max_frames, masked=True)
        self.audio_embed = AudioPatchEmbed(a.audio_mel_bins, a.audio_frames, a.audio_patch, C, a.max_slices,
                                           masked=True)
        self.text_embed = BertEmbeddings(a.vocab_size, C, a.max_positions)
        self.modality = nn.Embedding(len(MODALITIES), C)
        self.global_tokens = nn.Parameter(torch.zeros(len(MODALITIES), a.global_tokens, C))
        self.blocks = nn.ModuleList([PreNormBlock(C, a.heads, a.mlp_ratio) for _ in range(a.layers)])
        self.norm = nn.LayerNorm(C, eps=1e-6)
        self.video_head = nn.Linear(C, 3 * a.patch_size ** 2)
        self.audio_head = nn.Linear(C, a.audio_patch ** 2)
        self.text_head = BertLMHead(C, a.vocab_size)          # tied to the word embeddings
        self.proj = nn.ModuleDict({m: nn.Linear(C, D, bias=False) for m in MODALITIES})
        self.gam = nn.ModuleDict({m: MatchHead(C) for m in ("video", "text")})
        self.temperature = nn.Parameter(torch.tensor([float(a.temperature)]))
        init_weights(self)
        nn.init.normal_(self.global_tokens, std=0.02)

    # ---------------- the shared transformer ----------------
    def encode(self, modality: str, x: torch.Tensor,
               key_padding_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, C) of one modality -> (global states (B, G, C), token states (B, N, C))."""
        i = MODALITIES.index(modality)
        B, G = x.shape[0], self.args.global_tokens
        glob = self.global_tokens[i].to(x.dtype).expand(B, G, -1)
        h = torch.cat([glob, x], 1) + self.modality.weight[i].to(x.dtype)
        kpm = None
        if key_padding_mask is not None:
            kpm = torch.cat([torch.ones(B, G, dtype=torch.bool, device=x.device), key_padding_mask], 1)
        for blk in self.blocks:
            h = blk(h, key_padding_mask=kpm)
        h = _ln(h, self.norm)[0] if fops.fused_enabled() else self.norm(h)
        return h[:, :G], h[:, G:]

    def encode_video(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """mask (B, n*P) bool True = masked patch (replaced by [MASK])."""
        return self.encode("video", self.video_embed(video, mask))

    def encode_audio(self, audio: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """mask (B, S*Pa) bool True = masked patch."""
        return self.encode("audio", self.audio_embed(audio, mask))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor):
        """ids (B, L) (masked words already swapped for [MASK] ids), mask (B, L) True = real."""
        return self.encode("text", self.text_embed(ids), mask)

    # ---------------- heads ----------------
    def pooled(self, glob: torch.Tensor, tokens: torch.Tensor,
               key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A modality's clip-level state (B, C) from its global (B, G, C) and token (B, N, C)
        states (model.args.pool)."""
        if self.args.pool == "global":
            return glob.mean(1)
        if self.args.pool != "mean":
            raise ValueError(f"VLSA pool must be 'global' or 'mean', got {self.args.pool!r}")
        w = torch.ones(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
        if key_padding_mask is not None:
            w = w * key_padding_mask.to(tokens.dtype)
        total = glob.sum(1) + (tokens * w[..., None]).sum(1)
        return total / (glob.shape[1] + w.sum(1, keepdim=True))

    def global_feature(self, modality: str, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) clip-level state -> (B, D) L2-normalised contrastive feature."""
        return F.normalize(_fp32(self.proj[modality](pooled)), dim=-1)

    def gam_logits(self, partner: str, audio_glob: torch.Tensor, other_glob: torch.Tensor) -> torch.Tensor:
        """Global audio matching: (N, C) audio clip-level states vs (N, C) video|text ones -> (N,)."""
        return self.gam[partner](audio_glob, other_glob)

    def text_mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-row cross-entropy (N,) of the tied LM head at hidden rows (N, C), fused and chunked."""
        return fops.lm_head_cross_entropy(self.text_head.transform(hidden), self.text_embed.word.weight,
                                          self.text_head.bias, labels, reduction="none")

    def temp(self) -> torch.Tensor:
        return self.temperature.clamp(min=1e-3, max=1.0).squeeze(0)

    def transformer_blocks(self) -> List[nn.ModuleList]:
        """The per-block ModuleLists activation checkpointing, compile and FSDP wrap."""
        return [self.blocks]


def build_vlsa(args: VLSAArgs) -> VLSA:
    return VLSA(args)


def count_parameters(model: VLSA) -> Dict[str, int]:
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = {"total": n(model), "transformer": n(model.blocks) + n(model.norm),
           "embeddings": n(model.video_embed) + n(model.audio_embed) + n(model.text_embed)
           + n(model.modality) + model.global_tokens.numel()}
    out["heads"] = out["total"] - out["transformer"] - out["embeddings"]
    return out
