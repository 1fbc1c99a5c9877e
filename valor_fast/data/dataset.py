"""Clip datasets and loaders (CPU path).  The GPU DALI backend slots in behind `build_loader`.

With `data.cache` every clip is decoded once: frames are kept as uint8 at the encoder's
resolution and the audio as its full normalised fbank, in memory and in an on-disk cache
(`root/.cache/<size>/<id>.pt`, keyed by the media files' size and mtime) so a second run starts
at once.  Captions are tokenised once, at construction (off the hot path)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import DataConfig
from ..utils.log import get_logger, log_once
from .annotations import read_annotations
from .fbank import slice_fbank, valor_fbank, resample
from .tokenizer import encode, pad_ids
from .video import DecodeError, decode_frame_folder, decode_video, normalize, resize_frames, sample_indices

log = get_logger(__name__)
VIDEO_EXTS = (".webm", ".mp4", ".mkv", ".avi", ".mov")
AUDIO_EXTS = (".wav", ".flac")


def _find(folder: str, vid: str, exts) -> Optional[str]:
    for e in exts:
        p = os.path.join(folder, vid + e)
        if os.path.exists(p):
            return p
    p = os.path.join(folder, vid)
    return p if os.path.isdir(p) else None


def load_audio(path: str, sample_rate: int) -> torch.Tensor:
    import soundfile as sf
    try:
        pcm, sr = sf.read(path, dtype="int16", always_2d=True)
    except Exception as e:
        raise DecodeError(f"audio {path!r} could not be decoded: {e}") from e
    wave = torch.from_numpy(pcm.astype(np.float32).mean(1) / 32768.0)
    if wave.numel() == 0:
        raise DecodeError(f"audio {path!r} is empty")
    return resample(wave, sr, sample_rate) if sr != sample_rate else wave


class VideoAudioTextDataset(torch.utils.data.Dataset):
    def __init__(self, cfg: DataConfig, split: str, image_size: int, train: bool):
        ann = {"train": cfg.train_ann, "val": cfg.val_ann, "test": cfg.test_ann}.get(split)
        if ann is None:
            raise ValueError(f"split must be train, val or test, got {split!r}")
        self.cfg, self.split, self.size, self.train = cfg, split, image_size, train
        self.records = read_annotations(cfg.root, ann)
        if not self.records:
            raise ValueError(f"{split} annotations in {cfg.root!r} are empty")
        self.video_dir = os.path.join(cfg.root, cfg.video_dir)
        self.audio_dir = os.path.join(cfg.root, cfg.audio_dir)
        # pre-tokenised captions: (clip -> list of id lists)
        flat = [c for r in self.records for c in r["captions"]]
        ids = encode(flat, cfg.max_text_len)
        self.caption_ids, k = [], 0
        for r in self.records:
            self.caption_ids.append(ids[k:k + len(r["captions"])])
            k += len(r["captions"])
        self._cache: Dict[int, dict] = {}
        if cfg.cache:
            self._fill_cache()

    def __len__(self) -> int:
        return len(self.records)

    # -- decoding --
    def _decode(self, i: int) -> dict:
        vid = self.records[i]["video_id"]
        vpath = _find(self.video_dir, vid, VIDEO_EXTS)
        if vpath is None:
            raise DecodeError(f"no video for {vid!r} in {self.video_dir!r}")
        apath = _find(self.audio_dir, vid, AUDIO_EXTS)
        key = None
        cache_file = None
        if self.cfg.cache:
            stats = [(os.path.getsize(p), int(os.path.getmtime(p))) for p in (vpath, apath) if p and os.path.isfile(p)]
            key = f"{stats}|{self.cfg.sample_rate}"
            cache_file = os.path.join(self.cfg.root, ".cache", str(self.size), vid + ".pt")
            if os.path.exists(cache_file):
                try:
                    d = torch.load(cache_file, weights_only=True)
                    if d.get("key") == key:
                        return d
                except Exception:
                    pass   # unreadable cache entry: decode again
        frames = decode_frame_folder(vpath) if os.path.isdir(vpath) else decode_video(vpath)
        d = {"frames": resize_frames(frames, self.size), "key": key}
        if apath is None:
            log_once("noaudio:" + vid, f"clip {vid!r} has no audio file: its T-A/T-AV terms are masked")
            d["fbank"] = torch.zeros(0)
        else:
            d["fbank"] = valor_fbank(load_audio(apath, self.cfg.sample_rate), self.cfg.sample_rate).to(torch.float16)
        if cache_file:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            torch.save(d, cache_file + ".tmp")
            os.replace(cache_file + ".tmp", cache_file)
        return d

    def _fill_cache(self) -> None:
        from tqdm import tqdm
        for i in tqdm(range(len(self)), desc=f"decode {self.split}", mininterval=2.0, leave=False,
                      disable=len(self) < 64):
            self._cache[i] = self._decode(i)

    def clip(self, i: int) -> dict:
        if i in self._cache:
            return self._cache[i]
        d = self._decode(i)
        if self.cfg.cache:
            self._cache[i] = d
        return d

    # -- samples --
    def get(self, i: int, generator: Optional[torch.Generator] = None) -> dict:
        """Sample i; in training its frames, audio slice and caption are drawn from `generator`
        (the trainer seeds it by (seed, batch, index), so samples do not depend on workers)."""
        rec, d = self.records[i], self.clip(i)
        n = self.cfg.frames_train if self.train else self.cfg.frames_test
        idx = sample_indices(d["frames"].shape[0], n, self.train, generator)
        video = normalize(d["frames"][idx])                                   # (n, 3, H, W)
        has_audio = d["fbank"].numel() > 0
        if has_audio:
            audio = slice_fbank(d["fbank"].float(), self.cfg.audio_slices, self.train, generator)
        else:
            audio = torch.zeros(self.cfg.audio_slices, 512, 64)
        if self.train:
            c = int(torch.randint(len(rec["captions"]), (), generator=generator))
        else:
            c = 0   # the canonical caption (retrieval uses one caption per clip)
        return {"video": video, "audio": audio, "has_audio": has_audio, "ids": self.caption_ids[i][c],
                "caption": rec["captions"][c], "captions": rec["captions"], "qa": rec["qa"],
                "video_id": rec["video_id"], "index": i}

    def __getitem__(self, i: int) -> dict:
        return self.get(i, None)


def collate(samples: List[dict]) -> dict:
    ids, mask = pad_ids([s["ids"] for s in samples])
    return {"video": torch.stack([s["video"] for s in samples]),
            "audio": torch.stack([s["audio"] for s in samples]),
            "has_audio": torch.tensor([s["has_audio"] for s in samples]),
            "text_ids": ids, "text_mask": mask,
            "video_id": [s["video_id"] for s in samples], "caption": [s["caption"] for s in samples],
            "captions": [s["captions"] for s in samples], "qa": [s["qa"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples])}


def build_loader(cfg: DataConfig, split: str, image_size: int, batch_size: int, train: bool, seed: int = 0):
    """A DataLoader of collated batches.  backend: auto -> cpu here (DALI comes with the GPU data
    pipeline); training batches are shuffled deterministically from `seed` and drop the last
    partial batch."""
    backend = cfg.backend
    if backend == "dali":
        raise NotImplementedError("data.backend=dali is not available yet; use auto or cpu")
    if backend not in ("auto", "cpu"):
        raise ValueError(f"data.backend must be auto, cpu or dali, got {backend!r}")
    ds = VideoAudioTextDataset(cfg, split, image_size, train)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train, generator=g,
                                       collate_fn=collate, num_workers=cfg.num_workers)
