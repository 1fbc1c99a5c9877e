"""Media lookup, cheap probing, and the bad-media policy shared by the CPU and DALI paths.

Probing reads container headers and packets, never pixels: the DALI path needs a clip's frame
count before it decodes (to draw VALOR's per-segment frame indices), and both paths need to
tell a usable clip from a missing, empty, truncated or undecodable one without crashing.

Bad-media policy (both backends, training and evaluation):
- A sample whose video (or, when it exists, audio) file is missing, empty, truncated or
  undecodable is REPLACED by the next index of a seed-fixed permutation of the dataset whose
  media are good (`ReplacementOrder`).  The replacement brings its own caption, id and index:
  the batch never pairs one clip's media with another's caption.  Which index replaces which is
  a function of (seed, index) and of which files are bad, nothing else (not of workers, ranks or
  discovery order); the replacement's random draws come from a generator derived from the
  original sample's seed and the replacement index (`derive_generator`).
- A missing audio FILE (or one with zero samples) is not bad when `data.allow_missing_audio`
  (default): the clip trains on its video groups only (`audio_valid` False masks its T-A and
  T-AV terms).  An audio file that exists but is empty (0 bytes), truncated or undecodable is
  bad: it signals a broken download, not a silent clip.
- A clip shorter than asked is not bad: frames repeat (`video.sample_indices`), audio shorter
  than one 25 ms window is zero-padded to one fbank frame and every slice is padded to 512
  frames (`fbank.slice_fbank`).
- Every bad id is logged once with its error, each batch carries `n_bad` (samples replaced) and
  `bad_media` ((id, error) pairs met), and `BadMediaTracker` stops the run with a report of
  every bad id once the replaced share exceeds `data.max_bad_rate`.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..utils.log import get_logger
from .paths import check_id, confine, real_bases
from .shards import ShardIndex, is_member, media_open, media_size, require_media
from .video import IMAGE_EXTS, DecodeError, check_truncated, image_size, list_frame_folder, open_video

log = get_logger(__name__)

VIDEO_EXTS = (".webm", ".mp4", ".mkv", ".avi", ".mov")
AUDIO_EXTS = (".wav", ".flac")
# The replaced share is judged once this many samples were loaded (or the whole dataset, if
# smaller): one unlucky first batch must not stop a run whose overall rate is fine.
MIN_JUDGED_SAMPLES = 200


class BadMediaError(RuntimeError):
    """Too many bad media files; `.report` holds the counts and every bad id with its error."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _find(folder: str, vid: str, exts, shards: Optional["ShardIndex"], bases: tuple) -> Optional[str]:
    """A member <vid>.<ext> of `shards` first, then <folder>/<vid>.<ext>, for exts in order; a
    file found is returned as its real path, confined to `bases`."""
    check_id(vid)
    hit = shards.find(vid, exts) if shards is not None else None
    if hit:
        return hit
    for e in exts:
        p = os.path.join(folder, vid + e)
        if os.path.exists(p):
            return confine(p, bases, vid)
    return None


def find_video(video_dir: str, vid: str, shards: Optional["ShardIndex"] = None,
               root: Optional[str] = None) -> Optional[str]:
    """<video_dir>/<vid>.<ext> for the known video extensions, or the frame folder <vid>/; a
    member of `shards` first when given.  Raises UnsafePathError (a DecodeError) for an id that
    is not a safe relative name or a path that resolves outside `video_dir` and `root`
    (paths.py); a frame folder's images are held to the same rule."""
    bases = real_bases(video_dir, root)
    hit = _find(video_dir, vid, VIDEO_EXTS, shards, bases)
    if hit:
        return hit
    p = os.path.join(video_dir, vid)
    if not os.path.isdir(p):
        return None
    real = confine(p, bases, vid)
    for name in os.listdir(real):
        q = os.path.join(real, name)
        if os.path.islink(q) and name.lower().endswith(IMAGE_EXTS):
            confine(q, bases, vid, what=f"frame {name!r}")
    return real


def find_audio(audio_dir: str, vid: str, shards: Optional["ShardIndex"] = None,
               root: Optional[str] = None) -> Optional[str]:
    """<audio_dir>/<vid>.wav|.flac (a member of `shards` first), confined as `find_video`."""
    return _find(audio_dir, vid, AUDIO_EXTS, shards, real_bases(audio_dir, root))


@dataclass
class VideoInfo:
    path: str
    kind: str                      # "file" (a video container) or "frames" (a JPEG folder)
    n_frames: int
    fps: Optional[float] = None
    width: int = 0
    height: int = 0
    files: List[str] = field(default_factory=list)   # frame folder: sorted image names
    audio: Optional["AudioInfo"] = None              # the container's own audio track, if any

    @property
    def seconds(self) -> Optional[float]:
        return self.n_frames / self.fps if self.fps else None


