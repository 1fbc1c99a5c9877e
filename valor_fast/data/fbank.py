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

import contextlib
import math
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .video import sample_indices

AUDIO_MEAN, AUDIO_STD = -4.2677393, 4.5689974   # AudioSet fbank statistics VALOR normalises with
SLICE_FRAMES = 512
PAD_VALUE = (0.0 - AUDIO_MEAN) / (AUDIO_STD * 2)   # a zero fbank, normalised: what slices are padded with


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


_KAISER_BETA = 8.0
_BLOCK = 8192          # outputs a block: (8192, 2 * taps) float64 rows = 4 MiB at 32 taps
_MAX_BANK_PHASES = 8192   # rate pairs with more phases (e.g. 44100 -> 44101) build taps per block


def _sinc_taps(frac: torch.Tensor, taps: int, cutoff: float) -> torch.Tensor:
    """(P,) fractional positions in [0, 1) -> (P, 2*taps) Kaiser-windowed sinc weights of the
    input samples base-taps+1 .. base+taps around an output at base + frac."""
    k = torch.arange(-taps + 1, taps + 1, dtype=torch.float64, device=frac.device)
    d = frac[:, None] - k[None]                                            # output minus input time
    beta = torch.tensor(_KAISER_BETA, dtype=torch.float64, device=frac.device)
    win = torch.special.i0(beta * torch.sqrt(torch.clamp(1 - (d / taps) ** 2, min=0))) / torch.special.i0(beta)
    return cutoff * torch.sinc(cutoff * d) * win


@lru_cache(maxsize=16)
def _polyphase_bank(up: int, down: int, taps: int, cutoff: float) -> torch.Tensor:
    """(up, 2*taps) float64: row p weighs the inputs of every output n with n*down % up == p
    (the output sits p/up of a sample past input (n*down)//up).  44.1 -> 16 kHz: 160 x 64."""
    return _sinc_taps(torch.arange(up, dtype=torch.float64) / up, taps, cutoff)


def resample(wave: torch.Tensor, orig: int, target: int, taps: int = 32) -> torch.Tensor:
    """Band-limited resampling of a 1-D waveform with a Kaiser-windowed sinc (beta 8, 2*taps
    taps, cutoff 0.95 of the lower Nyquist), polyphase over the rational ratio up/down.

    Output n sits at input time n*down/up; its phase (n*down) % up picks one of `up` filters,
    built once.  Outputs are made in blocks of 8192, each reading only its own input span, so
    the working memory is a few MiB whatever the clip length (the earlier whole-clip gather
    held ~6 (n_out, 2*taps) float64 matrices: 1.45 GB peak for 30 s at 44.1 kHz, measured).
    Computed in float64, returned in the input's dtype, on the input's device."""
    if orig == target:
        return wave
    if wave.dim() != 1:
        raise ValueError(f"resample takes a 1-D waveform, got shape {tuple(wave.shape)}")
    if orig <= 0 or target <= 0:
        raise ValueError(f"sample rates must be positive, got {orig} -> {target}")
    g = math.gcd(int(orig), int(target))
    up, down = int(target) // g, int(orig) // g
    cutoff = min(1.0, up / down) * 0.95                 # of the low-rate Nyquist, with a guard band
    n_in, dev = wave.numel(), wave.device
    n_out = int(math.ceil(n_in * up / down))
    out = torch.empty(n_out, dtype=wave.dtype, device=dev)
    bank = _polyphase_bank(up, down, taps, cutoff).to(dev) if up <= _MAX_BANK_PHASES else None
    for n0 in range(0, n_out, _BLOCK):
        n = torch.arange(n0, min(n0 + _BLOCK, n_out), dtype=torch.long, device=dev)
        base, phase = (n * down) // up, (n * down) % up                   # exact integer arithmetic
        lo, hi = int(base[0]) - taps + 1, int(base[-1]) + taps + 1      # input span of the block
        span = wave[max(lo, 0):min(hi, n_in)].to(torch.float64)
        span = F.pad(span, (max(0, -lo), max(0, hi - n_in)))             # zeros past either end
        rows = span.unfold(0, 2 * taps, 1)[base - base[0]]               # (block, 2*taps)
        h = bank[phase] if bank is not None else _sinc_taps(phase.double() / up, taps, cutoff)
        out[n0:n0 + n.numel()] = (rows * h).sum(1).to(wave.dtype)
    return out


def valor_fbank(wave: torch.Tensor, sample_rate: int, num_mel_bins: int = 64) -> torch.Tensor:
    """Mean removal + fbank at VALOR's setting, normalised: (frames, mel)."""
    wave = wave - wave.mean()
    win = int(sample_rate * 0.025)
    if 0 < wave.numel() < win:
        # shorter than one 25 ms window: zero-pad (after mean removal) to one frame rather than
        # fail; kaldi_fbank_batched does the same
        wave = F.pad(wave, (0, win - wave.numel()))
    fb = kaldi_fbank(wave, sample_rate, num_mel_bins=num_mel_bins, htk_compat=True, use_energy=False,
                     window_type="hanning", dither=0.0, frame_shift=10)
    return (fb - AUDIO_MEAN) / (AUDIO_STD * 2)


