"""`valor-fast data check` (scan a dataset for bad media), `valor-fast data pack` (pack a folder
dataset into WebDataset shards) and `valor-fast data bench` (clips/s of each decoding backend)."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import DataConfig
from ..utils.log import get_logger
from .annotations import read_annotations
from .audio import load_audio, load_clip_audio
from .media import find_audio, find_video, probe_audio, probe_video
from .shards import ShardIndex, expand_shards, sample_key
from .video import DecodeError

log = get_logger(__name__)


# -- check -----------------------------------------------------------------------------------

def _check_one(job) -> dict:
    """One clip: probe (headers/packets), then, unless `quick`, a full CPU decode of its video
    and audio.  The audio source is the clip's audio file ("file"), else its video's own audio
    track ("container"), else "none"."""
    vid, vpath, apath, quick, sample_rate, err = job
    row = {"video_id": vid, "video": vpath, "audio": apath, "frames": None, "fps": None, "seconds": None,
           "audio_source": "file" if apath else "none", "audio_seconds": None, "sample_rate": None,
           "error": err, "audio_error": None}
    if err:
        row["audio_source"] = None
        return row
    info = None
    try:
        info = probe_video(vpath, vid)
        row.update(frames=info.n_frames, fps=info.fps, seconds=info.seconds, width=info.width, height=info.height)
        if not quick:
            from .video import decode_frame_folder, decode_video
            fr = decode_frame_folder(vpath) if info.kind == "frames" else decode_video(vpath)
            row["frames"] = int(fr.shape[0])
    except DecodeError as e:
        row["error"] = str(e)
    a = None
    try:
        if apath is not None:
            a = probe_audio(apath)
        elif info is not None and info.audio is not None:
            a, row["audio_source"] = info.audio, "container"
        if a is not None:
            row.update(audio_seconds=a.seconds, sample_rate=a.sample_rate)
            if not quick:
                load_clip_audio(a, sample_rate)
    except DecodeError as e:
        row["audio_error"] = str(e)
    return row


def _job(vid: str, vdir: str, adir: str, root: str, shards, quick: bool, sample_rate: int):
    """The check job of one id: its media looked up (and confined) as training looks them up;
    an unsafe id or path is the job's error."""
    try:
        return (vid, find_video(vdir, vid, shards, root=root), find_audio(adir, vid, shards, root=root),
                quick, sample_rate, None)
    except DecodeError as e:
        return (vid, None, None, quick, sample_rate, str(e))


def _run_jobs(jobs: list, workers: int, desc: str, progress: bool) -> List[dict]:
    from tqdm import tqdm
    bar = dict(total=len(jobs), desc=desc, disable=not progress, mininterval=1.0)
    if workers <= 1 or len(jobs) < 2:
        return [_check_one(j) for j in tqdm(jobs, **bar)]
    # spawn, not fork: a process that already ran DALI pipelines or torch's thread pools holds
    # locks in threads that fork does not copy, and a forked child can hang on them.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(tqdm(ex.map(_check_one, jobs, chunksize=8), **bar))


def _stat(a: np.ndarray):
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())} if a.size else None


def _summarise(rows: List[dict], annotations: Optional[str]) -> dict:
    """A split's (or a folder scan's) report: counts, bad ids with their errors, clips without
    audio, audio sources, duration statistics, and every clip's row."""
    secs = np.array([r["seconds"] for r in rows if r["seconds"]], dtype=np.float64)
    asecs = np.array([r["audio_seconds"] for r in rows if r["audio_seconds"]], dtype=np.float64)
    sources: Dict[str, int] = {}
    for r in rows:
        if r["audio_source"]:
            sources[r["audio_source"]] = sources.get(r["audio_source"], 0) + 1
    return {"annotations": annotations, "clips": len(rows),
            "bad_video": {r["video_id"]: r["error"] for r in rows if r["error"]},
            "bad_audio": {r["video_id"]: r["audio_error"] for r in rows if r["audio_error"]},
            "missing_audio": sorted(r["video_id"] for r in rows if r["audio_source"] == "none"),
            "audio_sources": dict(sorted(sources.items())),
            "video_seconds": _stat(secs), "audio_seconds": _stat(asecs),
            "sample_rates": sorted({r["sample_rate"] for r in rows if r["sample_rate"]}),
            "rows": rows}


