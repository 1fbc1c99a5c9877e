"""The DALI backend: video / JPEG-frame decoding and resizing in NVIDIA DALI, audio features on the
device with torch ops, batches identical in structure to the CPU path's `collate`.

Per batch (B clips, n frames each, S px, audio at `data.sample_rate`):
  1. plan (host, Python): each sample's media are probed from headers/packets (cached per
     index), bad ones replaced (`media.py`), and the sample's draws made in the shared order
     (`VideoAudioTextDataset.draw_video`): frame indices, crop window, flip;
  2. video files: one DALI run decodes only the planned frames of every clip
     (`decoders.video(frames=...)`: NVDEC on a GPU, libavcodec for VP8/VP9 on the CPU) and
     resizes each clip's region (the centred square, or the crop window inside it) to S x S
     with an antialiased linear filter -> uint8 (B, n, S, S, 3); JPEG frame folders go through
     `decoders.image` (nvJPEG, "mixed", on a GPU) the same way;
  3. audio: DALI decodes WAV/FLAC on the CPU (it has no GPU audio decoder; any PCM or float
     sample format, as float), a clip without an audio file has its video's own track (AAC in
     MP4, which DALI's decoder lacks) decoded by PyAV on the CPU (`audio.read_container_audio`);
     the waveforms move to the device, are resampled there (`fbank.resample`, bounded memory),
     padded to (B, N), and `fbank.valor_fbank_batched`
     computes the Kaldi fbank (FFT + mel matmul, fp32 without TF32) -> the 512-frame slice
     windows are drawn (shared order) and gathered -> (B, slices, 512, mel);
  4. captions: drawn (shared order); token ids were cached at construction.
A sample DALI fails on is isolated (the batch is re-run one clip at a time), marked bad, and
replaced like any other bad clip.  With no GPU the same pipeline runs DALI's CPU operators
(device_id None): this is what CI checks against the CPU path.

A background thread prepares the next `prefetch` batches while the model trains (DALI and the
device ops release the GIL)."""
from __future__ import annotations

import os
import queue
import threading
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ..utils.log import get_logger, log_once
from .audio import check_decoded, read_container_audio
from .dataset import VIDEO_DTYPES, VideoAudioTextDataset
from .fbank import resample, slice_fbank_batched, slice_windows, valor_fbank_batched
from .media import BadMediaError, derive_generator
from .shards import is_member, media_bytes
from .tokenizer import pad_ids
from .video import DecodeError, normalize, square_roi

log = get_logger(__name__)

Key = Tuple[int, Optional[torch.Generator]]


def _dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise RuntimeError("data.backend=dali needs NVIDIA DALI (pip install nvidia-dali-cuda130)") from e
    return fn, pipeline_def, types


class _Pipes:
    """The three DALI pipelines, built lazily and rebuilt after a failed run (a pipeline that
    raised is not trusted to run again)."""

    def __init__(self, batch: int, frames: int, size: int, device_id: Optional[int], threads: int):
        self.batch, self.frames, self.size, self.dev, self.threads = batch, frames, size, device_id, threads
        self._p: Dict[str, object] = {}

    def get(self, kind: str):
        if kind not in self._p:
            self._p[kind] = getattr(self, "_build_" + kind)()
        return self._p[kind]

    def drop(self, kind: str) -> None:
        self._p.pop(kind, None)

    def _decorate(self, max_batch):
        _, pipeline_def, _ = _dali()
        return pipeline_def(batch_size=max_batch, num_threads=self.threads, device_id=self.dev,
                            exec_dynamic=True, prefetch_queue_depth=1)

    def _resize(self, x, fn, types):
        rs = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        re = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        return fn.resize(x, size=[self.size, self.size], roi_start=rs, roi_end=re, roi_relative=True,
                         antialias=True, interp_type=types.INTERP_LINEAR)

    def _build_video(self):
        fn, _, types = _dali()
        gpu = self.dev is not None

        @self._decorate(self.batch)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            idx = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            # pad_mode edge: a header that over-counts frames repeats the last one, as the CPU
            # path's sample_indices does for short clips
            v = fn.decoders.video(enc, frames=idx, pad_mode="edge", device="mixed" if gpu else "cpu")
            return self._resize(v, fn, types)                                   # (n, S, S, 3) uint8

        p = pipe()
        p.build()
        return p

    def _build_jpeg(self):
        fn, _, types = _dali()
        gpu = self.dev is not None

        @self._decorate(self.batch * self.frames)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
            return self._resize(img, fn, types)                                 # (S, S, 3) uint8

        p = pipe()
        p.build()
        return p

    def _build_audio(self):
        fn, _, types = _dali()

        @self._decorate(self.batch)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # CPU only in DALI; native rate (resampled on the device, as the CPU path does)
            wave, sr = fn.decoders.audio(enc, dtype=types.FLOAT, downmix=True)
            return wave, sr

        p = pipe()
        p.build()
        return p


