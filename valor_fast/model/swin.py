"""Video Swin Transformer (3D shifted windows), VALOR-B's vision encoder.  Architecture only;
weights from the public Video Swin checkpoints load through `convert_swin.py`.

Layout follows VALOR's use of the backbone:
  * patch embedding: Conv3d kernel (2, 4, 4), stride (1, 4, 4), after one zero frame is appended,
    so T frames give T temporal tokens (VALOR's time_stride=1), then LayerNorm;
  * stages of shifted-window blocks (even blocks plain windows, odd blocks shifted by
    window // 2), patch merging (2x2 spatial -> 4C -> LN -> Linear 2C) between stages, a final
    LayerNorm;
  * the window is clipped to the input in every dimension it covers, and a clipped dimension is
    not shifted (VALOR-B at 4 frames x 224 px: window (4, 7, 7), temporal shift 0; last stage 7x7
    = one window, no shift at all).

Window attention goes through `valor_fast.ops.attention` with an additive bias: the relative
position bias (H, N, N), plus the shifted-window mask for shifted blocks ((nW, H, N, N), window w
of every clip sharing slice w: the batch is clips x windows with the window index fastest), so the
Triton flash kernel (or SDPA / xformers) runs every window of every clip in one call.

Outputs (B, T, h*w, C_out) after the final LayerNorm: all tokens feed the decoder; their spatial
mean per frame is VALOR's per-frame alignment feature (no temporal pooling).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .layers import Mlp

# Named architectures.  B is VALOR-B's (Video Swin-B, Kinetics-600 / ImageNet-22k weights);
# tiny is a CPU test size (two stages, small windows so clipping and shifting both happen).
SWIN_SIZES = {
    "tiny": dict(embed_dim=32, depths=(2, 2), heads=(2, 4), window=(2, 4, 4), drop_path=0.0),
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=(8, 7, 7), drop_path=0.1),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24), window=(8, 7, 7), drop_path=0.2),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=(8, 7, 7), drop_path=0.2),
}
MASK_VALUE = -100.0  # Swin's cross-region score offset: exp(-100) ~ 4e-44, i.e. never attended

Size3 = Tuple[int, int, int]


# ----------------------------------------------------------------------------------------------
# windows
# ----------------------------------------------------------------------------------------------
def clip_window(size: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> Tuple[Size3, Size3]:
    """Window and shift used on an input of `size` (D, H, W): a dimension no larger than the
    window becomes one window spanning it, unshifted."""
    ws, ss = list(window), list(shift)
    for i, n in enumerate(size):
        if n <= window[i]:
            ws[i], ss[i] = n, 0
    return tuple(ws), tuple(ss)


def window_partition(x: torch.Tensor, ws: Size3) -> torch.Tensor:
    """(B, D, H, W, C) with D, H, W multiples of ws -> (B * nW, N, C), N = prod(ws); windows of
    one clip are consecutive, ordered (d, h, w) window-major."""
    B, D, H, W, C = x.shape
    x = x.view(B, D // ws[0], ws[0], H // ws[1], ws[1], W // ws[2], ws[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws[0] * ws[1] * ws[2], C)


def window_reverse(windows: torch.Tensor, ws: Size3, B: int, D: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, N, C) -> (B, D, H, W, C)."""
    x = windows.view(B, D // ws[0], H // ws[1], W // ws[2], ws[0], ws[1], ws[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, -1)


@lru_cache(maxsize=64)
def compute_mask(D: int, H: int, W: int, ws: Size3, ss: Size3, device: torch.device) -> torch.Tensor:
    """Shifted-window mask (nW, N, N) for a padded input (D, H, W) rolled back by ss: 0 where two
    tokens of a window were neighbours before the roll, MASK_VALUE where the roll brought them
    together from opposite borders.  Along each dimension the rolled grid has three regions,
    [0, P-w), [P-w, P-s), [P-s, P) (the last holds the wrapped-around tokens); a token's label
    combines its three region indices."""
    def regions(P: int, w: int, s: int) -> torch.Tensor:
        p = torch.arange(P, device=device)
        return (p >= P - w).long() + ((p >= P - s) & (s > 0)).long()  # (P,) in {0, 1, 2}

    lab = (regions(D, ws[0], ss[0])[:, None, None] * 9 + regions(H, ws[1], ss[1])[None, :, None] * 3
           + regions(W, ws[2], ss[2])[None, None, :])                  # (D, H, W)
    lab = window_partition(lab[None, ..., None], ws).squeeze(-1)       # (nW, N)
    same = lab[:, :, None] == lab[:, None, :]                          # (nW, N, N)
    return torch.zeros(same.shape, device=device).masked_fill_(~same, MASK_VALUE)


def relative_position_index(window: Size3) -> torch.Tensor:
    """(N, N) index into the ((2wd-1)(2wh-1)(2ww-1), H) bias table: token i's offset to token j
    per dimension, shifted to be non-negative, flattened d-major."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # (3, N)
    rel = coords[:, :, None] - coords[:, None, :]                     # (3, N, N)
    wd, wh, ww = window
    return ((rel[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1) + (rel[1] + wh - 1) * (2 * ww - 1)
            + (rel[2] + ww - 1))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability p, scale the kept
    ones by 1 / (1 - p)."""
    if p <= 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
class PatchEmbed3D(nn.Module):
    """(B, T, 3, H, W) frames -> (B, T, H/4, W/4, C) tokens.  One zero frame is appended so the
    temporal kernel 2 at stride 1 yields T tokens (token t sees frames t and t+1)."""

    def __init__(self, dim: int, patch: Size3 = (2, 4, 4), in_chans: int = 3):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch, stride=(1, patch[1], patch[2]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = video.transpose(1, 2)                                      # (B, 3, T, H, W)
        H, W = x.shape[-2:]
        ph, pw = -H % self.patch[1], -W % self.patch[2]
        x = F.pad(x, (0, pw, 0, ph, 0, self.patch[0] - 1))             # + (kernel_t - 1) zero frames
        x = self.proj(x)                                               # (B, C, T, H/4, W/4)
        return self.norm(x.permute(0, 2, 3, 4, 1))                     # (B, T, h, w, C)


class WindowAttention3D(nn.Module):
    """Multi-head attention inside windows with a learned relative position bias.  Keys follow the
    public Video Swin layout: qkv (fused), proj, relative_position_bias_table."""

    def __init__(self, dim: int, heads: int, window: Size3):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by heads {heads}")
        self.heads, self.window = heads, tuple(window)
        n_rel = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel, heads))
        # derived from the window size, so not saved (a loaded checkpoint's copy is ignored)
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self, ws: Size3) -> torch.Tensor:
        """(H, N, N) relative position bias of a (possibly clipped) window ws.  A clipped window's
        tokens are the sub-grid [0, ws) of the full window, so its index is the full index on
        those rows and columns (upstream slices [:N, :N], which is the same sub-grid only when
        just the temporal dimension is clipped)."""
        idx = self.relative_position_index
        if tuple(ws) != self.window:
            sel = torch.arange(idx.shape[0], device=idx.device).view(self.window)[
                :ws[0], :ws[1], :ws[2]].reshape(-1)                    # (N,) full-window token ids
            idx = idx[sel[:, None], sel[None, :]]
        N = idx.shape[0]
        return self.relative_position_bias_table[idx.reshape(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B*nW, N, C), bias (H, N, N) or (nW, H, N, N) -> (B*nW, N, C)."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).view(Bw, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                        # (B*nW, H, N, hd) each
        out = ops.attention(q, k, v, bias=bias)                        # (B*nW, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(Bw, N, C))


class SwinBlock3D(nn.Module):
    """x + drop_path(W-MSA / SW-MSA(LN(x))); x + drop_path(MLP(LN(x))) on (B, D, H, W, C)."""

    def __init__(self, dim: int, heads: int, window: Size3, shifted: bool, drop_path: float = 0.0,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.window = tuple(window)
        self.shift = tuple(w // 2 for w in window) if shifted else (0, 0, 0)
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, heads, self.window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), "gelu")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, D, H, W, C); mask (nW, N, N) of this stage's padded, clipped window grid (used
        by shifted blocks only; see VideoSwin.stage_mask)."""
        B, D, H, W, C = x.shape
        ws, ss = clip_window((D, H, W), self.window, self.shift)
        h = self.norm1(x)
        pd, ph, pw = -D % ws[0], -H % ws[1], -W % ws[2]
        if pd or ph or pw:  # zero tokens pad the grid to whole windows (attended, as upstream)
            h = F.pad(h, (0, 0, 0, pw, 0, ph, 0, pd))
        Dp, Hp, Wp = D + pd, H + ph, W + pw
        shifted = any(ss)
        if shifted:
            h = torch.roll(h, shifts=(-ss[0], -ss[1], -ss[2]), dims=(1, 2, 3))
        win = window_partition(h, ws)                                  # (B*nW, N, C)
        bias = self.attn.position_bias(ws)                             # (H, N, N)
        if shifted:
            if mask is None:
                mask = compute_mask(Dp, Hp, Wp, ws, ss, x.device)
            bias = bias[None] + mask[:, None].to(bias.dtype)           # (nW, H, N, N)
        h = window_reverse(self.attn(win, bias), ws, B, Dp, Hp, Wp)   # (B, Dp, Hp, Wp, C)
        if shifted:
            h = torch.roll(h, shifts=ss, dims=(1, 2, 3))
        if pd or ph or pw:
            h = h[:, :D, :H, :W]
        x = x + drop_path(h, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 spatial neighbours concatenated (4C) -> LN -> Linear(4C, 2C, no bias): halves H, W."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2:4]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # neighbour order (h, w) = (0,0), (1,0), (0,1), (1,1): the public checkpoints' layout
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))                            # (B, D, H/2, W/2, 2C)


class VideoSwin(nn.Module):
    """Video Swin Transformer.  `blocks` is flat over the stages (stage i holds depths[i] of them),
    so activation checkpointing / compile / FSDP wrap each block like the ViT's."""

    def __init__(self, embed_dim: int = 128, depths: Sequence[int] = (2, 2, 18, 2),
                 heads: Sequence[int] = (4, 8, 16, 32), window: Size3 = (8, 7, 7), drop_path: float = 0.2,
                 patch: Size3 = (2, 4, 4), mlp_ratio: float = 4.0):
        super().__init__()
        if len(depths) != len(heads):
            raise ValueError(f"Swin depths {tuple(depths)} and heads {tuple(heads)} differ in length")
        self.depths, self.window = tuple(depths), tuple(window)
        self.patch_embed = PatchEmbed3D(embed_dim, tuple(patch))
        n_blocks = sum(depths)  # stochastic depth grows linearly from 0 (python floats: meta-device safe)
        dpr = [drop_path * i / max(1, n_blocks - 1) for i in range(n_blocks)]
        blocks, merges, dims = [], [], []
        for i, (depth, h) in enumerate(zip(depths, heads)):
            dim = embed_dim * 2 ** i
            for j in range(depth):
                blocks.append(SwinBlock3D(dim, h, self.window, shifted=j % 2 == 1,
                                          drop_path=dpr[len(blocks)], mlp_ratio=mlp_ratio))
            if i < len(depths) - 1:
                merges.append(PatchMerging(dim))
            dims.append(dim)
        self.blocks = nn.ModuleList(blocks)
        self.merges = nn.ModuleList(merges)
        self.out_dim = dims[-1]
        self.norm = nn.LayerNorm(self.out_dim)

    def stage_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The shifted-window mask of a stage's input x (B, D, H, W, C), or None if no dimension
        is shifted there (computed once a stage, cached by shape)."""
        size = tuple(x.shape[1:4])
        ws, ss = clip_window(size, self.window, tuple(w // 2 for w in self.window))
        if not any(ss):
            return None
        padded = tuple(n + (-n % w) for n, w in zip(size, ws))
        return compute_mask(*padded, ws, ss, x.device)

    def tokens_per_frame(self, image_size: int) -> int:
        side = -(-image_size // self.patch_embed.patch[1])
        for _ in self.merges:
            side = -(-side // 2)
        return side * side

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> tokens (B, T, h*w, C_out), h = ceil(H / 4 / 2^(stages-1))."""
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, n, 3, H, W), got {tuple(video.shape)}")
        x = self.patch_embed(video)                                    # (B, T, H/4, W/4, C)
        k = 0
        for i, depth in enumerate(self.depths):
            mask = self.stage_mask(x)
            for _ in range(depth):
                x = self.blocks[k](x, mask)
                k += 1
            if i < len(self.merges):
                x = self.merges[i](x)
        x = self.norm(x)
        B, T, h, w, C = x.shape
        return x.reshape(B, T, h * w, C)


def swin_arch(size: str, drop_path: float = -1.0) -> dict:
    """Constructor kwargs of a named Swin size; drop_path < 0 keeps the size's default."""
    if size not in SWIN_SIZES:
        raise ValueError(f"unknown Swin size {size!r}; choose one of {sorted(SWIN_SIZES)}")
    kw = dict(SWIN_SIZES[size])
    if drop_path >= 0:
        kw["drop_path"] = float(drop_path)
    return kw


__all__ = ["VideoSwin", "SwinBlock3D", "WindowAttention3D", "PatchEmbed3D", "PatchMerging", "SWIN_SIZES",
           "swin_arch", "clip_window", "window_partition", "window_reverse", "compute_mask",
           "relative_position_index", "MASK_VALUE"]
