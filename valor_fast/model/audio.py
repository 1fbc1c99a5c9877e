"""AST (Audio Spectrogram Transformer) over 512-frame fbank slices.

A slice (512 time frames x 64 mel) is read as a 1-channel image (mel, time); 16x16 patches with
stride 16 give 4 x 32 = 128 patches, plus CLS = 129 tokens (VALOR drops AST's distillation
token).  The CLS of each slice is the per-clip feature for alignment."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import PreNormBlock


class AST(nn.Module):
    def __init__(self, mel_bins: int, frames: int, dim: int, layers: int, heads: int, patch: int = 16):
        super().__init__()
        if mel_bins % patch or frames % patch:
            raise ValueError(f"fbank {frames}x{mel_bins} is not a multiple of patch {patch}")
        self.mel_bins, self.frames, self.dim = mel_bins, frames, dim
        self.grid = (mel_bins // patch, frames // patch)   # (4, 32) for 64 x 512
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(torch.zeros(1 + self.grid[0] * self.grid[1], dim))
        self.blocks = nn.ModuleList([PreNormBlock(dim, heads, 4.0, "gelu", eps=1e-12) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-12)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    @property
    def tokens_per_slice(self) -> int:
        return self.pos.shape[0]

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, S, frames, mel) -> tokens (B, S, 129, dim)."""
        if audio.dim() != 4 or audio.shape[-2:] != (self.frames, self.mel_bins):
            raise ValueError(f"audio must be (B, S, {self.frames}, {self.mel_bins}), got {tuple(audio.shape)}")
        B, S = audio.shape[:2]
        x = audio.flatten(0, 1).transpose(1, 2).unsqueeze(1)  # (B*S, 1, mel, frames)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)    # (B*S, 128, dim), mel-major grid
        cls = self.cls.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        x = self.ln(x)
        return x.view(B, S, x.shape[1], self.dim)
