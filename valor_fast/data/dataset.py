"""Clip datasets, the CPU path's decoding and collate, and the sampling plan both backends share
(`loader.build_loader` assembles either backend).

A sample is drawn in a fixed order from its own generator (the trainer seeds it by (seed, global
batch, index), so samples do not depend on workers or ranks): the frame indices (one per equal
segment), the crop window and the flip (training, when enabled), the audio slice windows, then
the caption.  The CPU path here and the DALI path (`dali_loader.py`) make the same draws in the
same order, so a backend switch changes decoding round-off, not which frames, slices or caption
a sample gets.

With `data.cache` (CPU path) every clip is decoded once: frames are kept as uint8 at the
encoder's resolution and the audio as its full normalised fbank, in memory and in an on-disk cache
(`root/.cache/<size>/<sha256(id)[:32]>.pt`, holding the id, keyed by the media files' size and
mtime) so a second run starts at once.  Captions are tokenised once, at construction (off the hot
path).

Audio: the clip's WAV/FLAC file when there is one, else the video container's own audio track
(`audio.py`), else none.  Ids are confined (`paths.py`): an id that is absolute, holds `..` or
leads through a symlink out of the dataset is bad media, reported by id; the decode cache is
used only while it resolves inside the data root.

Bad media (see `media.py` for the policy): a training sample whose files are bad is replaced by
the next good index of a seed-fixed permutation, with its own caption; evaluation splits drop bad
clips at construction (a logged count), since a stand-in would duplicate a clip in retrieval.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from ..config import DataConfig
from ..utils.log import get_logger, log_once
from .annotations import read_annotations
from .audio import load_audio, load_container_audio
from .fbank import slice_fbank, valor_fbank
from .media import (BadMediaError, ReplacementOrder, derive_generator, find_audio, find_video, probe_audio,
                    probe_video)
from .paths import dataset_cache, id_hash, write_private
from .shards import ShardIndex, is_member, media_stat
from .tokenizer import encode_cached, pad_ids
from .video import (DecodeError, crop_resize, crop_window, decode_frame_folder, decode_video, normalize,
                    resize_frames, sample_indices)

log = get_logger(__name__)
# bump when decoding changes what a cache entry holds (2: bilinear-chroma YUV->RGB; 3: audio read
# at full precision, the container's own audio track, entries named by a hash of the id)
CACHE_VERSION = 3
VIDEO_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_AUDIO = "has no file and its video no audio track"


class VideoAudioTextDataset(torch.utils.data.Dataset):
    """Records + media lookup + (CPU path) decoding.  `cache` overrides `cfg.cache` (the DALI
    path decodes per batch and never caches).  What the model reads comes from its config:
    `image_size` (model.image_size) and `mel_bins` (model.audio_mel_bins, VALOR's 64)."""

    def __init__(self, cfg: DataConfig, split: str, image_size: int, train: bool, seed: int = 0,
                 cache: Optional[bool] = None, mel_bins: int = 64):
        ann = {"train": cfg.train_ann, "val": cfg.val_ann, "test": cfg.test_ann}.get(split)
        if ann is None:
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if cfg.video_dtype not in VIDEO_DTYPES:
            raise ValueError(f"data.video_dtype must be one of {sorted(VIDEO_DTYPES)}, got {cfg.video_dtype!r}")
        if not 0.0 < cfg.crop_scale_min <= 1.0:
            raise ValueError(f"data.crop_scale_min must be in (0, 1], got {cfg.crop_scale_min}")
        self.cfg, self.split, self.size, self.train = cfg, split, image_size, train
        self.mel_bins = mel_bins
        self.use_cache = cfg.cache if cache is None else cache
        self.records = read_annotations(cfg.root, ann)
        if not self.records:
            raise ValueError(f"{split} annotations in {cfg.root!r} are empty")
        self.video_dir = os.path.join(cfg.root, cfg.video_dir)
        self.audio_dir = os.path.join(cfg.root, cfg.audio_dir)
        self.cache_root = dataset_cache(cfg.root)
        globs = [g for g in (cfg.shards, ann[len("shards:"):] if ann.startswith("shards:") else "") if g]
        self.shards = ShardIndex.load(cfg.root, ",".join(globs)) if globs else None
        self._cache: Dict[int, dict] = {}
        self.bad: Dict[int, str] = {}            # index -> error, as found in this process
        self.scan_bad: Dict[str, str] = {}       # video id -> error, found by a start-up scan
        self.scanned = 0
        if self.use_cache:
            self._fill_cache()
        elif not train:
            self._probe_all()
        if not train and self.bad:
            self._drop_bad()
        self._tokenise()
        self.order = ReplacementOrder(len(self.records), seed)

    def __len__(self) -> int:
        return len(self.records)

    def _tokenise(self) -> None:
        flat = [c for r in self.records for c in r["captions"]]
        ids = encode_cached(flat, self.cfg.max_text_len, self.cache_root)
        self.caption_ids, k = [], 0
        for r in self.records:
            self.caption_ids.append(ids[k:k + len(r["captions"])])
            k += len(r["captions"])

    def _drop_bad(self) -> None:
        keep = [i for i in range(len(self.records)) if i not in self.bad]
        log.warning("%s split: %d of %d clips have bad media and are left out of evaluation: %s",
                    self.split, len(self.bad), len(self.records),
                    "; ".join(f"{self.records[i]['video_id']}: {e}" for i, e in sorted(self.bad.items())))
        if not keep:
            raise BadMediaError(f"{self.split} split: every clip has bad media", {"bad": dict(self.scan_bad)})
        self._cache = {n: self._cache[i] for n, i in enumerate(keep) if i in self._cache}
        self.records = [self.records[i] for i in keep]
        self.bad = {}

    # -- media --
    def paths(self, i: int) -> Tuple[str, Optional[str]]:
        """(video path or frame folder, audio file or None), confined to the dataset.  Raises
        DecodeError when the video is missing, or UnsafePathError (a DecodeError) when the id or
        a path it leads to would leave the dataset."""
        vid = self.records[i]["video_id"]
        vpath = find_video(self.video_dir, vid, self.shards, root=self.cfg.root)
        if vpath is None:
            raise DecodeError(f"no video file or frame folder for {vid!r} in {self.video_dir!r}"
                              + (" or the shards" if self.shards else ""))
        return vpath, find_audio(self.audio_dir, vid, self.shards, root=self.cfg.root)

    def probe(self, i: int):
        """(VideoInfo, AudioInfo or None) from headers and packets, no pixels (the DALI path's
        plan, and the evaluation splits' start-up check).  The audio is the clip's own file
        (source "file"), else its video's audio track (source "container"), else None."""
        vpath, apath = self.paths(i)
        v = probe_video(vpath, self.records[i]["video_id"])
        a = probe_audio(apath) if apath is not None else v.audio
        if a is None:
            return v, self._no_audio(i, NO_AUDIO)
        if a.n_samples == 0:
            a = self._no_audio(i, "has zero samples")
        return v, a

    def _no_audio(self, i: int, why: str):
        vid = self.records[i]["video_id"]
        if not self.cfg.allow_missing_audio:
            raise DecodeError(f"audio of {vid!r} {why} (data.allow_missing_audio=false)")
        log_once("noaudio:" + vid, f"clip {vid!r}: audio {why}; it trains on its video groups only "
                                   f"(T-A/T-AV terms masked)")
        return None

    def _probe_all(self) -> None:
        for i in range(len(self.records)):
            try:
                self.probe(i)
            except DecodeError as e:
                self.bad[i] = str(e)
                self.scan_bad[self.records[i]["video_id"]] = str(e)
        self.scanned = len(self.records)

    def _cache_file(self, vid: str) -> Optional[str]:
        if self.cache_root is None:
            return None
        return os.path.join(self.cache_root, str(self.size), id_hash(vid) + ".pt")

    def _load_cached(self, cache_file: str, vid: str, key: str) -> Optional[dict]:
        if not os.path.isfile(cache_file):
            return None
        try:
            d = torch.load(cache_file, weights_only=True)
        except Exception:
            return None   # unreadable cache entry: decode again
        return d if isinstance(d, dict) and d.get("key") == key and d.get("video_id") == vid else None

    def _save_cached(self, cache_file: str, d: dict) -> None:
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            write_private(cache_file, lambda f: torch.save(d, f))
        except OSError as e:   # read-only dataset folder: keep it in memory only
            log_once("cache-ro:" + self.cfg.root, f"decode cache not written under {self.cfg.root!r}: {e}")

    def _decode_audio(self, i: int, vpath: str, apath: Optional[str]) -> torch.Tensor:
        """Normalised fbank (T, mel) fp16 of clip i's audio (file, else the video's track), or
        an empty tensor when it has none (allowed) / zero samples."""
        sr = self.cfg.sample_rate
        if apath is not None:
            wave = load_audio(apath, sr)
        elif not os.path.isdir(vpath):
            wave = load_container_audio(vpath, sr)
        else:
            wave = None
        if wave is None:
            self._no_audio(i, NO_AUDIO)
        elif wave.numel() == 0:
            self._no_audio(i, "has zero samples")
        else:
            return valor_fbank(wave, sr, self.mel_bins).to(torch.float16)
        return torch.zeros(0)

    def decode(self, i: int, indices: Optional[list] = None) -> dict:
        """CPU decode of clip i: {"frames": uint8 (F, 3, S, S), "fbank": (T, mel) fp16 or empty}.
        `indices`: only those frames, in that order (the uncached path; never cached).  Raises
        DecodeError (naming the file) for bad media."""
        vpath, apath = self.paths(i)
        vid = self.records[i]["video_id"]
        cache_file = key = None
        if self.use_cache and indices is None:
            stats = [media_stat(p) for p in (vpath, apath) if p and (is_member(p) or os.path.isfile(p))]
            key = f"v{CACHE_VERSION}|{stats}|{'file' if apath else 'video'}|{self.cfg.sample_rate}|{self.mel_bins}"
            cache_file = self._cache_file(vid)
            d = self._load_cached(cache_file, vid, key) if cache_file else None
            if d is not None:
                return d
        if os.path.isdir(vpath):
            frames = decode_frame_folder(vpath, indices)
        else:
            frames = decode_video(vpath, indices)
        d = {"frames": resize_frames(frames, self.size), "key": key, "video_id": vid,
             "fbank": self._decode_audio(i, vpath, apath)}
        if cache_file:
            self._save_cached(cache_file, d)
        return d

    def _fill_cache(self) -> None:
        from tqdm import tqdm
        for i in tqdm(range(len(self)), desc=f"decode {self.split}", mininterval=2.0, leave=False,
                      disable=len(self) < 64):
            try:
                self._cache[i] = self.decode(i)
            except DecodeError as e:
                self.bad[i] = str(e)
                self.scan_bad[self.records[i]["video_id"]] = str(e)
        self.scanned = len(self)

    def clip(self, i: int) -> dict:
        if i in self._cache:
            return self._cache[i]
        d = self.decode(i)
        if self.use_cache:
            self._cache[i] = d
        return d

    # -- the sampling plan (shared with the DALI path) --
    def n_frames(self) -> int:
        return self.cfg.frames_train if self.train else self.cfg.frames_test

    def draw_video(self, n_total: int, generator: Optional[torch.Generator]):
        """(frame indices, crop window or None, flip) in the shared draw order."""
        idx = sample_indices(n_total, self.n_frames(), self.train, generator)
        window = None
        if self.train and self.cfg.crop_scale_min < 1.0:
            window = crop_window(generator, self.cfg.crop_scale_min)
        flip = bool(self.train and self.cfg.hflip and float(torch.rand((), generator=generator)) < 0.5)
        return idx, window, flip

    def draw_caption(self, i: int, generator: Optional[torch.Generator]) -> int:
        if self.train:
            return int(torch.randint(len(self.records[i]["captions"]), (), generator=generator))
        return 0   # the canonical caption (retrieval uses one caption per clip)

    def text_fields(self, i: int, c: int) -> dict:
        rec = self.records[i]
        return {"ids": self.caption_ids[i][c], "caption": rec["captions"][c], "captions": rec["captions"],
                "qa": rec["qa"], "video_id": rec["video_id"], "index": i}

    # -- samples --
    def resolve(self, i: int, known_bad: Optional[set] = None):
        """Yield the candidates of sample i in order (i first), skipping indices known bad; the
        caller tries each and reports failures in `self.bad`."""
        for j in self.order.candidates(i):
            if j in self.bad or (known_bad is not None and j in known_bad):
                continue
            yield j

    def get(self, i: int, generator: Optional[torch.Generator] = None) -> dict:
        """Sample i, or (bad media) its deterministic replacement; in training its frames, audio
        slices and caption are drawn from `generator`.  Carries n_bad (1 when replaced) and
        bad_media ((id, error) of every bad clip walked past)."""
        walked: List[Tuple[str, str]] = []
        for j in self.order.candidates(i):
            g = generator if j == i else derive_generator(generator, j)
            if j not in self.bad:
                try:
                    if self.use_cache or j in self._cache:
                        d, plan = self.clip(j), None
                    else:
                        # uncached: the plan first (frame count from the packets, as the DALI
                        # path does), then only the planned frames are decoded.  A clip that
                        # fails here is replaced with a generator derived from the seed alone,
                        # so the draws made on g do not matter then
                        v, _ = self.probe(j)
                        plan = self.draw_video(v.n_frames, g)
                        d = self.decode(j, indices=plan[0])
                except DecodeError as e:
                    self.bad[j] = str(e)
            if j in self.bad:
                walked.append((self.records[j]["video_id"], self.bad[j]))
                continue
            s = self._sample(j, d, g, plan)
            s["n_bad"] = int(j != i)
            s["bad_media"] = walked
            return s
        raise BadMediaError(f"{self.split} split: every one of the {len(self)} clips has bad media",
                            {"bad": {v: e for v, e in walked}})

    def _sample(self, i: int, d: dict, g: Optional[torch.Generator], plan=None) -> dict:
        if plan is None:
            idx, window, flip = self.draw_video(d["frames"].shape[0], g)
            frames = d["frames"][idx]                                          # uint8 (n, 3, S, S)
        else:
            _, window, flip = plan          # drawn on g before decoding: d holds those frames
            frames = d["frames"]
        if window is not None:
            # the cached frames are the centred square already at S: the window is cut from it
            # (the DALI path cuts it from the full-resolution frame)
            frames = crop_resize(frames, window)
        video = normalize(frames)
        if flip:
            video = video.flip(-1)
        video = video.to(VIDEO_DTYPES[self.cfg.video_dtype])
        has_audio = d["fbank"].numel() > 0
        if has_audio:
            audio = slice_fbank(d["fbank"].float(), self.cfg.audio_slices, self.train, g)
        else:
            audio = torch.zeros(self.cfg.audio_slices, 512, self.mel_bins)
        c = self.draw_caption(i, g)
        return {"video": video, "audio": audio, "has_audio": has_audio, **self.text_fields(i, c)}

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
            "index": torch.tensor([s["index"] for s in samples]),
            "n_bad": sum(s.get("n_bad", 0) for s in samples),
            "bad_media": [b for s in samples for b in s.get("bad_media", [])]}


def resolve_backend(backend: str, device=None) -> str:
    """auto -> dali when DALI is installed and `device` is CUDA, else cpu (logged once); a forced
    dali without DALI installed raises with the install hint."""
    from ..utils import deps
    if backend not in ("auto", "cpu", "dali"):
        raise ValueError(f"data.backend must be auto, cpu or dali, got {backend!r}")
    cuda = device is not None and torch.device(device).type == "cuda"
    if backend == "dali":
        if not deps.HAS_DALI:
            raise RuntimeError(f"data.backend=dali needs NVIDIA DALI ({deps.INSTALL_HINTS['nvidia.dali']})")
        return "dali"
    if backend == "auto":
        if cuda and deps.HAS_DALI:
            log_once("data-backend", "data.backend=auto: DALI (GPU decoding)")
            return "dali"
        why = "no CUDA device" if not cuda else f"DALI not installed ({deps.INSTALL_HINTS['nvidia.dali']})"
        log_once("data-backend", f"data.backend=auto: cpu ({why})")
    return "cpu"
