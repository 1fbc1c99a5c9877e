"""CPU video decoding (PyAV) and VALOR's frame sampling / transforms."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DecodeError  # noqa: F401  (raised here; importers may name it video.DecodeError)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# A file is "truncated" when it decodes to fewer than this share of the frames its container
# header promises (and at least 2 fewer): the tail is gone, and its audio no longer lines up.
TRUNCATED_SHARE = 0.75


def expected_frames(container, stream) -> Optional[float]:
    """Frames the container header promises: the stream's frame count (MP4), else its duration x
    average rate (WebM/Matroska store no count); None when the header has neither."""
    if stream.frames:
        return float(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration is not None and stream.time_base is not None and rate:
        return float(stream.duration * stream.time_base * rate)
    if container.duration and rate:
        return float(container.duration / 1_000_000 * rate)
    return None


def check_truncated(path: str, got: int, expected: Optional[float]) -> None:
    if expected is not None and got < TRUNCATED_SHARE * expected and expected - got >= 2:
        raise DecodeError(f"video {path!r} is truncated: {got} of the ~{expected:.0f} frames its header "
                          f"promises")


def yuv420_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, full_range: bool = False,
                  bt709: bool = False) -> np.ndarray:
    """Planar 4:2:0 -> RGB uint8.  y (F, H, W), u/v (F, ceil(H/2), ceil(W/2)) uint8 -> (F, H, W, 3).

    Chroma is upsampled bilinearly (centre-sited) and converted with BT.601 (or BT.709) limited
    (or full) range, as DALI's and NVDEC's decoders and libjpeg's fancy upsampling do: the CPU
    and DALI paths then agree within ~1 level, where swscale's default (nearest chroma) differs
    by up to ~45 levels along colour edges."""
    Y = torch.from_numpy(y).float()
    F_, H, W = Y.shape
    uv = torch.from_numpy(np.stack([u, v], 1)).float()                          # (F, 2, h, w)
    uv = F.interpolate(uv, scale_factor=2, mode="bilinear", align_corners=False)[..., :H, :W]
    U, V = uv[:, 0] - 128.0, uv[:, 1] - 128.0
    if not full_range:
        Y = (Y - 16.0) * (255.0 / 219.0)
        U, V = U * (255.0 / 224.0), V * (255.0 / 224.0)
    kr, kb = (0.2126, 0.0722) if bt709 else (0.299, 0.114)
    kg = 1.0 - kr - kb
    r = Y + 2 * (1 - kr) * V
    b = Y + 2 * (1 - kb) * U
    g = (Y - kr * r - kb * b) / kg
    return torch.stack([r, g, b], -1).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _planes(frame):
    """(y, u, v) uint8 arrays of a yuv420p/yuvj420p PyAV frame, line padding removed."""
    out = []
    for k, pl in enumerate(frame.planes):
        h = frame.height if k == 0 else (frame.height + 1) // 2
        w = frame.width if k == 0 else (frame.width + 1) // 2
        out.append(np.frombuffer(pl, np.uint8).reshape(h, pl.line_size)[:, :w])
    return out


def frames_to_rgb(frames: list) -> np.ndarray:
    """PyAV video frames -> (F, H, W, 3) uint8; 4:2:0 through `yuv420_to_rgb`, other pixel
    formats through swscale."""
    if frames and all(f.format.name in ("yuv420p", "yuvj420p") for f in frames):
        ys, us, vs = zip(*(_planes(f) for f in frames))
        f0 = frames[0]
        full = f0.format.name == "yuvj420p" or getattr(f0, "color_range", 0) == 2
        bt709 = getattr(f0, "colorspace", 2) == 1
        return yuv420_to_rgb(np.stack(ys), np.stack(us), np.stack(vs), full_range=full, bt709=bt709)
    return np.stack([f.to_ndarray(format="rgb24") for f in frames])


@contextlib.contextmanager
def open_video(path: str):
    """(container, first video stream, frames the header promises) of a file or shard member;
    DecodeError naming the file when it is missing, empty or has no video stream."""
    from .shards import media_open, require_media
    require_media(path, "video")
    import av
    with av.open(media_open(path)) as c:
        if not c.streams.video:
            raise DecodeError(f"{path!r} has no video stream")
        st = c.streams.video[0]
        yield c, st, expected_frames(c, st)


def decode_video(path: str, indices: Optional[list] = None) -> np.ndarray:
    """All frames as uint8 (F, H, W, 3), or only those at `indices` (in that order, repeats
    allowed): decoding stops after the last one asked and only those are converted to RGB, which
    for 4 of a 10 s clip's 250 frames is most of the cost.  Raises DecodeError (naming the file)
    for a missing, empty, undecodable or truncated file."""
    try:
        with open_video(path) as (c, st, expected):
            if indices is None:
                frames = frames_to_rgb(list(c.decode(st)))
            else:
                want, last, kept, n = set(indices), max(indices), {}, 0
                for fr in c.decode(st):
                    if n in want:
                        kept[n] = fr
                    n += 1
                    if n > last:
                        break
                if len(kept) < len(want):
                    raise DecodeError(f"video {path!r} ended after {n} frames; frame {max(want - set(kept))} "
                                      f"was asked (truncated)")
                order = sorted(kept)
                rgb = frames_to_rgb([kept[k] for k in order])
                return rgb[[order.index(i) for i in indices]]
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"video {path!r} could not be decoded: {type(e).__name__}: {e}") from e
    if len(frames) == 0:
        raise DecodeError(f"video {path!r} has no decodable frames")
    check_truncated(path, len(frames), expected)
    return frames


IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def list_frame_folder(path: str) -> list:
    """Sorted image file names of a VALOR-style frame folder."""
    if not os.path.isdir(path):
        raise DecodeError(f"frame folder {path!r} does not exist")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTS))
    if not names:
        raise DecodeError(f"frame folder {path!r} holds no images")
    return names


def decode_image(path: str) -> np.ndarray:
    """One JPEG/PNG -> (H, W, 3) uint8 (Pillow if installed, else PyAV with the same 4:2:0
    conversion as videos)."""
    if os.path.getsize(path) == 0:
        raise DecodeError(f"image {path!r} is empty (0 bytes)")
    try:
        try:
            from PIL import Image
        except ImportError:
            import av
            with av.open(path) as c:
                return frames_to_rgb([next(c.decode(video=0))])[0]
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"image {path!r} could not be decoded: {type(e).__name__}: {e}") from e


def image_size(path: str) -> Tuple[int, int]:
    """(height, width) of a JPEG/PNG from its header (Pillow, else PyAV), without decoding pixels."""
    try:
        try:
            from PIL import Image
        except ImportError:
            import av
            with av.open(path) as c:
                cc = c.streams.video[0].codec_context
                return int(cc.height), int(cc.width)
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as e:
        raise DecodeError(f"image {path!r} could not be read: {type(e).__name__}: {e}") from e


def decode_frame_folder(path: str, indices: Optional[list] = None) -> np.ndarray:
    """VALOR-style folder of pre-extracted JPEG frames (sorted by name) -> (F, H, W, 3); only
    the frames at `indices` when given."""
    names = list_frame_folder(path)
    pick = names if indices is None else [names[i] for i in indices]
    return np.stack([decode_image(os.path.join(path, n)) for n in pick])


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
    mean = torch.tensor(CLIP_MEAN, device=frames_u8.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames_u8.device).view(3, 1, 1)
    return (frames_u8.float() / 255.0 - mean) / std


def crop_window(generator: Optional[torch.Generator], scale_min: float) -> Tuple[float, float, float]:
    """RandomResizedCrop with aspect ratio 1: (y0, x0, side) relative to the clip's centred
    square, area share uniform in [scale_min, 1].  Three draws from `generator`, one window for
    every frame of the clip."""
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    side = math.sqrt(scale_min + (1.0 - scale_min) * u[0])
    return (1.0 - side) * u[1], (1.0 - side) * u[2], side


def square_roi(h: int, w: int, window: Optional[Tuple[float, float, float]] = None) -> Tuple[list, list]:
    """(start, end) of the region to resize, relative to an (h, w) frame as (y, x): the centred
    square (the CPU path's short-side resize + centre crop), or `window` inside it."""
    m = min(h, w)
    y0, x0, side = window if window is not None else (0.0, 0.0, 1.0)
    top, left = (h - m) / 2 + y0 * m, (w - m) / 2 + x0 * m
    return [top / h, left / w], [(top + side * m) / h, (left + side * m) / w]


def crop_resize(frames_u8: torch.Tensor, window: Tuple[float, float, float]) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> float (n, 3, S, S): the window (relative y0, x0, side) of every frame
    resampled back to S x S bilinearly (pixel-centre aligned, as DALI's ROI resize samples)."""
    n, _, S, _ = frames_u8.shape
    y0, x0, side = window
    # output pixel centres mapped into the window, in grid_sample's [-1, 1] (align_corners=False)
    c = (torch.arange(S, dtype=torch.float32) + 0.5) / S * side
    ys, xs = (y0 + c) * 2 - 1, (x0 + c) * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1)            # (S, S, 2) as (x, y)
    return F.grid_sample(frames_u8.float(), grid.expand(n, S, S, 2), mode="bilinear",
                         padding_mode="border", align_corners=False)
