"""CPU video decoding (PyAV) and VALOR's frame sampling / transforms."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DecodeError(RuntimeError):
    """A media file that cannot be decoded (missing, empty, truncated, unsupported)."""


def decode_video(path: str) -> np.ndarray:
    """All frames as uint8 (F, H, W, 3)."""
    if not os.path.exists(path):
        raise DecodeError(f"video {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise DecodeError(f"video {path!r} is empty")
    try:
        import av
        with av.open(path) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    except Exception as e:
        raise DecodeError(f"video {path!r} could not be decoded: {e}") from e
    if not frames:
        raise DecodeError(f"video {path!r} has no decodable frames")
    return np.stack(frames)


def decode_frame_folder(path: str) -> np.ndarray:
    """VALOR-style folder of pre-extracted JPEG frames (sorted by name) -> (F, H, W, 3)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise DecodeError("JPEG frame folders need Pillow (pip install pillow)") from e
    names = sorted(n for n in os.listdir(path) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise DecodeError(f"frame folder {path!r} holds no images")
    return np.stack([np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names])


def resize_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> uint8 (F, 3, size, size): short side to `size` (bilinear,
    antialiased), centre crop."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8)


def sample_indices(n_total: int, n: int, train: bool, generator: Optional[torch.Generator] = None) -> list:
    """n equal segments; a random frame of each in training, the middle one at test.  A video
    shorter than n frames repeats its last frame (VALOR pads with the last frame)."""
    if n_total <= 0:
        raise DecodeError("clip has no frames")
    out = []
    for s in range(n):
        lo = s * n_total / n
        hi = (s + 1) * n_total / n
        a, b = int(lo), max(int(lo) + 1, int(hi))
        if train:
            i = int(torch.randint(a, b, (), generator=generator))
        else:
            i = (a + b - 1) // 2
        out.append(min(i, n_total - 1))
    return out


def normalize(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (frames_u8.float() / 255.0 - mean) / std