@dataclass
class AudioInfo:
    path: str
    n_samples: int
    sample_rate: int
    channels: int
    source: str = "file"           # "file" (a WAV/FLAC beside the video) or "container" (its own track)

    @property
    def seconds(self) -> Optional[float]:
        """Duration; None when the header does not declare it (n_samples -1)."""
        if self.n_samples < 0:
            return None
        return self.n_samples / self.sample_rate if self.sample_rate else 0.0


def probe_video(path: Optional[str], vid: str = "") -> VideoInfo:
    """Frame count and geometry from the container's packets (no pixel decoding), or the image
    list of a frame folder.  Raises DecodeError naming the file for a missing, empty,
    undecodable or truncated one."""
    if path is None:
        raise DecodeError(f"no video file or frame folder for {vid!r}")
    if os.path.isdir(path):
        names = list_frame_folder(path)
        empty = [n for n in names if os.path.getsize(os.path.join(path, n)) == 0]
        if empty:
            raise DecodeError(f"frame folder {path!r}: {len(empty)} empty image(s), e.g. {empty[0]!r}")
        h, w = image_size(os.path.join(path, names[0]))   # a folder's frames share one size
        return VideoInfo(path, "frames", len(names), width=w, height=h, files=names)
    try:
        with open_video(path) as (c, st, expected):
            # one packet a shown frame for VP8/VP9 (WebM superframes carry hidden frames inside
            # one packet), H.264 and HEVC; the decoder's frame count is what the index uses
            n = sum(1 for pk in c.demux(st) if pk.size > 0)
            rate = st.average_rate or st.guessed_rate
            w, h = st.codec_context.width, st.codec_context.height
            audio = _track_info(path, c)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"video {path!r} could not be opened: {type(e).__name__}: {e}") from e
    if n == 0:
        raise DecodeError(f"video {path!r} has no video packets")
    check_truncated(path, n, expected)
    return VideoInfo(path, "file", n, float(rate) if rate else None, w, h, audio=audio)


def _track_info(path: str, container) -> Optional[AudioInfo]:
    """AudioInfo (source "container") of the first audio stream of an open container, from its
    header: the sample count estimated from the declared duration, -1 when none is declared
    (the decoder then finds out), or None without an audio stream."""
    if not container.streams.audio:
        return None
    st = container.streams.audio[0]
    sr = int(st.rate or st.codec_context.sample_rate or 0)
    if st.duration and st.time_base:
        n = int(round(float(st.duration * st.time_base) * sr))
    elif container.duration:
        n = int(round(container.duration / 1_000_000 * sr))
    else:
        n = -1
    return AudioInfo(path, n, sr, int(st.codec_context.layout.nb_channels), "container")


def _riff_chunks(path: str):
    """(id, declared length, data offset) of each top-level chunk of a RIFF/WAVE file or
    member, with the bytes present (None when it is not a plain RIFF/WAVE file); the fmt
    chunk's first 16 bytes ride along as `fmt`."""
    size = media_size(path)
    with (open(path, "rb") if not is_member(path) else media_open(path)) as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        chunks, fmt, pos = [], b"", 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, clen = struct.unpack("<4sI", f.read(8))
            if cid == b"fmt ":
                fmt = f.read(min(clen, 40))
            chunks.append((cid, clen, pos + 8))
            if cid == b"data":
                break
            pos += 8 + clen + (clen & 1)
    return chunks, fmt, size


def wav_layout(path: str) -> Optional[Tuple[int, int, int, int]]:
    """(format tag: 1 PCM / 3 IEEE float, bits per sample, data offset, data bytes present) of
    a plain WAV file, or None when it is not one (FLAC, RIFF without fmt/data)."""
    got = _riff_chunks(path)
    if got is None:
        return None
    chunks, fmt, size = got
    data = [c for c in chunks if c[0] == b"data"]
    if len(fmt) < 16 or not data:
        return None
    tag, bits = struct.unpack("<H", fmt[0:2])[0], struct.unpack("<H", fmt[14:16])[0]
    if tag == 0xFFFE and len(fmt) >= 26:            # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID
        tag = struct.unpack("<H", fmt[24:26])[0]
    _, clen, off = data[0]
    present = size - off
    if clen not in (0, 0xFFFFFFFF):
        present = min(present, clen)
    return tag, bits, off, present


def _wav_data_shortfall(path: str) -> Optional[Tuple[int, int]]:
    """(declared, present) bytes of a RIFF/WAVE file's data chunk when fewer are present than
    the header declares; None when complete or not a plain RIFF file.  libsndfile silently
    reads what is there, so a cut WAV would pass as a short clip."""
    got = _riff_chunks(path)
    if got is None:
        return None
    chunks, _, size = got
    for cid, clen, off in chunks:
        # 0xFFFFFFFF / 0: streaming writers that never patched the size
        if cid == b"data" and clen not in (0, 0xFFFFFFFF) and size - off < clen:
            return clen, size - off
    return None


