"""Data-pipeline throughput (pytest-benchmark; not part of the default `tests` run).

    python -m pytest bench/bench_data.py --benchmark-enable -q
    python bench/bench_data.py            # plain timings without pytest-benchmark

Covers: synthetic generation (small), one clip's VP9 decode, resize, Kaldi fbank of 10 s (one
clip, and batched as the DALI path runs it), a cached batch (32 clips: sampling + normalisation +
collate), an uncached batch through each backend (cpu in-process; dali with its CPU operators
when no GPU is present), and the first decode pass.  Whole-loader clips/s per backend at VALOR's
shapes: `valor-fast data bench`."""
import os
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from valor_fast.config import DataConfig  # noqa: E402
from valor_fast.data import VideoAudioTextDataset, collate, generate, kaldi_fbank  # noqa: E402
from valor_fast.data.video import decode_video, resize_frames  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("bench") / "synth")
    generate(r, seed=0, clips_per_combo=1, progress=False)
    return r


def test_decode_clip(benchmark, root):
    path = os.path.join(root, "videos", "train0000.webm")
    frames = benchmark(decode_video, path)
    assert frames.shape == (32, 96, 96, 3)


def test_resize(benchmark, root):
    frames = decode_video(os.path.join(root, "videos", "train0000.webm"))
    assert benchmark(resize_frames, frames, 64).shape == (32, 3, 64, 64)


def test_fbank_10s(benchmark):
    w = torch.randn(160000) * 0.1
    assert benchmark(kaldi_fbank, w, 16000).shape == (998, 64)


def test_cached_batch(benchmark, root):
    ds = VideoAudioTextDataset(DataConfig(root=root), "train", 64, True)
    g = torch.Generator().manual_seed(0)
    b = benchmark(lambda: collate([ds.get(i, g) for i in range(32)]))
    assert b["video"].shape == (32, 4, 3, 64, 64)


def test_batched_fbank_10s(benchmark):
    from valor_fast.data.fbank import kaldi_fbank_batched
    w = torch.randn(32, 160000) * 0.1    # (B, samples): one batch of 10 s clips, as the DALI path runs it
    assert benchmark(kaldi_fbank_batched, w, 16000).shape == (32, 998, 64)


def _uncached_batch(backend, root):
    """One training batch of 32 clips decoded from the files (no cache)."""
    cfg = DataConfig(root=root, cache=False, backend=backend)
    ds = VideoAudioTextDataset(cfg, "train", 64, True, cache=False)
    keys = [(i, torch.Generator().manual_seed(i)) for i in range(32)]
    if backend == "dali":
        from valor_fast.data.dali_loader import DaliLoader
        loader = DaliLoader(ds, [keys], prefetch=0)
        return lambda: loader.make_batch(keys)
    return lambda: collate([ds.get(i, g) for i, g in keys])


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_uncached_batch(benchmark, root, backend):
    from valor_fast.utils import deps
    if backend == "dali" and not deps.HAS_DALI:
        pytest.skip("nvidia-dali not installed")
    b = benchmark(_uncached_batch(backend, root))
    assert b["video"].shape == (32, 4, 3, 64, 64)


def _time(fn, n=10):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def main():
    with tempfile.TemporaryDirectory() as d:
        root = os.path.join(d, "synth")
        t = time.perf_counter()
        generate(root, seed=0, progress=False)
        print(f"generate default dataset: {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        ds = VideoAudioTextDataset(DataConfig(root=root), "train", 64, True)
        print(f"first decode pass, train split ({len(ds)} clips, 64 px): {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        VideoAudioTextDataset(DataConfig(root=root), "train", 64, True)
        print(f"second construction (disk cache): {time.perf_counter() - t:.2f} s")
        path = os.path.join(root, "videos", "train0000.webm")
        print(f"decode one clip: {_time(lambda: decode_video(path)):.1f} ms")
        w = torch.from_numpy(np.random.default_rng(0).standard_normal(160000).astype(np.float32))
        print(f"kaldi fbank 10 s: {_time(lambda: kaldi_fbank(w, 16000)):.1f} ms")
        g = torch.Generator().manual_seed(0)
        print(f"cached batch of 32: {_time(lambda: collate([ds.get(i, g) for i in range(32)])):.1f} ms")


if __name__ == "__main__":
    main()
