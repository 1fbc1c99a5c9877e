"""Collated batches of a split through the configured decoding backend (data.backend): the CPU
dataset in a torch DataLoader, or the DALI loader.  Above both backends, so neither imports the
other."""
from __future__ import annotations

import torch

from ..config import DataConfig
from .dataset import VideoAudioTextDataset, collate, resolve_backend


def build_loader(cfg: DataConfig, split: str, image_size: int, batch_size: int, train: bool, seed: int = 0,
                 device=None, mel_bins: int = 64):
    """Collated batches of `split` through data.backend.  Training batches are shuffled
    deterministically from `seed` and drop the last partial batch.  `image_size` and `mel_bins`:
    the model's (model.image_size, model.audio_mel_bins)."""
    backend = resolve_backend(cfg.backend, device)
    if backend == "dali":
        from .dali_loader import DaliLoader
        ds = VideoAudioTextDataset(cfg, split, image_size, train, seed, cache=False, mel_bins=mel_bins)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(ds), generator=g).tolist() if train else list(range(len(ds)))
        n = (len(order) // batch_size) * batch_size if train else len(order)
        keys = [[(i, None) for i in order[b:b + batch_size]] for b in range(0, n, batch_size)]
        return DaliLoader(ds, keys, device=device, num_threads=cfg.num_workers or 2)
    ds = VideoAudioTextDataset(cfg, split, image_size, train, seed, mel_bins=mel_bins)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train, generator=g,
                                       collate_fn=collate, num_workers=cfg.num_workers)
