"""Our Kaldi fbank against torchaudio's (golden files from shared/), plus VALOR's slicing."""
import json
import math
import os

import numpy as np
import pytest
import torch

from valor_fast.data.fbank import (AUDIO_MEAN, AUDIO_STD, kaldi_fbank, kaldi_fbank_batched, resample, slice_fbank,
                                   slice_fbank_batched, slice_windows, valor_fbank, valor_fbank_batched)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.environ.get("VALOR_FAST_GOLDEN", os.path.join(REPO, "..", "shared", "golden", "fbank"))


def _golden():
    man = os.path.join(GOLDEN, "manifest.json")
    if not os.path.exists(man):
        return []
    with open(man) as f:
        m = json.load(f)
    return sorted(m["files"].items())


@pytest.mark.skipif(not _golden(), reason=f"golden fbank files not found at {GOLDEN} (set VALOR_FAST_GOLDEN)")
@pytest.mark.parametrize("name,meta", _golden() or [("none", {})])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_kaldi_golden(name, meta, dtype):
    import soundfile as sf
    pcm, sr = sf.read(os.path.join(GOLDEN, meta["wav"]), dtype="int16")
    assert sr == meta["sample_rate"]
    w = torch.tensor(pcm / 32768.0, dtype=dtype)
    bins = 64 if "valor64" in name else 128
    out = kaldi_fbank(w - w.mean(), sr, num_mel_bins=bins, htk_compat=True, use_energy=False,
                      window_type="hanning", dither=0.0, frame_shift=10)
    ref = torch.from_numpy(np.load(os.path.join(GOLDEN, name)))
    assert tuple(out.shape) == tuple(meta["shape"])
    # log-mel: an absolute error e in the log is a relative error ~e of the mel energy.  A float32
    # waveform carries ~1e-7 relative round-off, which dominates bins near Kaldi's floor
    # (log ~ -15.9); those are compared in float64 only
    diff = (out.double() - ref).abs()
    if dtype == torch.float32:
        diff = diff[ref > -10.0]
    err = diff.max().item()
    assert err <= 1e-3, err


def test_tone_peaks_in_its_mel_bin():
    sr, f0 = 16000, 1000.0
    t = torch.arange(sr, dtype=torch.float64) / sr
    fb = kaldi_fbank(torch.sin(2 * math.pi * f0 * t), sr, num_mel_bins=64)
    # independent: the bin whose centre mel is nearest 1000 Hz
    mel = lambda f: 1127 * math.log(1 + f / 700)
    lo, hi = mel(20), mel(8000)
    centres = [lo + (i + 1) * (hi - lo) / 65 for i in range(64)]
    want = min(range(64), key=lambda i: abs(centres[i] - mel(f0)))
    assert abs(int(fb.mean(0).argmax()) - want) <= 1
    assert fb.shape == (98, 64)   # 1 + (16000 - 400) // 160


def test_valor_normalisation_and_slices():
    sr = 16000
    w = torch.randn(sr * 7) * 0.1
    fb = valor_fbank(w, sr)
    raw = kaldi_fbank(w - w.mean(), sr, num_mel_bins=64)
    torch.testing.assert_close(fb, (raw + 4.2677393) / (4.5689974 * 2))
    s = slice_fbank(fb, 1, train=False)
    assert s.shape == (1, 512, 64)
    # 698 frames pad to 1024: two windows; test takes the middle window's first one
    assert fb.shape[0] == 698
    torch.testing.assert_close(s[0], fb[:512])
    two = slice_fbank(fb, 2, train=False)
    torch.testing.assert_close(two[1, :186], fb[512:])
    pad = (0 - AUDIO_MEAN) / (AUDIO_STD * 2)
    assert torch.allclose(two[1, 186:], torch.full_like(two[1, 186:], pad))
    short = slice_fbank(fb[:10], 1)
    assert short.shape == (1, 512, 64) and torch.allclose(short[0, 10:], torch.full((502, 64), pad))


