"""Audio decoding for the CPU path (and the DALI path's container audio): a separate WAV/FLAC
file, or the audio track inside the video container, as a mono waveform resampled with
`fbank.resample` (bounded memory).

- Files are read through libsndfile as float64 whatever their sample format (8/16/24/32-bit
  PCM, 32/64-bit float: full precision, integers scaled to [-1, 1)), channels averaged, then
  returned as float32.  Reading a float WAV as int16 rounds every sample in (-0.5, 0.5) to
  zero: a float file trained as silence.
- The container's own audio track (real clips of MSRVTT, VATEX, VALOR-32K and AudioCaps carry
  their sound as AAC in the MP4) is decoded with PyAV, any codec its libavcodec decodes;
  samples past the stream's declared duration (AAC's encoder padding of the last frame) are
  dropped.
- `check_decoded` turns a silent result from a non-silent file into a DecodeError: a
  waveform that is all zeros while the WAV's raw samples are not (a sample format decoded
  wrongly), and any non-finite sample (a float WAV can hold NaN/inf, which would poison the
  fbank and every gradient after it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .errors import DecodeError
from .fbank import resample
from .media import AudioInfo, probe_audio, wav_layout
from .shards import media_bytes, media_open, require_media

# scale of each integer sample format of libavcodec (PyAV's frame.format.name, planar 'p' dropped)
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0 ** 31, "s64": 2.0 ** 63}


def _to_rate(wave: torch.Tensor, sr: int, sample_rate: Optional[int]) -> torch.Tensor:
    if sample_rate is None or sr == sample_rate or wave.numel() == 0:
        return wave
    return resample(wave, sr, sample_rate)


def read_audio_file(path: str) -> Tuple[torch.Tensor, int]:
    """(mono float32 waveform at the file's own rate, rate) of a WAV/FLAC file or member.
    Raises DecodeError for an empty, truncated, undecodable or wrongly decoded file."""
    import soundfile as sf
    probe_audio(path)
    try:
        pcm, sr = sf.read(media_open(path), dtype="float64", always_2d=True)
    except Exception as e:
        raise DecodeError(f"audio {path!r} could not be decoded: {type(e).__name__}: {e}") from e
    wave = torch.from_numpy(pcm.mean(1).astype(np.float32))
    check_decoded(path, wave)
    return wave, int(sr)


def load_audio(path: str, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform of a WAV/FLAC file at `sample_rate` (channels averaged).  Raises
    DecodeError for an empty, truncated or undecodable file; a file with zero samples gives an
    empty tensor."""
    wave, sr = read_audio_file(path)
    return _to_rate(wave, sr, sample_rate)


def _frame_samples(fr) -> np.ndarray:
    """One PyAV audio frame -> float64 (channels, samples) in [-1, 1)."""
    a = fr.to_ndarray()
    name = fr.format.name.rstrip("p")
    ch = fr.layout.nb_channels
    if not fr.format.is_planar:                     # packed: (1, samples * channels)
        a = a.reshape(-1, ch).T
    a = a.astype(np.float64)
    if name in _INT_SCALE:
        a = (a - 128.0) / 128.0 if name == "u8" else a / _INT_SCALE[name]
    return a


def read_container_audio(path: str) -> Optional[Tuple[torch.Tensor, int]]:
    """(mono float32 waveform at the track's own rate, rate) of the first audio stream of a
    video file or member, or None when the container has no audio stream.  Raises DecodeError
    (naming the file) when the track cannot be decoded."""
    require_media(path, "video")
    import av
    try:
        with av.open(media_open(path)) as c:
            if not c.streams.audio:
                return None
            st = c.streams.audio[0]
            sr = int(st.rate or st.codec_context.sample_rate)
            chunks = [_frame_samples(fr).mean(0) for fr in c.decode(st)]
            declared = (int(round(float(st.duration * st.time_base) * sr))
                        if st.duration and st.time_base else None)
    except Exception as e:
        raise DecodeError(f"audio track of {path!r} could not be decoded: {type(e).__name__}: {e}") from e
    wave = np.concatenate(chunks) if chunks else np.zeros(0)
    if declared and wave.size > declared:
        wave = wave[:declared]          # encoder padding after the last real sample
    out = torch.from_numpy(wave.astype(np.float32))
    check_decoded(path, out, raw_check=False)
    return out, sr


def load_container_audio(path: str, sample_rate: int) -> Optional[torch.Tensor]:
    """`read_container_audio` resampled to `sample_rate`; None when there is no audio stream."""
    got = read_container_audio(path)
    return None if got is None else _to_rate(got[0], got[1], sample_rate)


def load_clip_audio(info: Optional[AudioInfo], sample_rate: int) -> Optional[torch.Tensor]:
    """The waveform of a clip's audio as probed (`AudioInfo.source`: file or container) at
    `sample_rate`, or None when it has none."""
    if info is None:
        return None
    if info.source == "container":
        return load_container_audio(info.path, sample_rate)
    return load_audio(info.path, sample_rate)


def check_decoded(path: str, wave: torch.Tensor, raw_check: bool = True) -> None:
    """DecodeError when a decoded waveform holds a non-finite sample, or is all zeros while the
    file's raw samples are not (`raw_check`: WAV files, whose samples can be read as stored)."""
    if wave.numel() == 0:
        return
    if not bool(torch.isfinite(wave).all()):
        n = int((~torch.isfinite(wave)).sum())
        raise DecodeError(f"audio {path!r} holds {n} non-finite (NaN/inf) sample(s)")
    if raw_check and not bool(wave.any()) and wav_raw_nonzero(path):
        raise DecodeError(f"audio {path!r} decoded to all zeros but its stored samples are not silent "
                          f"(sample format decoded wrongly)")


def wav_raw_nonzero(path: str) -> bool:
    """Whether a RIFF/WAVE file's data chunk holds any non-silent sample, read as stored
    (8-bit PCM is unsigned around 128; wider PCM is signed; float is IEEE).  False for a file
    that is not a plain WAV (nothing to compare against)."""
    lay = wav_layout(path)
    if lay is None:
        return False
    fmt_tag, bits, off, n = lay
    data = memoryview(media_bytes(path))[off:off + n]
    if fmt_tag == 3:                                  # IEEE float
        dt = {32: "<f4", 64: "<f8"}.get(bits)
        if dt is None:
            return bool(np.frombuffer(data, np.uint8).any())
        arr = np.frombuffer(data[:len(data) - len(data) % (bits // 8)], dt)
        return bool(np.any(arr != 0))
    raw = np.frombuffer(data, np.uint8)
    return bool(np.any(raw != 0x80)) if bits == 8 else bool(raw.any())