def slice_windows(n_frames: int, n_slices: int = 1, train: bool = False,
                  generator: Optional[torch.Generator] = None) -> List[int]:
    """The 512-frame windows `slice_fbank` takes from a clip of `n_frames` fbank frames (padded
    to a multiple of 512): n_slices windows spread evenly, a random one of each region in
    training (drawn from `generator`), the middle one at test.  Shared by the CPU and the
    batched (device) path so both draw the same windows from the same generator.  The rule is
    the video's frame sampling (one pick per equal segment) over the clip's windows."""
    return sample_indices(max(1, math.ceil(n_frames / SLICE_FRAMES)), n_slices, train, generator)


def slice_fbank(fb: torch.Tensor, n_slices: int = 1, train: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(frames, mel) -> (n_slices, 512, mel): zero-pad (in the normalised domain, the pad is the
    value of a zero fbank, as VALOR pads before normalising) to a multiple of 512 frames, then
    take n slices spread evenly; training draws a random start within each region, test takes
    the middle."""
    if fb.shape[0] == 0:
        raise ValueError("audio too short for one fbank frame")
    total = max(1, math.ceil(fb.shape[0] / SLICE_FRAMES)) * SLICE_FRAMES
    padded = torch.full((total, fb.shape[1]), PAD_VALUE, dtype=fb.dtype, device=fb.device)
    padded[:fb.shape[0]] = fb
    wins = slice_windows(fb.shape[0], n_slices, train, generator)
    return torch.stack([padded[w * SLICE_FRAMES:(w + 1) * SLICE_FRAMES] for w in wins])


# -- batched, on the device --------------------------------------------------------------------

def _window(window_type: str, win: int, dtype, device) -> torch.Tensor:
    if window_type == "hanning":
        return torch.hann_window(win, periodic=False, dtype=dtype, device=device)
    if window_type == "povey":
        return torch.hann_window(win, periodic=False, dtype=dtype, device=device).pow(0.85)
    if window_type == "hamming":
        return torch.hamming_window(win, periodic=False, alpha=0.54, beta=0.46, dtype=dtype, device=device)
    if window_type == "rectangular":
        return torch.ones(win, dtype=dtype, device=device)
    raise ValueError(f"unknown window_type {window_type!r}")


@contextlib.contextmanager
def _exact_fp32():
    """No autocast and no TF32 inside: a TF32 mel projection alone costs ~1e-3 relative error,
    the whole budget of the Kaldi match."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def fbank_frame_counts(lengths: torch.Tensor, sample_frequency: float, frame_length: float = 25.0,
                       frame_shift: float = 10.0) -> torch.Tensor:
    """Frames a clip of `lengths` samples yields (snip_edges), with a clip of 1..win-1 samples
    zero-padded to one window (1 frame) and an empty clip giving 0."""
    win = int(sample_frequency * frame_length * 0.001)
    shift = int(sample_frequency * frame_shift * 0.001)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    return torch.where(lengths > 0, 1 + (lengths.clamp(min=win) - win) // shift, torch.zeros_like(lengths))


def kaldi_fbank_batched(waves: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                        sample_frequency: float = 16000, num_mel_bins: int = 64,
                        frame_length: float = 25.0, frame_shift: float = 10.0, preemphasis: float = 0.97,
                        window_type: str = "hanning", low_freq: float = 20.0, high_freq: float = 0.0,
                        remove_mean: bool = True, dtype: torch.dtype = torch.float32,
                        chunk: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched Kaldi fbank on the waveforms' device (CUDA when they are there), in `dtype`.

    waves (B, N) float, each clip left-aligned and padded to N (what follows `lengths` is
    ignored); lengths (B,) samples of each (default N).  Returns (fb (B, T, num_mel_bins),
    frames (B,)) with T = max(frames); rows past a clip's frame count are zeros.

    Kaldi's settings as `kaldi_fbank` with VALOR's defaults (htk_compat, no energy, dither 0,
    snip_edges, a power-of-two FFT, DC removal, pre-emphasis 0.97, natural log floored at float
    eps).  `remove_mean` subtracts each clip's mean first, as VALOR and AST do.  A clip shorter
    than one window is zero-padded to one window (1 frame) instead of yielding none.

    Precision: the mean is taken and subtracted in float64 and the result rounded once, so the
    float32 input is the correctly rounded centred waveform; the FFT and the mel projection run
    in `dtype` without TF32 or autocast.  An absolute error e of the log-mel is a relative error
    ~e of the mel energy.  float32 (the default, for the GPU): within 1e-3 of Kaldi's float64
    wherever the log-mel is above -10 (measured on the golden files: <= 6e-4 down to -11); below
    that, near Kaldi's floor (log eps = -15.9), a bin's energy is within ~1e4 x of the float32
    round-off of its frame's loudest bin and errors reach ~2e-2 (a pure chirp's empty bands).
    float64: within 1e-3 everywhere (<= 4e-4 measured), at twice the memory traffic.
    """
    if waves.dim() != 2:
        raise ValueError(f"waves must be (B, N), got {tuple(waves.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    B, N = waves.shape
    dev = waves.device
    win = int(sample_frequency * frame_length * 0.001)
    shift = int(sample_frequency * frame_shift * 0.001)
    padded_win = 1 << (win - 1).bit_length()
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).to(dev)
    if bool((lengths > N).any()):
        raise ValueError(f"lengths {lengths.tolist()} exceed the padded length {N}")
    frames_out = fbank_frame_counts(lengths.cpu(), sample_frequency, frame_length, frame_shift)
    T = int(frames_out.max()) if B else 0
    out = torch.zeros(B, T, num_mel_bins, dtype=dtype, device=dev)
    if T == 0:
        return out, frames_out
    # every clip needs at least one full window of (zero) samples and all of its T frames
    need = max(win + (T - 1) * shift, N)
    with _exact_fp32():
        valid = torch.arange(N, device=dev)[None] < lengths[:, None]                # (B, N)
        x = waves.to(torch.float64) * valid
        if remove_mean:
            mean = x.sum(1, keepdim=True) / lengths.clamp(min=1)[:, None]
            x = (x - mean) * valid
        x = x.to(dtype)
        if need > N:
            x = F.pad(x, (0, need - N))
        w = _window(window_type, win, dtype, dev)
        banks = mel_banks(num_mel_bins, padded_win, float(sample_frequency), float(low_freq),
                          float(high_freq)).to(device=dev, dtype=dtype).t().contiguous()   # (bins, mel)
        for b0 in range(0, B, chunk):
            xs = x[b0:b0 + chunk]
            fr = xs.unfold(1, win, shift)[:, :T]                                  # (b, T, win) view
            fr = fr - fr.mean(dim=2, keepdim=True)                               # DC removal
            if preemphasis:
                fr = torch.cat([fr[..., :1] * (1 - preemphasis), fr[..., 1:] - preemphasis * fr[..., :-1]], 2)
            fr = F.pad(fr * w, (0, padded_win - win))                             # (b, T, padded)
            spec = torch.fft.rfft(fr)                                            # (b, T, padded/2+1)
            power = spec.real.square() + spec.imag.square()
            mel = power @ banks                                                  # (b, T, mel)
            out[b0:b0 + chunk] = torch.clamp(mel, min=torch.finfo(torch.float32).eps).log()
    # zero the frames past each clip's count (they saw padding)
    out = out * (torch.arange(T, device=dev)[None] < frames_out.to(dev)[:, None])[..., None]
    return out, frames_out


def valor_fbank_batched(waves: torch.Tensor, lengths: Optional[torch.Tensor], sample_rate: int,
                        num_mel_bins: int = 64, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """`valor_fbank` for a padded batch: mean removal + fbank + VALOR's normalisation.
    -> (fb (B, T, mel) normalised, frames (B,)); rows past a clip's frames hold PAD_VALUE (the
    normalised value of a zero fbank, what VALOR pads with)."""
    fb, n = kaldi_fbank_batched(waves, lengths, sample_rate, num_mel_bins=num_mel_bins, dtype=dtype)
    fb = (fb - AUDIO_MEAN) / (AUDIO_STD * 2)
    real = torch.arange(fb.shape[1], device=fb.device)[None] < n.to(fb.device)[:, None]
    return torch.where(real[..., None], fb, torch.full_like(fb, PAD_VALUE)), n


def slice_fbank_batched(fb: torch.Tensor, frames: torch.Tensor, windows: List[List[int]]) -> torch.Tensor:
    """(B, T, mel) normalised fbank + frame counts + per-clip window ids (from `slice_windows`)
    -> (B, S, 512, mel) in one gather; frames past a clip's end read as PAD_VALUE (as
    `slice_fbank` pads)."""
    B, T, M = fb.shape
    S = len(windows[0]) if windows else 0
    dev = fb.device
    start = torch.tensor(windows, dtype=torch.long, device=dev).view(B, S) * SLICE_FRAMES
    idx = start[..., None] + torch.arange(SLICE_FRAMES, device=dev)                  # (B, S, 512)
    ok = idx < frames.to(dev).view(B, 1, 1)
    g = torch.gather(fb, 1, idx.clamp(max=max(T - 1, 0)).view(B, S * SLICE_FRAMES, 1).expand(-1, -1, M))
    g = g.view(B, S, SLICE_FRAMES, M)
    return torch.where(ok[..., None], g, torch.full_like(g, PAD_VALUE))
