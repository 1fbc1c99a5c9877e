"""Kaldi-compatible log-mel filterbank in torch (torchaudio has no release for torch 2.13), and
VALOR's audio recipe: mean removal -> fbank -> zero-pad to a multiple of 512 frames -> 512-frame
slices -> (x + 4.2677393) / (4.5689974 * 2).

Matches `torchaudio.compliance.kaldi.fbank` (checked against golden outputs in tests): frames
cut with snip_edges, per-frame DC removal, pre-emphasis 0.97 against the previous sample
(the first sample against itself), a symmetric Hann window, a power-of-two FFT, power spectrum,
Kaldi's triangular mel bins (1127 ln(1 + f/700)), natural log floored at float eps.  Runs on
any device the waveform is on.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

AUDIO_MEAN, AUDIO_STD = -4.2677393, 4.5689974   # AudioSet fbank statistics VALOR normalises with
SLICE_FRAMES = 512


def _mel(f):
    return 1127.0 * torch.log1p(f / 700.0) if torch.is_tensor(f) else 1127.0 * math.log1p(f / 700.0)


@lru_cache(maxsize=16)
def mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """(num_bins, padded_window // 2 + 1) triangular filters in Kaldi's mel layout (float64)."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < high_freq <= nyquist):
        raise ValueError(f"bad mel range low={low_freq} high={high_freq} for rate {sample_rate}")
    n_fft_bins = padded_window // 2
    bin_width = sample_rate / padded_window
    mlo, mhi = _mel(low_freq), _mel(high_freq)
    delta = (mhi - mlo) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = mlo + b * delta, mlo + (b + 1) * delta, mlo + (b + 2) * delta
    mel = _mel(bin_width * torch.arange(n_fft_bins, dtype=torch.float64))[None]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    w = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(w, (0, 1))   # the Nyquist bin gets no weight


def kaldi_fbank(waveform: torch.Tensor, sample_frequency: float, num_mel_bins: int = 64,
                frame_length: float = 25.0, frame_shift: float = 10.0, dither: float = 0.0,
                preemphasis: float = 0.97, remove_dc_offset: bool = True, window_type: str = "hanning",
                htk_compat: bool = True, use_energy: bool = False, low_freq: float = 20.0,
                high_freq: float = 0.0, snip_edges: bool = True, use_log_fbank: bool = True,
                use_power: bool = True, round_to_power_of_two: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """waveform (N,) or (1, N) float -> (frames, num_mel_bins) in the waveform's dtype."""
    if waveform.dim() == 2:
        if waveform.shape[0] != 1:
            raise ValueError(f"kaldi_fbank takes mono audio, got {tuple(waveform.shape)}")
        waveform = waveform[0]
    if waveform.dim() != 1:
        raise ValueError(f"waveform must be (N,) or (1, N), got {tuple(waveform.shape)}")
    if use_energy:
        raise NotImplementedError("use_energy=True is not supported (VALOR and AST use False)")
    if not snip_edges:
        raise NotImplementedError("snip_edges=False is not supported")
    out_dtype = waveform.dtype if waveform.dtype in (torch.float32, torch.float64) else torch.float32
    # float64 on the CPU: near-silent bins (log ~ -15) lose ~3% in float32 FFT round-off; the
    # GPU keeps float32 (still within 1e-3 wherever the energy is above ~1e-6 of the frame's)
    dtype = torch.float64 if waveform.device.type == "cpu" else out_dtype
    x = waveform.to(dtype)
    win = int(sample_frequency * frame_length * 0.001)
    shift = int(sample_frequency * frame_shift * 0.001)
    padded = 1 << (win - 1).bit_length() if round_to_power_of_two else win
    if x.numel() < win:
        return x.new_zeros(0, num_mel_bins)
    n = 1 + (x.numel() - win) // shift
    frames = x.as_strided((n, win), (shift, 1))                         # (frames, win)
    if dither:
        frames = frames + dither * torch.randn(frames.shape, generator=generator, dtype=dtype).to(x.device)
    if remove_dc_offset:
        frames = frames - frames.mean(dim=1, keepdim=True)
    if preemphasis:
        prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - preemphasis * prev
    if window_type == "hanning":
        w = torch.hann_window(win, periodic=False, dtype=dtype, device=x.device)
    elif window_type == "povey":
        w = torch.hann_window(win, periodic=False, dtype=dtype, device=x.device).pow(0.85)
    elif window_type == "hamming":
        w = torch.hamming_window(win, periodic=False, alpha=0.54, beta=0.46, dtype=dtype, device=x.device)
    elif window_type == "rectangular":
        w = torch.ones(win, dtype=dtype, device=x.device)
    else:
        raise ValueError(f"unknown window_type {window_type!r}")
    frames = F.pad(frames * w, (0, padded - win))
    spec = torch.fft.rfft(frames).abs()                                  # (frames, padded/2 + 1)
    if use_power:
        spec = spec.pow(2)
    banks = mel_banks(num_mel_bins, padded, float(sample_frequency), float(low_freq), float(high_freq))
    mel = spec @ banks.to(device=x.device, dtype=dtype).t()               # (frames, bins)
    if use_log_fbank:
        # Kaldi (and torchaudio) floor at float32 eps whatever the compute dtype: log(1.19e-7) = -15.94
        mel = torch.clamp(mel, min=torch.finfo(torch.float32).eps).log()
    return mel.to(out_dtype)


def resample(wave: torch.Tensor, orig: int, target: int, taps: int = 32) -> torch.Tensor:
    """Band-limited resampling with a Kaiser-windowed sinc (polyphase via the rational ratio)."""
    if orig == target:
        return wave
    g = math.gcd(int(orig), int(target))
    up, down = int(target) // g, int(orig) // g
    cutoff = min(1.0, up / down) * 0.95                 # of the low-rate Nyquist, with a guard band
    n_out = int(math.ceil(wave.numel() * up / down))
    t = torch.arange(n_out, dtype=torch.float64) * down / up               # output times in input samples
    base = torch.floor(t).long()
    k = torch.arange(-taps + 1, taps + 1)
    idx = base[:, None] + k[None]                                          # (n_out, 2*taps)
    d = t[:, None] - idx.double()
    beta = 8.0
    win = torch.special.i0(beta * torch.sqrt(torch.clamp(1 - (d / taps) ** 2, min=0))) / torch.special.i0(torch.tensor(beta))
    h = cutoff * torch.sinc(cutoff * d) * win
    src = wave.double()
    vals = torch.where((idx >= 0) & (idx < src.numel()), src[idx.clamp(0, src.numel() - 1)], torch.zeros((), dtype=torch.float64))
    return (vals * h).sum(1).to(wave.dtype)


def valor_fbank(wave: torch.Tensor, sample_rate: int, num_mel_bins: int = 64) -> torch.Tensor:
    """Mean removal + fbank at VALOR's setting, normalised: (frames, mel)."""
    wave = wave - wave.mean()
    fb = kaldi_fbank(wave, sample_rate, num_mel_bins=num_mel_bins, htk_compat=True, use_energy=False,
                     window_type="hanning", dither=0.0, frame_shift=10)
    return (fb - AUDIO_MEAN) / (AUDIO_STD * 2)


def slice_fbank(fb: torch.Tensor, n_slices: int = 1, train: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(frames, mel) -> (n_slices, 512, mel): zero-pad (in the normalised domain, the pad is the
    value of a zero fbank, as VALOR pads before normalising) to a multiple of 512 frames, then
    take n slices spread evenly; training draws a random start within each region, test takes
    the middle."""
    if fb.shape[0] == 0:
        raise ValueError("audio too short for one fbank frame")
    total = max(1, math.ceil(fb.shape[0] / SLICE_FRAMES)) * SLICE_FRAMES
    pad_val = (0.0 - AUDIO_MEAN) / (AUDIO_STD * 2)
    padded = torch.full((total, fb.shape[1]), pad_val, dtype=fb.dtype, device=fb.device)
    padded[:fb.shape[0]] = fb
    n_win = total // SLICE_FRAMES
    out = []
    for s in range(n_slices):
        lo, hi = s * n_win // n_slices, max(s * n_win // n_slices + 1, (s + 1) * n_win // n_slices)
        if train:
            w = int(torch.randint(lo, hi, (), generator=generator))
        else:
            w = (lo + hi - 1) // 2
        w = min(w, n_win - 1)
        out.append(padded[w * SLICE_FRAMES:(w + 1) * SLICE_FRAMES])
    return torch.stack(out)
