"""CLIP ViT applied per frame.  All tokens are kept (after the final LayerNorm) for the
decoder; the CLS token of each frame is the per-frame feature for alignment."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import PreNormBlock


class ClipViT(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int, layers: int, heads: int, pos_std: float = 0.01):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.image_size, self.patch, self.dim = image_size, patch, dim
        n = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch, bias=False)
        self.cls = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(torch.zeros(n + 1, dim))
        self.ln_pre = nn.LayerNorm(dim, eps=1e-5)
        self.blocks = nn.ModuleList([PreNormBlock(dim, heads, 4.0, "quick_gelu", eps=1e-5) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(dim, eps=1e-5)
        nn.init.normal_(self.cls, std=dim ** -0.5)
        # pos_std: ModelConfig.vision_pos_std (why the tiny model starts it at 0.5 is there)
        nn.init.normal_(self.pos, std=pos_std)

    @property
    def tokens_per_frame(self) -> int:
        return self.pos.shape[0]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, n, 3, H, W) -> tokens (B, n, 1 + (H/p)(W/p), dim)."""
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, n, 3, H, W), got {tuple(video.shape)}")
        B, n = video.shape[:2]
        if video.shape[-1] != self.image_size or video.shape[-2] != self.image_size:
            raise ValueError(f"frames are {tuple(video.shape[-2:])}, the encoder expects "
                             f"{self.image_size}x{self.image_size}")
        x = self.patch_embed(video.flatten(0, 1))          # (B*n, dim, h, w)
        x = x.flatten(2).transpose(1, 2)                   # (B*n, h*w, dim)
        cls = self.cls.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos.to(x.dtype)
        x = self.ln_pre(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_post(x)
        return x.view(B, n, x.shape[1], self.dim)
