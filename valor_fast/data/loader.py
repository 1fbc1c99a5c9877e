"""One loader for every split and both decoding backends.

A loader is a plan of keyed batches - lists of (dataset index, global batch number or None) -
handed to the backend that decodes them:

- training (`train=True`): an endless stream, global batch k of `batch_size` clips drawn by
  `GlobalBatchSampler` (a pure function of (seed, k)), this rank's contiguous rows of it; every
  sample draws its frames, crop, audio slices and caption from `sample_generator(seed, k, index)`,
  so a batch does not depend on the backend, the worker or the number of ranks, and resuming at
  batch k replays nothing and skips nothing;
- evaluation (`train=False`): one pass over the split in annotation order, the last batch partial,
  no random draws.

Backends: cpu (`VideoAudioTextDataset` in DataLoader workers) or dali (`DaliLoader` in the main
process); `data.backend=auto` picks dali for a CUDA device when DALI is installed.  Same batch
keys, shapes and dtypes either way.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple

import torch

from ..config import DataConfig
from .dataset import VideoAudioTextDataset, collate, resolve_backend
from .sampler import GlobalBatchSampler, sample_generator

Key = Tuple[int, Optional[int]]   # (dataset index, global batch number; None = no random draws)


class KeyedBatches(torch.utils.data.Sampler):
    """Training plan: this rank's share of global batch k, every index tagged with k."""

    def __init__(self, sampler: GlobalBatchSampler):
        self.s = sampler

    def __iter__(self) -> Iterator[List[Key]]:
        k = self.s.start_batch
        for idx in self.s:
            yield [(i, k) for i in idx]
            k += 1

    def __len__(self) -> int:
        return len(self.s)


class OrderedBatches(torch.utils.data.Sampler):
    """Evaluation plan: the split in order, `batch_size` at a time, the last batch partial."""

    def __init__(self, n: int, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.n, self.batch_size = n, batch_size

    def __iter__(self) -> Iterator[List[Key]]:
        for b in range(0, self.n, self.batch_size):
            yield [(i, None) for i in range(b, min(b + self.batch_size, self.n))]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class KeyedDataset(torch.utils.data.Dataset):
    """The cpu backend's view of the dataset: key (index, k) -> the sample drawn from
    `sample_generator(seed, k, index)` (k None: no draws)."""

    def __init__(self, ds: VideoAudioTextDataset, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: Key) -> dict:
        i, k = key
        return self.ds.get(i, None if k is None else sample_generator(self.seed, k, i))


class Loader:
    """Collated batches of one split: iterate for batch dicts.  `dataset` is the clip dataset
    (its bad-media counts and scan), `backend` the decoding backend in use."""

    def __init__(self, dataset: VideoAudioTextDataset, batches: Iterable[dict], backend: str):
        self.dataset, self.batches, self.backend = dataset, batches, backend

    def __iter__(self) -> Iterator[dict]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def build_loader(cfg: DataConfig, split: str, image_size: int, batch_size: int, train: bool = False,
                 seed: int = 0, device=None, *, rank: int = 0, world: int = 1,
                 start_batch: int = 0, mel_bins: int = 64) -> Loader:
    """Batches of `split` ("train", "val" or "test") through data.backend.

    train=True: augmented samples in an endless stream; `batch_size` is the GLOBAL batch (all
    ranks), this rank (`rank` of `world`) gets its batch_size // world rows; `start_batch` is the
    global batch to start at (a resumed run's position).  train=False: every clip once, in order,
    `batch_size` a batch.  `device`: where the dali backend decodes (and picks the backend under
    data.backend=auto).  `image_size` and `mel_bins`: the model's (model.image_size,
    model.audio_mel_bins)."""
    backend = resolve_backend(cfg.backend, device)
    ds = VideoAudioTextDataset(cfg, split, image_size, train=train, seed=seed,
                               cache=False if backend == "dali" else None, mel_bins=mel_bins)
    if train:
        sampler = GlobalBatchSampler(len(ds), batch_size, rank, world, seed, start_batch=start_batch)
        plan, rows = KeyedBatches(sampler), batch_size // world
    else:
        plan, rows = OrderedBatches(len(ds), batch_size), batch_size
    if backend == "dali":
        from .dali_loader import DaliLoader
        keyed = ([(i, None if k is None else sample_generator(seed, k, i)) for i, k in keys] for keys in plan)
        batches = DaliLoader(ds, keyed if train else list(keyed), device=device,
                             num_threads=cfg.num_workers or 2, batch_size=rows)
    else:
        batches = torch.utils.data.DataLoader(KeyedDataset(ds, seed), batch_sampler=plan, collate_fn=collate,
                                              num_workers=cfg.num_workers,
                                              persistent_workers=train and cfg.num_workers > 0)
    return Loader(ds, batches, backend)
