"""Resampling takes bounded memory whatever the clip length, and gives the output it gave before."""
import math
import os
import subprocess
import sys

import torch

from valor_fast.data.fbank import resample


def _resample_before(wave, orig, target, taps=32, i0_dtype=torch.float32):
    """The whole-clip gather this change replaced (main 57d72d8), for comparison (i0_dtype
    float64: the same formula with its normalising I0(8) taken in float64)."""
    g = math.gcd(int(orig), int(target))
    up, down = int(target) // g, int(orig) // g
    cutoff = min(1.0, up / down) * 0.95
    n_out = int(math.ceil(wave.numel() * up / down))
    t = torch.arange(n_out, dtype=torch.float64) * down / up
    base = torch.floor(t).long()
    k = torch.arange(-taps + 1, taps + 1)
    idx = base[:, None] + k[None]
    d = t[:, None] - idx.double()
    win = torch.special.i0(8.0 * torch.sqrt(torch.clamp(1 - (d / taps) ** 2, min=0))) / torch.special.i0(torch.tensor(8.0, dtype=i0_dtype))
    h = cutoff * torch.sinc(cutoff * d) * win
    src = wave.double()
    vals = torch.where((idx >= 0) & (idx < src.numel()), src[idx.clamp(0, src.numel() - 1)],
                       torch.zeros((), dtype=torch.float64))
    return (vals * h).sum(1).to(wave.dtype)


def test_same_output_as_before():
    g = torch.Generator().manual_seed(0)
    for orig, target, dtype in [(44100, 16000, torch.float32), (44100, 16000, torch.float64),
                                (22050, 16000, torch.float64), (48000, 16000, torch.float32),
                                (8000, 16000, torch.float64), (16000, 44100, torch.float32),
                                (44101, 16000, torch.float64)]:
        # > 1 block (8192) of output, so a block seam is inside the compared range
        x = (torch.rand(int(orig * 0.6), generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
        new, old = resample(x, orig, target), _resample_before(x, orig, target)
        assert new.shape == old.shape and new.dtype == dtype
        # the old code took I0(8) in float32 (a 2.2e-7 relative gain error); this one in float64
        assert (new - old).abs().max() <= 1e-6, (orig, target, dtype, float((new - old).abs().max()))
    # and the old formula, exact: the same numbers to float64 round-off
    x = torch.rand(20000, generator=g, dtype=torch.float64) * 2 - 1
    exact = _resample_before(x, 44100, 16000, i0_dtype=torch.float64)
    assert (resample(x, 44100, 16000) - exact).abs().max() <= 1e-10


_PEAK = r'''
import resource, sys, torch
torch.set_num_threads(1)
from valor_fast.data.fbank import resample
sr = 44100
x = torch.rand(30 * sr) * 2 - 1                 # 30 s at 44.1 kHz
resample(torch.rand(sr) * 2 - 1, sr, 16000)      # warm-up: the same code path, 1 s
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
y = resample(x, sr, 16000)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert y.numel() == 480000
print((after - before) / 1024)
'''


def test_memory_bounded_for_a_long_clip(tmp_path):
    """A 30 s 44.1 kHz clip -> 16 kHz: the peak memory added by the call is a few MiB (the
    output is 1.9 MB); the whole-clip gather took ~1450 MB.  A fresh process, so the peak
    resident size measures this call only."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    extra_mb = float(p.stdout.strip().splitlines()[-1])
    assert extra_mb < 50, f"resampling 30 s took {extra_mb:.0f} MB of extra peak memory"
