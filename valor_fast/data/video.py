"""CPU video decoding (PyAV) and VALOR's frame sampling / transforms."""
from __future__ import annotations

import contextlib
import math
import os
import struct
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


# -- container completeness: the byte counts a container's own header declares ----------------
#
# A file cut short keeps decoding up to the cut: a WebM that lost 5-20% of its bytes (an
# interrupted download) gives 80-95% of its frames, above TRUNCATED_SHARE, and would train
# as a shorter clip whose audio no longer lines up.  Containers say how long they are:
# Matroska/WebM's Segment element declares its size (and, when a streaming writer left it
# "unknown", each Cluster declares its own); MP4/MOV's top-level boxes (ftyp, moov, mdat, ...)
# declare theirs; AVI's RIFF header declares the first RIFF chunk's.  A declared size running
# past the end of the file is truncation.  Reading these headers costs a few small reads.

_EBML, _SEGMENT = 0x1A45DFA3, 0x18538067
_MKV_MAX_CHILDREN = 1 << 16
# the Segment's children (Matroska level 1: SeekHead, Info, Tracks, Cluster, Cues, Tags, Chapters,
# Attachments, Void, CRC-32); an element of any other id ends the walk (trailing bytes, not a cut)
_MKV_LEVEL1 = {0x114D9B74: "SeekHead", 0x1549A966: "Info", 0x1654AE6B: "Tracks", 0x1F43B675: "Cluster",
               0x1C53BB6B: "Cues", 0x1254C367: "Tags", 0x1043A770: "Chapters", 0x1941A469: "Attachments",
               0xEC: "Void", 0xBF: "CRC-32"}
# top-level ISO-BMFF / QuickTime boxes; a "box" of another type ends the walk (trailing bytes)
_MP4_TYPES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"moof", b"mfra",
              b"styp", b"sidx", b"ssix", b"meta", b"pdin", b"prft", b"emsg", b"udta", b"junk"}


class _Reader:
    """read(offset, n) over a plain file or a shard member (whose bytes are in memory anyway)."""

    def __init__(self, path: str):
        from .shards import is_member, media_bytes, media_size
        self.size = media_size(path)
        self._data = media_bytes(path) if is_member(path) else None
        self._f = None if self._data is not None else open(path, "rb")

    def read(self, off: int, n: int) -> bytes:
        if self._data is not None:
            return self._data[off:off + n]
        self._f.seek(off)
        return self._f.read(n)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _vint(buf: bytes, pos: int, strip: bool) -> Tuple[Optional[int], int]:
    """An EBML variable-length integer at buf[pos]: (value, its length); the value is None for
    a size of all ones ("unknown"); (None, 0) when the bytes do not hold one."""
    if pos >= len(buf) or buf[pos] == 0:
        return None, 0
    n = 8 - buf[pos].bit_length() + 1
    if pos + n > len(buf):
        return None, 0
    v = int.from_bytes(buf[pos:pos + n], "big")
    if strip:
        v &= (1 << (7 * n)) - 1
        if v == (1 << (7 * n)) - 1:
            return None, n
    return v, n


def _mkv_element(r: _Reader, off: int) -> Optional[Tuple[int, Optional[int], int]]:
    """(id, size or None for unknown, data offset) of the EBML element at `off`, or None."""
    buf = r.read(off, 12)
    eid, n = _vint(buf, 0, strip=False)
    if not n:
        return None
    size, m = _vint(buf, n, strip=True)
    if not m:
        return None
    return eid, size, off + n + m


def _matroska_shortfall(r: _Reader) -> Optional[str]:
    head = _mkv_element(r, 0)
    if head is None or head[0] != _EBML or head[1] is None:
        return None
    seg = _mkv_element(r, head[2] + head[1])
    if seg is None or seg[0] != _SEGMENT:
        return None
    _, size, start = seg
    if size is not None:
        if start + size > r.size:
            return f"its Matroska segment declares {start + size} bytes, {r.size} present"
        return None
    off = start   # unknown segment size (a streaming writer): each child's own size
    for _ in range(_MKV_MAX_CHILDREN):
        if off >= r.size:
            return None
        el = _mkv_element(r, off)
        if el is None or el[1] is None or el[0] not in _MKV_LEVEL1:
            return None   # an unknown-sized cluster (nothing declared to compare) or trailing bytes
        if el[2] + el[1] > r.size:
            return (f"its Matroska {_MKV_LEVEL1[el[0]]} at byte {off} declares {el[2] + el[1] - off} bytes, "
                    f"{r.size - off} present")
        off = el[2] + el[1]
    return None


def _mp4_shortfall(r: _Reader) -> Optional[str]:
    off = 0
    while off + 8 <= r.size:
        size, typ = struct.unpack(">I4s", r.read(off, 8))
        if typ not in _MP4_TYPES:
            return None   # not an ISO base media file (first box), or trailing bytes after the last
        if size == 1:
            size = struct.unpack(">Q", r.read(off + 8, 8))[0]
        elif size == 0:
            return None   # runs to the end of the file by definition
        if size < 8:
            return f"its {typ.decode('latin-1')!r} box at byte {off} declares an invalid size {size}"
        if off + size > r.size:
            return f"its {typ.decode('latin-1')!r} box at byte {off} declares {size} bytes, {r.size - off} present"
        off += size
    return None


def _avi_shortfall(r: _Reader) -> Optional[str]:
    head = r.read(0, 12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] not in (b"AVI ", b"AVIX"):
        return None
    size = struct.unpack("<I", head[4:8])[0]
    if 8 + size > r.size:
        return f"its RIFF header declares {8 + size} bytes, {r.size} present"
    return None


def container_shortfall(path: str) -> Optional[str]:
    """Why the container of `path` (file or member) is cut short by its own declared sizes,
    or None when it is complete (or its format declares none we read)."""
    r = _Reader(path)
    try:
        for check in (_matroska_shortfall, _mp4_shortfall, _avi_shortfall):
            why = check(r)
            if why:
                return why
    finally:
        r.close()
    return None


def check_complete(path: str) -> None:
    why = container_shortfall(path)
    if why:
        raise DecodeError(f"video {path!r} is truncated: {why}")


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
    DecodeError naming the file when it is missing, empty, cut short of the sizes its container
    declares (`check_complete`) or has no video stream."""
    from .shards import media_open, require_media
    require_media(path, "video")
    check_complete(path)
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
