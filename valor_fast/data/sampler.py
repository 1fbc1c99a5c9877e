"""Deterministic, resumable global-batch sampling, and the seeded generators of every draw.

The order is a pure function of (seed, epoch): global batch k of the run holds the same clips
whatever the number of ranks, and rank r takes its contiguous share.  The loader position is
therefore the step counter itself; resuming at step s replays nothing and skips nothing."""
from __future__ import annotations

from typing import Iterator, List

import torch


class GlobalBatchSampler(torch.utils.data.Sampler):
    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_batch: int = 0, shuffle: bool = True):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
        if n < global_batch:
            raise ValueError(f"dataset of {n} clips is smaller than one global batch ({global_batch})")
        self.n, self.gb, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.start_batch, self.shuffle = start_batch, shuffle
        self.per_epoch = n // global_batch   # drop_last: every global batch is full

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=g)

    def global_batch(self, k: int) -> List[int]:
        """Indices of global batch k (counted from the start of the run)."""
        epoch, j = divmod(k, self.per_epoch)
        return self.order(epoch)[j * self.gb:(j + 1) * self.gb].tolist()

    def __iter__(self) -> Iterator[List[int]]:
        k = self.start_batch
        share = self.gb // self.world
        while True:
            idx = self.global_batch(k)
            yield idx[self.rank * share:(self.rank + 1) * share]
            k += 1

    def __len__(self) -> int:   # infinite stream; the trainer counts steps
        return 2 ** 31


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, micro-batch): the masking draws of a step
    are the same after a resume and on any number of ranks."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 131 + micro)


def sample_generator(seed: int, batch: int, index: int) -> torch.Generator:
    """The generator of one training sample: a function of (seed, global batch, index) only,
    whatever the backend, worker or rank that loads it."""
    return torch.Generator().manual_seed((seed * 7919 + batch) * 1_000_003 + index)