def _read(path: str) -> np.ndarray:
    """Encoded bytes for DALI's decoders (a plain file or a tar-shard member)."""
    if is_member(path):
        return np.frombuffer(media_bytes(path), dtype=np.uint8)
    return np.fromfile(path, dtype=np.uint8)


class DaliLoader:
    """Iterable of collated batches from `batches` (lists of (index, generator or None)).
    `device`: where batches land (CUDA: GPU decoders; CPU: DALI's CPU operators)."""

    def __init__(self, ds: VideoAudioTextDataset, batches: Iterable[List[Key]], device=None,
                 num_threads: int = 2, prefetch: int = 2, batch_size: Optional[int] = None):
        self.ds, self.batches = ds, batches
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        gpu = self.device.type == "cuda"
        dev_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        if batch_size is None:
            try:
                batch_size = max(len(b) for b in batches)   # a list of batches
            except TypeError:
                raise ValueError("DaliLoader over a stream of batches needs batch_size") from None
        self.pipes = _Pipes(batch_size, ds.n_frames(), ds.size, dev_id, num_threads)
        self.prefetch = prefetch
        self._probes: Dict[int, tuple] = {}
        log_once("dali-backend", f"DALI data path: {'GPU decoders (NVDEC/nvJPEG) on ' + str(self.device) if gpu else 'CPU operators'}"
                                 f", fbank on {self.device}")

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if self.prefetch <= 0:
            for keys in self.batches:
                yield self.make_batch(keys)
            return
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def work():
            try:
                for keys in self.batches:
                    if stop.is_set():
                        return
                    q.put(self.make_batch(keys))
                q.put(done)
            except BaseException as e:   # handed to the consumer, raised there
                q.put(e)

        t = threading.Thread(target=work, daemon=True, name="dali-prefetch")
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    # -- planning --
    def _probe(self, j: int):
        if j not in self._probes:
            self._probes[j] = self.ds.probe(j)
        return self._probes[j]

    def _next_good(self, cands, walked: List[Tuple[str, str]]):
        """The next candidate index whose probe passes (bad ones recorded and walked past)."""
        ds = self.ds
        for j in cands:
            if j not in ds.bad:
                try:
                    return j, self._probe(j)
                except DecodeError as e:
                    ds.bad[j] = str(e)
            walked.append((ds.records[j]["video_id"], ds.bad[j]))
        raise BadMediaError(f"{ds.split} split: every one of the {len(ds)} clips has bad media",
                            {"bad": dict(walked)})

    # -- decoding --
    def _run(self, kind: str, feeds: Dict[str, list]):
        p = self.pipes.get(kind)
        for name, data in feeds.items():
            p.feed_input(name, data)
        try:
            return p.run()
        except Exception:
            self.pipes.drop(kind)
            raise

    def _isolated(self, kind: str, groups: List[Dict[str, list]]):
        """Run each group (one clip's inputs) in one DALI batch; on failure re-run them one at a
        time -> per group: outputs (tuple of per-sample arrays/tensors, in group order) or the
        error message."""
        def run(gs):
            feeds = {k: [x for g in gs for x in g[k]] for k in gs[0]}
            outs = self._run(kind, feeds)
            res, k = [], 0
            for g in gs:
                n = len(next(iter(g.values())))
                res.append((outs, k, n))
                k += n
            return res
        try:
            return run(groups)
        except Exception as e:
            if len(groups) == 1:
                return [f"DALI {kind} decode failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
        out = []
        for g in groups:
            try:
                out.extend(run([g]))
            except Exception as e:
                out.append(f"DALI {kind} decode failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return out

    def _decode_video(self, slots: List[int], plans) -> Dict[int, object]:
        """-> {slot: uint8 (n, S, S, 3) tensor on the device, or an error string}."""
        res: Dict[int, object] = {}
        files = [b for b in slots if plans[b]["vinfo"].kind == "file"]
        folders = [b for b in slots if plans[b]["vinfo"].kind == "frames"]
        if files:
            groups = []
            for b in files:
                pl = plans[b]
                st, en = square_roi(pl["vinfo"].height, pl["vinfo"].width, pl["window"])
                groups.append({"encoded": [_read(pl["vinfo"].path)], "frames": [np.asarray(pl["idx"], np.int32)],
                               "roi_start": [np.asarray(st, np.float32)], "roi_end": [np.asarray(en, np.float32)]})
            for b, r in zip(files, self._isolated("video", groups)):
                if isinstance(r, str):
                    res[b] = r
                    continue
                (out,), k, _ = r
                res[b] = _to_torch_sample(out, k, self.device)
        if folders:
            groups = []
            for b in folders:
                pl = plans[b]
                vi = pl["vinfo"]
                st, en = square_roi(vi.height, vi.width, pl["window"])
                names = [vi.files[min(i, len(vi.files) - 1)] for i in pl["idx"]]
                groups.append({"encoded": [_read(os.path.join(vi.path, n)) for n in names],
                               "roi_start": [np.asarray(st, np.float32)] * len(names),
                               "roi_end": [np.asarray(en, np.float32)] * len(names)})
            for b, r in zip(folders, self._isolated("jpeg", groups)):
                if isinstance(r, str):
                    res[b] = r
                    continue
                (out,), k, n = r
                frames = [_to_torch_sample(out, k + m, self.device) for m in range(n)]
                if len({tuple(f.shape) for f in frames}) != 1:
                    res[b] = f"frame folder {plans[b]['vinfo'].path!r}: frames of different channel counts"
                    continue
                res[b] = torch.stack(frames)
        return res

    def _decode_audio(self, slots: List[int], plans) -> Dict[int, object]:
        """-> {slot: (float32 waveform (N,) on the CPU at its own rate, that rate), or an error
        string}.  Audio files go through DALI's decoder (CPU only; WAV/FLAC, every sample format
        as float); a clip whose audio is its video's own track (AAC in MP4, which DALI cannot
        decode) through the CPU path's PyAV decoder."""
        res: Dict[int, object] = {}
        have = [b for b in slots if plans[b]["ainfo"] is not None]
        for b in [b for b in have if plans[b]["ainfo"].source == "container"]:
            try:
                got = read_container_audio(plans[b]["ainfo"].path)
                res[b] = got if got is not None else (torch.zeros(0), plans[b]["ainfo"].sample_rate)
            except DecodeError as e:
                res[b] = str(e)
        files = [b for b in have if plans[b]["ainfo"].source != "container"]
        if not files:
            return res
        groups = [{"encoded": [_read(plans[b]["ainfo"].path)]} for b in files]
        for b, r in zip(files, self._isolated("audio", groups)):
            if isinstance(r, str):
                res[b] = r
                continue
            (wave, sr), k, _ = r
            w = torch.from_numpy(np.array(wave[k]).reshape(-1).astype(np.float32))
            try:
                check_decoded(plans[b]["ainfo"].path, w)
            except DecodeError as e:
                res[b] = str(e)
                continue
            res[b] = (w, int(np.array(sr[k]).reshape(-1)[0]))
        return res

    # -- batches --
    def make_batch(self, keys: List[Key]) -> dict:
        ds, cfg = self.ds, self.ds.cfg
        B = len(keys)
        cands = [ds.order.candidates(i) for i, _ in keys]
        walked: List[List[Tuple[str, str]]] = [[] for _ in range(B)]
        js, gens, plans = [0] * B, [None] * B, [None] * B
        video: Dict[int, torch.Tensor] = {}
        audio: Dict[int, Optional[tuple]] = {}
        todo = list(range(B))
        while todo:
            for b in todo:
                j, (vinfo, ainfo) = self._next_good(cands[b], walked[b])
                i, g = keys[b]
                js[b], gens[b] = j, (g if j == i else derive_generator(g, j))
                idx, window, flip = ds.draw_video(vinfo.n_frames, gens[b])
                plans[b] = {"vinfo": vinfo, "ainfo": ainfo, "idx": idx, "window": window, "flip": flip}
            v = self._decode_video(todo, plans)
            a = self._decode_audio(todo, plans)
            failed = []
            for b in todo:
                err = v[b] if isinstance(v[b], str) else (a[b] if isinstance(a.get(b), str) else None)
                if err is not None:
                    ds.bad[js[b]] = err
                    walked[b].append((ds.records[js[b]]["video_id"], err))
                    failed.append(b)
                    continue
                video[b] = v[b]
                audio[b] = a.get(b)
            todo = failed

        # video: uint8 (B, n, S, S, 3) -> normalised (B, n, 3, S, S), flipped per clip
        vid = torch.stack([video[b] for b in range(B)]).permute(0, 1, 4, 2, 3)
        vid = normalize(vid)
        flips = torch.tensor([plans[b]["flip"] for b in range(B)], device=vid.device)
        if bool(flips.any()):
            vid = torch.where(flips.view(B, 1, 1, 1, 1), vid.flip(-1), vid)
        vid = vid.to(VIDEO_DTYPES[cfg.video_dtype])

        # audio: resample + fbank on the device, then the slice windows in the shared draw order
        S, mel, sr_t = cfg.audio_slices, ds.mel_bins, cfg.sample_rate
        has_audio = [audio[b] is not None and audio[b][0].numel() > 0 for b in range(B)]
        for b in range(B):
            if audio[b] is not None and not has_audio[b]:
                ds._no_audio(js[b], "has zero samples")
        aud = torch.zeros(B, S, 512, mel, device=self.device)
        ab = [b for b in range(B) if has_audio[b]]
        if ab:
            waves = []
            for b in ab:
                w, sr = audio[b]
                w = w.to(self.device)
                waves.append(resample(w, sr, sr_t) if sr != sr_t else w)
            lengths = torch.tensor([w.numel() for w in waves])
            padded = torch.zeros(len(ab), int(lengths.max()), device=self.device)
            for r, w in enumerate(waves):
                padded[r, :w.numel()] = w
            fb, nfr = valor_fbank_batched(padded, lengths, sr_t, mel)
            wins = [slice_windows(int(nfr[r]), S, ds.train, gens[b]) for r, b in enumerate(ab)]
            aud[torch.tensor(ab, device=self.device)] = slice_fbank_batched(fb, nfr, wins).float()

        # captions (after the audio draws, as on the CPU path)
        samples = [ds.text_fields(js[b], ds.draw_caption(js[b], gens[b])) for b in range(B)]
        ids, mask = pad_ids([s["ids"] for s in samples])
        return {"video": vid, "audio": aud, "has_audio": torch.tensor(has_audio),
                "text_ids": ids, "text_mask": mask,
                "video_id": [s["video_id"] for s in samples], "caption": [s["caption"] for s in samples],
                "captions": [s["captions"] for s in samples], "qa": [s["qa"] for s in samples],
                "index": torch.tensor([s["index"] for s in samples]),
                "n_bad": sum(int(js[b] != keys[b][0]) for b in range(B)),
                "bad_media": [x for w in walked for x in w]}


def _to_torch_sample(tl, k: int, device: torch.device) -> torch.Tensor:
    """Sample k of a DALI TensorList (CPU or GPU) -> a torch tensor on `device`."""
    t = tl[k]
    if type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(t)).to(device)