def _annotated_splits(root: str, cfg: DataConfig):
    """(split, annotation name, shard globs) of every split whose annotation file exists, each
    annotation file once."""
    seen = set()
    for split, ann in (("train", cfg.train_ann), ("val", cfg.val_ann), ("test", cfg.test_ann)):
        fmt, _, rest = ann.partition(":")
        if ann in seen:
            continue
        if fmt == "shards":
            try:
                expand_shards(root, rest)
            except FileNotFoundError:
                continue
        elif not os.path.exists(os.path.join(root, ann.split(":", 1)[-1].split(",")[0].split("#")[0])):
            continue
        seen.add(ann)
        yield split, ann, [g for g in (cfg.shards, rest if fmt == "shards" else "") if g]


def check_dataset(root: str, cfg: Optional[DataConfig] = None, quick: bool = False, workers: int = 2,
                  progress: bool = True) -> dict:
    """Scan every split whose annotation file exists under `root`; with none, every media file
    under the video and audio folders (`scan_media_folders`, reported as the split "files").
    Returns a report: per split the clip count, bad videos / audio files (id -> error), clips
    without audio, where each clip's audio comes from (file / container / none), duration
    statistics and every clip's row.  `quick`: headers and packets only (no pixel decoding)."""
    cfg = replace(cfg or DataConfig(), root=root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    report: Dict[str, object] = {"root": os.path.abspath(root), "quick": quick, "splits": {}}
    vdir, adir = os.path.join(root, cfg.video_dir), os.path.join(root, cfg.audio_dir)
    for split, ann, globs in _annotated_splits(root, cfg):
        recs = read_annotations(root, ann)
        shards = ShardIndex.load(root, ",".join(globs)) if globs else None
        jobs = [_job(r["video_id"], vdir, adir, root, shards, quick, cfg.sample_rate) for r in recs]
        report["splits"][split] = _summarise(_run_jobs(jobs, workers, f"check {split}", progress), ann)
    if not report["splits"]:
        if not (os.path.isdir(vdir) or os.path.isdir(adir)):
            raise FileNotFoundError(f"{root!r} has no annotation file (data.train_ann / val_ann / test_ann) and no "
                                    f"media folder ({cfg.video_dir!r} or {cfg.audio_dir!r}) to scan")
        scan = scan_media_folders(root, cfg)
        jobs = [_job(vid, vdir, adir, root, None, quick, cfg.sample_rate) for vid in scan["ids"]]
        rows = _run_jobs(jobs, workers, "check files", progress)
        for vid, err in scan["unsafe"].items():
            rows.append(_check_one((vid, None, None, quick, cfg.sample_rate, err)))
        files = _summarise(rows, None)
        files.update(orphan_audio=_check_orphans(scan["orphan_audio"], adir, root, quick, cfg.sample_rate),
                     skipped=scan["skipped"])
        files["bad_audio"].update({v: e for v, e in files["orphan_audio"].items() if e})
        report["splits"]["files"] = files
    report["bad"] = sum(len(s["bad_video"]) + len(s["bad_audio"]) for s in report["splits"].values())
    return report


def _walk_media(folder: str, bases: tuple):
    """(relative path, is a frame folder or file) of every entry under `folder`, following
    symlinked folders only while they resolve inside `bases`; yields (rel, None) for a folder
    that leads out (reported as unsafe)."""
    from .paths import inside
    from .video import IMAGE_EXTS
    seen = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(folder, rel) if rel else folder
        real = os.path.realpath(full)
        if not any(inside(real, b) for b in bases):
            yield rel, None
            continue
        if real in seen:
            continue
        seen.add(real)
        names = sorted(os.listdir(full))
        if rel and any(n.lower().endswith(IMAGE_EXTS) for n in names):
            yield rel, "frames"
            continue
        for n in names:
            p = os.path.join(rel, n) if rel else n
            if os.path.isdir(os.path.join(full, n)):
                stack.append(p)
            else:
                yield p, "file"


def scan_media_folders(root: str, cfg: DataConfig) -> dict:
    """What `data check` scans when there are no annotations: the ids of every video file and
    frame folder under data.video_dir (relative path without extension, the id annotations would
    use), the audio files under data.audio_dir without a video ("orphan_audio"), entries that
    are not media ("skipped") and folders that lead out of the dataset ("unsafe", by id)."""
    from .media import AUDIO_EXTS, VIDEO_EXTS
    from .paths import real_bases
    vdir, adir = os.path.join(root, cfg.video_dir), os.path.join(root, cfg.audio_dir)
    ids, unsafe, skipped, audio = [], {}, [], []
    for folder, exts, out in ((vdir, VIDEO_EXTS, ids), (adir, AUDIO_EXTS, audio)):
        if not os.path.isdir(folder):
            continue
        bases = real_bases(folder, root)
        for rel, kind in _walk_media(folder, bases):
            stem, ext = os.path.splitext(rel)
            if kind is None:
                unsafe[rel] = f"folder {os.path.join(folder, rel)!r} resolves outside the dataset: refused"
            elif kind == "frames" and out is ids:
                out.append(rel)
            elif kind == "file" and ext.lower() in exts:
                out.append(stem)
            else:
                skipped.append(os.path.relpath(os.path.join(folder, rel), root))
    ids = sorted(set(ids))
    have = set(ids)
    return {"ids": ids, "orphan_audio": sorted(set(a for a in audio if a not in have)), "unsafe": unsafe,
            "skipped": sorted(skipped)}


def _check_orphans(ids: List[str], adir: str, root: str, quick: bool, sample_rate: int) -> Dict[str, Optional[str]]:
    """Audio files without a video: id -> None when they decode, else the error."""
    out: Dict[str, Optional[str]] = {}
    for vid in ids:
        try:
            path = find_audio(adir, vid, root=root)
            probe_audio(path)
            if not quick:
                load_audio(path, sample_rate)
            out[vid] = None
        except DecodeError as e:
            out[vid] = str(e)
    return out


def format_check(report: dict) -> str:
    lines = [f"dataset {report['root']} ({'headers only' if report['quick'] else 'full decode'})"]
    for split, s in report["splits"].items():
        vs, as_ = s["video_seconds"], s["audio_seconds"]
        src = ", ".join(f"{k} {v}" for k, v in s.get("audio_sources", {}).items())
        lines.append(f"  {split:5s} {s['clips']:7d} clips | bad video {len(s['bad_video'])} | bad audio "
                     f"{len(s['bad_audio'])} | no audio {len(s['missing_audio'])} | video s "
                     + (f"{vs['min']:.1f}/{vs['median']:.1f}/{vs['max']:.1f}" if vs else "n/a")
                     + " | audio s " + (f"{as_['min']:.1f}/{as_['median']:.1f}/{as_['max']:.1f}" if as_ else "n/a")
                     + f" (min/median/max) | rates {s['sample_rates']} | audio from: {src or 'n/a'}")
        if s["annotations"] is None:
            lines.append(f"    no annotation file: scanned every media file under the video and audio folders "
                         f"({len(s.get('orphan_audio', {}))} audio file(s) without a video, "
                         f"{len(s.get('skipped', []))} other file(s) skipped)")
        for vid, err in list(s["bad_video"].items()) + list(s["bad_audio"].items()):
            lines.append(f"    BAD {vid}: {err}")
        if s["missing_audio"]:
            more = len(s["missing_audio"]) - 10
            lines.append(f"    no audio (trains on video groups only): {', '.join(s['missing_audio'][:10])}"
                         + (f" (+{more})" if more > 0 else ""))
    lines.append(f"{report['bad']} bad file(s)")
    return "\n".join(lines)


# -- bench -----------------------------------------------------------------------------------

def bench_backends(root: str, backends: List[str], batch_size: int = 32, frames: int = 4, size: int = 224,
                   batches: int = 8, device: Optional[str] = None, workers: int = 2, slices: int = 1) -> List[dict]:
    """Clips/s of each backend over `batches` training batches (after one warm-up batch), cache
    off (every batch decodes).  cpu: a DataLoader with `workers` processes; dali: DaliLoader
    on `device` (CUDA: NVDEC/nvJPEG; CPU: DALI's CPU operators)."""
    from .dataset import VideoAudioTextDataset, collate
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = DataConfig(root=root, frames_train=frames, audio_slices=slices, num_workers=workers, cache=False)
    rows = []
    for backend in backends:
        cfg = replace(base, backend=backend)
        ds = VideoAudioTextDataset(cfg, "train", size, train=True, seed=0, cache=False)
        n = min(len(ds) // batch_size, batches + 1)
        if n < 2:
            raise ValueError(f"{root!r}: {len(ds)} training clips is under two batches of {batch_size}")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        keys = [[(i, torch.Generator().manual_seed(i)) for i in order[b * batch_size:(b + 1) * batch_size]]
                for b in range(n)]
        if backend == "dali":
            from .dali_loader import DaliLoader
            it = iter(DaliLoader(ds, keys, device=dev, num_threads=workers))
        elif backend == "cpu":
            class _Keyed(torch.utils.data.Dataset):
                def __len__(self):
                    return len(ds)

                def __getitem__(self, key):
                    return ds.get(*key)
            it = iter(torch.utils.data.DataLoader(_Keyed(), batch_sampler=keys, collate_fn=collate,
                                                  num_workers=workers))
        else:
            raise ValueError(f"unknown backend {backend!r} (cpu | dali)")
        first = next(it)            # warm-up: pipeline build, worker start
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        m = 0
        for b in it:
            b["video"].sum().item()   # the batch is complete (device work done)
            m += 1
        dt = time.perf_counter() - t
        rows.append({"backend": backend, "device": str(dev) if backend == "dali" else "cpu",
                     "workers": workers, "batch": batch_size, "frames": frames, "size": size,
                     "video_shape": list(first["video"].shape), "audio_shape": list(first["audio"].shape),
                     "batches": m, "seconds": dt, "clips_per_s": m * batch_size / dt})
        log.info("data bench %s: %.1f clips/s (%d batches of %d, %d frames at %d px)", backend,
                 rows[-1]["clips_per_s"], m, batch_size, frames, size)
    return rows


def write_frame_folders(src_root: str, dst_root: str, video_dir: str = "videos") -> int:
    """VALOR's layout of pre-extracted frames: every video of `src_root` as a folder of JPEGs
    (<dst>/<video_dir>/<id>/0000.jpg ...), the rest of the dataset copied.  Returns clips written."""
    import shutil
    from fractions import Fraction

    import av

    from .video import decode_video
    shutil.copytree(src_root, dst_root, ignore=shutil.ignore_patterns(".cache", video_dir), dirs_exist_ok=True)
    n = 0
    for name in sorted(os.listdir(os.path.join(src_root, video_dir))):
        vid, ext = os.path.splitext(name)
        out = os.path.join(dst_root, video_dir, vid)
        os.makedirs(out, exist_ok=True)
        for k, fr in enumerate(decode_video(os.path.join(src_root, video_dir, name))):
            c = av.CodecContext.create("mjpeg", "w")
            c.width, c.height, c.pix_fmt, c.time_base = fr.shape[1], fr.shape[0], "yuvj420p", Fraction(1, 25)
            c.options = {"qscale": "2"}
            pk = c.encode(av.VideoFrame.from_ndarray(fr, format="rgb24").reformat(format="yuvj420p")) + c.encode(None)
            with open(os.path.join(out, f"{k:05d}.jpg"), "wb") as f:
                f.write(b"".join(bytes(p) for p in pk))
        n += 1
    return n


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


# -- shards ----------------------------------------------------------------------------------

def write_shards(src_root: str, dst_root: str, per_shard: int = 16, prefix: str = "shard",
                 video_dir: str = "videos", audio_dir: str = "audio", ann: Optional[str] = None) -> List[str]:
    """Pack a folder dataset into WebDataset shards under `dst_root`: each clip's video, audio and
    (with `ann`, an annotation file of src_root) its captions as `<id>.json`."""
    os.makedirs(dst_root, exist_ok=True)
    if ann:
        recs = read_annotations(src_root, ann)
    else:
        ids = sorted({sample_key(n)[0] for n in os.listdir(os.path.join(src_root, video_dir))})
        recs = [{"video_id": i} for i in ids]
    paths = []
    for s in range(0, len(recs), per_shard):
        p = os.path.join(dst_root, f"{prefix}-{s // per_shard:05d}.tar")
        with tarfile.open(p, "w") as tf:
            for r in recs[s:s + per_shard]:
                vid = r["video_id"]
                try:   # the media lookup training uses: an id leading out of the dataset is skipped
                    media = (find_video(os.path.join(src_root, video_dir), vid, root=src_root),
                             find_audio(os.path.join(src_root, audio_dir), vid, root=src_root))
                except DecodeError as e:
                    log.warning("data pack: clip %r skipped: %s", vid, e)
                    continue
                for f in media:
                    if f and os.path.isfile(f):
                        tf.add(f, arcname=vid + os.path.splitext(f)[1])
                if "captions" in r:
                    data = json.dumps({"captions": r["captions"], "qa": r.get("qa", [])}).encode()
                    ti = tarfile.TarInfo(vid + ".json")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        paths.append(p)
    return paths
