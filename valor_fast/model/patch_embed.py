"""Patch tokenisers for the family models (CoAVT, VLSA): frames and fbank slices to token
sequences, with learned spatial / spectral position tables, a time (frame or slice) table and an
optional [MASK] embedding for masked modelling.  Also the matching `patchify` functions that cut
the raw input into the same patches in the same order, for pixel / fbank reconstruction targets.

Kept apart from layers.py (owned by another branch) so the lead can merge them there later; the
VALOR encoders (vision.py, audio.py) carry their own patch convolutions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def patchify_video(video: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, n, 3, H, W) -> (B, n * (H/p) * (W/p), 3 * p * p): per frame row-major over the patch
    grid (the order of Conv2d(stride=p).flatten(2)); a patch is (channel, row, col) flattened."""
    B, n, c, H, W = video.shape
    h, w = H // patch, W // patch
    x = video.reshape(B, n, c, h, patch, w, patch)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, n * h * w, c * patch * patch)


def patchify_audio(audio: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, S, frames, mel) -> (B, S * (mel/p) * (frames/p), p * p): each slice read as a (mel,
    time) image, mel-major like AST's patch grid; a patch is (mel, time) flattened."""
    B, S, T, M = audio.shape
    x = audio.transpose(2, 3).reshape(B, S, M // patch, patch, T // patch, patch)
    return x.permute(0, 1, 2, 4, 3, 5).reshape(B, S * (M // patch) * (T // patch), patch * patch)


def _apply_mask(x: torch.Tensor, mask: Optional[torch.Tensor], token: Optional[nn.Parameter]) -> torch.Tensor:
    # x (B, N, C); mask (B, N) bool True = masked: replaced by the learned [MASK] embedding
    if mask is None:
        return x
    if token is None:
        raise ValueError("this patch embedder was built without a [MASK] token (masked=False)")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"patch mask must be {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    return torch.where(mask[..., None], token.to(x.dtype), x)


class VideoPatchEmbed(nn.Module):
    """Frames -> tokens: Conv2d patch projection, + spatial position (per patch of a frame)
    + frame (time) embedding.  (B, n, 3, H, W) -> (B, n * P, dim), P = (H/p)^2."""

    def __init__(self, image_size: int, patch: int, dim: int, max_frames: int, masked: bool = False):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.image_size, self.patch = image_size, patch
        self.per_frame = (image_size // patch) ** 2
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(self.per_frame, dim))
        self.time = nn.Embedding(max_frames, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim)) if masked else None
        nn.init.normal_(self.pos, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, n, 3, H, W), got {tuple(video.shape)}")
        B, n = video.shape[:2]
        if tuple(video.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"frames are {tuple(video.shape[-2:])}, the model expects "
                             f"{self.image_size}x{self.image_size}")
        if n > self.time.num_embeddings:
            raise ValueError(f"{n} frames exceed the {self.time.num_embeddings} frame embeddings")
        x = self.proj(video.flatten(0, 1)).flatten(2).transpose(1, 2)   # (B*n, P, dim)
        x = x.reshape(B, n * self.per_frame, -1)
        x = _apply_mask(x, mask, self.mask_token)
        # (n, P, dim) position + time, added after the [MASK] swap: a masked patch keeps its place
        where = self.pos[None] + self.time.weight[:n, None]
        return x + where.reshape(n * self.per_frame, -1).to(x.dtype)


class AudioPatchEmbed(nn.Module):
    """Fbank slices -> tokens: Conv2d(1, dim, p, p) over the (mel, time) image of each slice,
    + spectral-temporal position within a slice + slice embedding.
    (B, S, frames, mel) -> (B, S * Pa, dim), Pa = (mel/p) * (frames/p)."""

    def __init__(self, mel_bins: int, frames: int, patch: int, dim: int, max_slices: int,
                 masked: bool = False):
        super().__init__()
        if mel_bins % patch or frames % patch:
            raise ValueError(f"fbank {frames}x{mel_bins} is not a multiple of patch {patch}")
        self.mel_bins, self.frames, self.patch = mel_bins, frames, patch
        self.per_slice = (mel_bins // patch) * (frames // patch)
        self.proj = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(self.per_slice, dim))
        self.time = nn.Embedding(max_slices, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim)) if masked else None
        nn.init.normal_(self.pos, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, audio: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if audio.dim() != 4 or tuple(audio.shape[-2:]) != (self.frames, self.mel_bins):
            raise ValueError(f"audio must be (B, S, {self.frames}, {self.mel_bins}), got {tuple(audio.shape)}")
        B, S = audio.shape[:2]
        if S > self.time.num_embeddings:
            raise ValueError(f"{S} audio slices exceed the {self.time.num_embeddings} slice embeddings")
        x = audio.flatten(0, 1).transpose(1, 2).unsqueeze(1)          # (B*S, 1, mel, frames)
        x = self.proj(x).flatten(2).transpose(1, 2).reshape(B, S * self.per_slice, -1)
        x = _apply_mask(x, mask, self.mask_token)
        where = self.pos[None] + self.time.weight[:S, None]
        return x + where.reshape(S * self.per_slice, -1).to(x.dtype)