def test_resample_keeps_a_tone():
    sr, f0 = 22050, 440.0
    t = torch.arange(sr, dtype=torch.float64) / sr
    y = resample(torch.sin(2 * math.pi * f0 * t), sr, 16000)
    assert abs(y.numel() - 16000) <= 1
    t2 = torch.arange(y.numel(), dtype=torch.float64) / 16000
    ref = torch.sin(2 * math.pi * f0 * t2)
    mid = slice(200, -200)   # edges lack neighbours
    assert (y[mid] - ref[mid]).abs().max() < 0.02


# -- the device fbank ---------------------------------------------------------------------------
@pytest.mark.skipif(not _golden(), reason=f"golden fbank files not found at {GOLDEN}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_fbank_matches_kaldi_golden(dtype):
    """All golden clips in one padded batch (different lengths and rates grouped by rate)."""
    import soundfile as sf
    by_rate = {}
    for name, meta in _golden():
        by_rate.setdefault(meta["sample_rate"], []).append((name, meta))
    for sr, items in by_rate.items():
        waves = [torch.from_numpy(sf.read(os.path.join(GOLDEN, m["wav"]), dtype="int16")[0] / 32768.0) for _, m in items]
        waves.append(torch.randn(sr // 3, dtype=torch.float64) * 0.1)   # a shorter filler clip
        lengths = torch.tensor([w.numel() for w in waves])
        x = torch.zeros(len(waves), int(lengths.max()), dtype=dtype)
        for r, w in enumerate(waves):
            x[r, :w.numel()] = w.to(dtype)
        for r, (name, meta) in enumerate(items):
            bins = 64 if "valor64" in name else 128
            fb, n = kaldi_fbank_batched(x, lengths, sr, num_mel_bins=bins, dtype=dtype)
            ref = torch.from_numpy(np.load(os.path.join(GOLDEN, name)))
            assert int(n[r]) == ref.shape[0] and fb.shape[2] == bins
            diff = (fb[r, :ref.shape[0]].double() - ref).abs()
            if dtype == torch.float32:
                diff = diff[ref > -10.0]   # float32 round-off near Kaldi's floor: see the docstring
            assert diff.max().item() <= 1e-3, (name, diff.max().item())
            assert (fb[r, ref.shape[0]:] == 0).all()


def test_batched_fbank_and_slices_match_the_per_clip_path():
    g = torch.Generator().manual_seed(3)
    lens = [16000 * 7 + 123, 300, 16000 * 2, 16000 * 12 + 5]   # 300: under one 25 ms window
    waves = [torch.randn(n, generator=g, dtype=torch.float64) * 0.2 for n in lens]
    x = torch.zeros(len(lens), max(lens), dtype=torch.float64)
    for r, w in enumerate(waves):
        x[r, :w.numel()] = w
    fb, n = valor_fbank_batched(x, torch.tensor(lens), 16000, 64, dtype=torch.float64)
    for r, w in enumerate(waves):
        ref = valor_fbank(w, 16000)
        assert int(n[r]) == ref.shape[0]
        torch.testing.assert_close(fb[r, :ref.shape[0]], ref, atol=1e-9, rtol=0)
    # the slice windows drawn from one generator state are the same on both paths
    for train in (False, True):
        wins, ref = [], []
        for r, w in enumerate(waves):
            g1 = torch.Generator().manual_seed(r)
            g2 = torch.Generator().manual_seed(r)
            ref.append(slice_fbank(valor_fbank(w, 16000), 2, train, g1))
            wins.append(slice_windows(int(n[r]), 2, train, g2))
        torch.testing.assert_close(slice_fbank_batched(fb, n, wins), torch.stack(ref), atol=1e-9, rtol=0)


def test_batched_fbank_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        kaldi_fbank_batched(torch.zeros(100))
    with pytest.raises(ValueError, match="exceed"):
        kaldi_fbank_batched(torch.zeros(2, 100), torch.tensor([50, 200]))
    fb, n = kaldi_fbank_batched(torch.zeros(2, 1000), torch.tensor([0, 1000]))
    assert n.tolist() == [0, 4] and (fb[0] == 0).all()
