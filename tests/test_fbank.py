"""Our Kaldi fbank against torchaudio's (golden files from shared/), plus VALOR's slicing."""
import json
import math
import os

import numpy as np
import pytest
import torch

from valor_fast.data.fbank import AUDIO_MEAN, AUDIO_STD, kaldi_fbank, resample, slice_fbank, valor_fbank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
