"""Inference entry points for users who want captions or features, not training:
`valor-fast caption VIDEO ...` and `valor-fast embed ...`."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .config import Config, load_config
from .utils.log import get_logger

log = get_logger(__name__)


def load_run(ckpt: Optional[str], config: Optional[str], overrides: Optional[dict] = None,
             device: str = "auto") -> Tuple[Config, torch.nn.Module, torch.device]:
    """(cfg, model in eval mode, device) from a checkpoint; the config defaults to the
    config.yaml beside the checkpoint (what the run was trained with)."""
    from .model.convert import load_init
    from .model.valor import build_model
    from .runtime import resolve_device
    if config is None and ckpt:
        cand = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "config.yaml")
        config = cand if os.path.exists(cand) else None
    cfg = load_config(config, overrides or {})
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    model = build_model(cfg.model)
    if ckpt:
        load_init(model, ckpt)
    else:
        log.warning("no checkpoint given: the model is randomly initialised")
    return cfg, model.to(dev).eval(), dev


def _audio_from_container(path: str, sample_rate: int) -> Optional[torch.Tensor]:
    """The first audio stream of a media file as mono float32 at `sample_rate`, or None."""
    import av
    from .data.fbank import resample
    with av.open(path) as c:
        if not c.streams.audio:
            return None
        st = c.streams.audio[0]
        chunks = []
        for fr in c.decode(st):
            raw = fr.to_ndarray()
            a = raw.astype(np.float32)
            if np.issubdtype(raw.dtype, np.integer):
                a = a / float(np.iinfo(raw.dtype).max)
            if fr.format.is_planar:                    # (channels, samples)
                a = a.mean(0)
            else:                                      # packed: (1, samples * channels)
                a = a.reshape(-1, len(fr.layout.channels)).mean(1)
            chunks.append(a)
        if not chunks:
            return None
        wave = torch.from_numpy(np.concatenate(chunks))
        sr = st.rate or st.codec_context.sample_rate
    return resample(wave, sr, sample_rate) if sr != sample_rate else wave


def load_clip(video: str, audio: Optional[str], cfg: Config) -> dict:
    """One clip as a batch of 1, test-time sampling (middle frame of each segment, middle audio
    slice).  Audio: the given WAV/FLAC, else the video's own audio track, else none (T-V only)."""
    from .data.dataset import load_audio
    from .data.fbank import slice_fbank, valor_fbank
    from .data.video import decode_frame_folder, decode_video, normalize, resize_frames, sample_indices
    if not os.path.exists(video):
        raise FileNotFoundError(f"video {video!r} not found")
    frames = decode_frame_folder(video) if os.path.isdir(video) else decode_video(video)
    frames = resize_frames(frames, cfg.model.image_size)
    idx = sample_indices(frames.shape[0], cfg.data.frames_test, False)
    v = normalize(frames[idx])[None]
    wave = load_audio(audio, cfg.data.sample_rate) if audio else _audio_from_container(video, cfg.data.sample_rate)
    if wave is None:
        log.info("%s: no audio track; captioning from the video tokens only", video)
        a = torch.zeros(1, cfg.data.audio_slices, cfg.model.audio_frames, cfg.model.audio_mel_bins)
        has = torch.tensor([False])
    else:
        fb = valor_fbank(wave, cfg.data.sample_rate, cfg.model.audio_mel_bins)
        a = slice_fbank(fb.float(), cfg.data.audio_slices, False)[None]
        has = torch.tensor([True])
    return {"video": v, "audio": a, "has_audio": has}


@torch.no_grad()
def caption_files(model, cfg: Config, device, videos: List[str], audios: Optional[List[str]] = None,
                  beam: Optional[int] = None, source: Optional[str] = None) -> Dict[str, str]:
    """A caption per video file; non-finite decoder memory (a broken model) raises
    NonFiniteScoresError naming `source` (the checkpoint) and the file."""
    from .eval.caption import generate
    from .eval.metrics import check_finite
    from .tasks.mgc import group_memory_masks
    out = {}
    for i, path in enumerate(videos):
        clip = load_clip(path, audios[i] if audios else None, cfg)
        vt = model.encode_video(clip["video"].to(device))
        at = model.encode_audio(clip["audio"].to(device))
        memory, n_video = model.memory(vt, at)
        check_finite(memory, f"decoder memory of {path}", source)
        group = cfg.eval.caption_group if bool(clip["has_audio"]) else "tv"
        mm = group_memory_masks([group], 1, n_video, memory.shape[1] - n_video, clip["has_audio"].to(device), device)
        out[path] = generate(model, memory, mm, cfg.eval, beam=beam)[0]
    return out


@torch.no_grad()
def embed_split(model, cfg: Config, device, split: str, batch_size: int = 64,
                source: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Contrastive-space features of every clip of a split: text (first caption), video (per
    frame + pooled), audio (per slice + pooled) and the fused audiovisual feature, all L2-normalised,
    in the order of the split's annotations.  Non-finite features raise NonFiniteScoresError
    naming `source` (the checkpoint): a broken model's features are never written."""
    from .data import build_loader
    from .eval.metrics import check_finite
    loader = build_loader(cfg.data, split, cfg.model.image_size, batch_size, False, cfg.train.seed,
                          mel_bins=cfg.model.audio_mel_bins)
    parts: Dict[str, list] = {k: [] for k in ("text", "video", "video_frames", "audio", "audio_slices", "av")}
    ids: List[str] = []
    for b in loader:
        vt = model.encode_video(b["video"].to(device))
        at = model.encode_audio(b["audio"].to(device))
        th = model.encode_text(b["text_ids"].to(device), b["text_mask"].to(device))
        t = model.text_features(th, b["text_mask"].to(device))
        v, a = model.video_features(vt), model.audio_features(at)
        parts["text"].append(t.pooled)
        parts["video"].append(v.pooled)
        parts["video_frames"].append(v.tokens)
        parts["audio"].append(a.pooled)
        parts["audio_slices"].append(a.tokens)
        parts["av"].append(model.av_pooled(v, a))
        ids.extend(b["video_id"])
    out = {k: torch.cat(v).float().cpu().contiguous() for k, v in parts.items()}
    for k, v in out.items():
        check_finite(v, f"{k} embeddings", source)
    out["_ids"] = ids   # type: ignore[assignment]
    return out


def save_features(feats: dict, path: str) -> None:
    """.safetensors (video ids in the metadata) or .npz (ids as an array)."""
    ids = feats.pop("_ids")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(feats, path, metadata={"video_ids": json.dumps(ids)})
    elif path.endswith(".npz") or path.endswith(".npy"):
        if path.endswith(".npy"):
            path = path[:-4] + ".npz"   # several arrays: numpy's archive format
            log.info("several arrays: writing %s", path)
        np.savez(path, video_ids=np.asarray(ids), **{k: v.numpy() for k, v in feats.items()})
    else:
        raise ValueError(f"--out must end in .safetensors or .npz, got {path!r}")
    feats["_ids"] = ids