def probe_audio(path: str) -> AudioInfo:
    """Sample count and rate from the header.  Raises DecodeError for an empty, truncated or
    undecodable file (a missing file is the caller's decision: see allow_missing_audio)."""
    require_media(path, "audio")
    try:
        import soundfile as sf
        info = sf.info(media_open(path))
    except Exception as e:
        raise DecodeError(f"audio {path!r} could not be decoded: {type(e).__name__}: {e}") from e
    short = _wav_data_shortfall(path)
    if short is not None:
        raise DecodeError(f"audio {path!r} is truncated: {short[1]} of the {short[0]} data bytes its "
                          f"header declares")
    return AudioInfo(path, int(info.frames), int(info.samplerate), int(info.channels))


# -- replacement -----------------------------------------------------------------------------

class ReplacementOrder:
    """A seed-fixed cyclic permutation of the dataset: a bad index i is replaced by the first
    good index after i in it.  Successors are spread over the dataset (not i + 1), so a run of
    adjacent bad files (one broken shard) does not make one clip stand in for all of them."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed * 7_368_787 + 2_654_435_761)
        self.perm = torch.randperm(n, generator=g).tolist()
        self.pos = [0] * n
        for k, i in enumerate(self.perm):
            self.pos[i] = k

    def candidates(self, i: int):
        """i, then its successors in the permutation (every index once)."""
        n = len(self.perm)
        k = self.pos[i]
        for step in range(n):
            yield self.perm[(k + step) % n]


def derive_generator(generator: Optional[torch.Generator], replacement: int) -> Optional[torch.Generator]:
    """The generator of a replacement sample: a function of the original sample's seed and the
    replacement index only, so its draws do not depend on how many draws a failed attempt made
    (or on whether the bad file was known before or found on the way)."""
    if generator is None:
        return None
    seed = (generator.initial_seed() * 1_000_003 + 7919 * (replacement + 1)) % (2 ** 63)
    return torch.Generator().manual_seed(seed)


# -- accounting (main process) ----------------------------------------------------------------

class BadMediaTracker:
    """Counts replaced samples over the batches a loader hands out (bad ids found in worker
    processes travel in the batch), logs every bad id once with its error, and raises
    BadMediaError with a report once the replaced share exceeds `max_rate` (judged after
    min(MIN_JUDGED_SAMPLES, dataset size) samples; max_rate 0 stops at the first bad file)."""

    def __init__(self, max_rate: float, dataset_size: int, what: str = "data"):
        if not 0.0 <= max_rate <= 1.0:
            raise ValueError(f"data.max_bad_rate must be in [0, 1], got {max_rate}")
        self.max_rate, self.n, self.what = max_rate, dataset_size, what
        self.seen = 0
        self.replaced = 0
        self.bad: Dict[str, str] = {}

    def note(self, vid: str, error: str) -> None:
        if vid not in self.bad:
            self.bad[vid] = error
            log.warning("%s: bad media for clip %r (replaced): %s", self.what, vid, error)

    def add_scan(self, bad: Dict[str, str], scanned: int) -> None:
        """Bad ids found by a full scan at construction (data.cache decodes every clip): the
        rate over the scanned set is known at once."""
        for vid, err in bad.items():
            self.note(vid, err)
        if scanned and bad and len(bad) / scanned > self.max_rate:
            self._stop(len(bad), scanned, "of the clips decoded at start-up")

    def update(self, batch: dict, judge: bool = True) -> None:
        """Count a batch; with `judge`, stop now if the rate is exceeded (the trainer judges the
        counts of every rank together instead, at log steps: `judge(seen, replaced)`)."""
        for vid, err in batch.get("bad_media", []):
            self.note(vid, err)
        self.seen += len(batch["video_id"])
        self.replaced += int(batch.get("n_bad", 0))
        if judge:
            self.judge(self.seen, self.replaced)

    def judge(self, seen: int, replaced: int) -> None:
        judged = seen >= min(MIN_JUDGED_SAMPLES, self.n) or (self.max_rate == 0.0 and replaced)
        if judged and replaced / max(1, seen) > self.max_rate:
            self._stop(replaced, seen, "of the samples loaded so far")

    def report(self, bad_count: Optional[int] = None, total: Optional[int] = None) -> dict:
        return {"replaced": self.replaced if bad_count is None else bad_count,
                "samples": self.seen if total is None else total,
                "max_bad_rate": self.max_rate, "bad": dict(sorted(self.bad.items()))}

    def _stop(self, bad_count: int, total: int, where: str):
        rep = self.report(bad_count, total)
        rate = bad_count / max(1, total)
        lines = "\n".join(f"  {vid}: {err}" for vid, err in rep["bad"].items())
        raise BadMediaError(
            f"{self.what}: {bad_count} bad of {total} {where} ({100 * rate:.1f}%), above "
            f"data.max_bad_rate={self.max_rate}; stopping.  Bad clips ({len(rep['bad'])}):\n{lines}\n"
            f"Scan the whole set with `valor-fast data check <root>`; fix or drop these clips from the "
            f"annotations, or raise data.max_bad_rate.", rep)
