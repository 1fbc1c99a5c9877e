"""Bad input on the data side (issue 16): ids that would escape the data root, float WAVs,
audio inside the video container, truncated containers, annotation files checked at start-up,
`data check` on a folder without annotations, and resampling on every audio path.

Media are tiny (1 s, 32 x 32, 8 fps) and written here, so the module runs in seconds."""
import io
import json
import os
import re
import shutil
import tarfile
from fractions import Fraction

import numpy as np
import pytest
import torch

from valor_fast.config import DataConfig
from valor_fast.data.dataset import VideoAudioTextDataset, collate
from valor_fast.data.fbank import resample, valor_fbank
from valor_fast.data.media import probe_video
from valor_fast.data.synth import write_webm
from valor_fast.data.video import DecodeError
from valor_fast.utils import deps

needs_dali = pytest.mark.skipif(not deps.HAS_DALI, reason="nvidia-dali not installed (pip install nvidia-dali-cuda130)")
SIZE, FPS, SR = 32, 8, 16000
# the fbank is normalised as (log mel - mean) / (2 std): one natural-log unit of power (4.3 dB)
# is 1 / 9.138 = 0.109 normalised units
NAT_LOG = 1.0 / (2 * 4.5689974)


def _frames(seed=0, n=FPS):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _tone(sr, seconds=1.0, f0=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 1500.0 * t)).astype(np.float32)


def _write_wav(path, x, sr, subtype="PCM_16"):
    import soundfile as sf
    sf.write(path, x, sr, subtype=subtype)


def _write_mp4(path, frames, fps, audio=None, sr=44100, faststart=False, codec=None):
    """H.264 (MPEG-4 part 2 where this PyAV has no libx264) + an optional AAC track of `audio`."""
    import av
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    with av.open(path, "w", format="mp4", options={"movflags": "+faststart"} if faststart else {}) as c:
        vs = c.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        ast = None
        if audio is not None:
            ast = c.add_stream("aac", rate=sr)
            ast.layout, ast.bit_rate = "mono", 128000
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if ast is not None:
            for k in range(0, len(audio), 1024):
                af = av.AudioFrame.from_ndarray(audio[None, k:k + 1024], format="flt", layout="mono")
                af.sample_rate, af.pts, af.time_base = sr, k, Fraction(1, sr)
                for p in ast.encode(af):
                    c.mux(p)
            for p in ast.encode():
                c.mux(p)


def _dataset_root(root, ids, **media):
    """<root>/{videos,audios}, train/val/test.jsonl listing `ids` (two captions each)."""
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    os.makedirs(os.path.join(root, "audios"), exist_ok=True)
    for split in ("train", "val", "test"):
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            for vid in ids:
                f.write(json.dumps({"video_id": vid, "captions": [f"clip {vid}", f"another {vid}"]}) + "\n")
    return root


def _tree(folder, skip=()):
    """{relative path: bytes} of every file under `folder` (symlinks not followed)."""
    out = {}
    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if os.path.join(d, x) not in skip]
        for n in files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read() if not os.path.islink(p) else b"->"
    return out


# -- 1. ids never escape the data root -----------------------------------------------------------
@pytest.fixture
def escape_root(tmp_path):
    """base/ds: 3 good clips; base/victim/clip.webm|wav outside it; ids reaching the victim
    by '..', by an absolute path, through a symlinked videos/ subfolder, and a clip whose audio
    file is a symlink to the victim's."""
    base = tmp_path
    victim = base / "victim"
    victim.mkdir()
    write_webm(str(victim / "clip.webm"), _frames(9), FPS)
    _write_wav(str(victim / "clip.wav"), _tone(SR), SR)
    good = ["g0", "g1", "g2"]
    unsafe = {"dotdot": "../../victim/clip", "absolute": str(victim / "clip"), "symlink": "linked/clip",
              "audio_symlink": "ga"}
    root = _dataset_root(str(base / "ds"), good + list(unsafe.values()))
    write_webm(os.path.join(root, "videos", "ga.webm"), _frames(5), FPS)       # its own video,
    os.symlink(str(victim / "clip.wav"), os.path.join(root, "audios", "ga.wav"))   # someone else's audio
    for k, vid in enumerate(good):
        write_webm(os.path.join(root, "videos", vid + ".webm"), _frames(k), FPS)
        _write_wav(os.path.join(root, "audios", vid + ".wav"), _tone(SR, f0=300 + 100 * k), SR)
    os.symlink(str(victim), os.path.join(root, "videos", "linked"))
    os.symlink(str(victim), os.path.join(root, "audios", "linked"))
    return root, str(victim), good, unsafe


@pytest.mark.parametrize("cache", [True, False])
def test_ids_never_escape_the_root(escape_root, cache):
    root, victim, good, unsafe = escape_root
    outside_before = _tree(os.path.dirname(root), skip=(root,))
    inside_before = _tree(root, skip=(os.path.join(root, ".cache"),))
    ds = VideoAudioTextDataset(DataConfig(root=root, cache=cache), "train", SIZE, train=True, seed=0)
    ids = [r["video_id"] for r in ds.records]
    got, walked = [], {}
    for i in range(len(ds)):
        s = ds.get(i, torch.Generator().manual_seed(i))
        got.append(s["video_id"])
        walked.update(dict(s["bad_media"]))
    # every unsafe id is bad media, reported by id, replaced by a good clip; good ones pass
    for kind, vid in unsafe.items():
        assert vid in walked, (kind, walked)
        assert repr(vid) in walked[vid] and ("outside the dataset" in walked[vid] or "refused" in walked[vid])
        assert vid not in got
    assert set(got) <= set(good) and [g for g, i in zip(got, ids) if i in good] == [i for i in ids if i in good]
    if cache:   # found by the start-up decode
        assert set(ds.scan_bad) == set(unsafe.values())
    # nothing was written outside the root, nor anywhere in it but the cache
    assert _tree(os.path.dirname(root), skip=(root,)) == outside_before
    assert _tree(root, skip=(os.path.join(root, ".cache"),)) == inside_before
    if cache:
        # cache entries are named by a hash of the id and hold the id
        from valor_fast.data.paths import id_hash
        entries = sorted(os.listdir(os.path.join(root, ".cache", str(SIZE))))
        assert entries == sorted(id_hash(v) + ".pt" for v in good)
        d = torch.load(os.path.join(root, ".cache", str(SIZE), id_hash("g1") + ".pt"), weights_only=True)
        assert d["video_id"] == "g1"


def test_unsafe_ids_in_eval_splits_and_data_check(escape_root, tmp_path):
    root, victim, good, unsafe = escape_root
    ds = VideoAudioTextDataset(DataConfig(root=root, cache=False), "test", SIZE, train=False)
    assert [r["video_id"] for r in ds.records] == good          # dropped at construction, logged
    from valor_fast.data.tools import check_dataset
    rep = check_dataset(root, quick=True, workers=1, progress=False)
    assert set(rep["splits"]["train"]["bad_video"]) == set(unsafe.values())
    # a `.cache` symlink leading out of the root is not written through
    shutil.rmtree(os.path.join(root, ".cache"), ignore_errors=True)
    os.symlink(str(tmp_path / "elsewhere"), os.path.join(root, ".cache"))
    os.makedirs(tmp_path / "elsewhere")
    ds = VideoAudioTextDataset(DataConfig(root=root, cache=True), "test", SIZE, train=False)
    assert ds.cache_root is None and os.listdir(tmp_path / "elsewhere") == []
    assert len(ds) == len(good)


def test_id_rules_and_private_writes(tmp_path):
    from valor_fast.data.paths import UnsafePathError, check_id, write_private
    for bad in ("", "../x", "a/../../x", "/etc/passwd", "a\x00b", "s.tar::m", "..\\x"):
        with pytest.raises(UnsafePathError):
            check_id(bad)
    for ok in ("video12", "clips/abc", "a..b", "./x", "YT_0.000_10.000"):
        assert check_id(ok) == ok
    # a symlink planted at the target is replaced, never written through
    target, victim = tmp_path / "entry.pt", tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(str(victim), str(target))
    write_private(str(target), lambda f: f.write(b"cache"))
    assert victim.read_text() == "precious" and not target.is_symlink() and target.read_bytes() == b"cache"
    assert sorted(os.listdir(tmp_path)) == ["entry.pt", "victim.txt"]


def test_shard_member_names_are_confined(tmp_path):
    from valor_fast.data.shards import ShardIndex
    src = tmp_path / "v.webm"
    write_webm(str(src), _frames(), FPS)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        for name in ("ok.webm", "../evil.webm", "/abs/evil.webm", "a/../../evil.webm"):
            ti = tarfile.TarInfo(name)
            data = src.read_bytes()
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        cap = json.dumps({"captions": ["x"]}).encode()
        for name in ("ok.json", "../evil.json"):
            ti = tarfile.TarInfo(name)
            ti.size = len(cap)
            tf.addfile(ti, io.BytesIO(cap))
    idx = ShardIndex([str(shard)])
    assert set(idx.samples) == {"ok"}
    assert [r["video_id"] for r in idx.records()] == ["ok"]
    assert len(idx.unsafe) == 4 and all("evil" in k for k in idx.unsafe)


# -- 2. float WAVs (and every PCM width) at full precision -------------------------------------
@pytest.mark.parametrize("subtype,atol", [("FLOAT", 1e-7), ("DOUBLE", 1e-7), ("PCM_32", 1e-7),
                                          ("PCM_24", 1e-6), ("PCM_16", 4e-5), ("PCM_U8", 9e-3)])
def test_wav_sample_formats_decode_at_full_precision(tmp_path, subtype, atol):
    from valor_fast.data.dataset import load_audio
    x = _tone(SR, 0.5)
    p = str(tmp_path / f"a_{subtype}.wav")
    _write_wav(p, x, SR, subtype)
    w = load_audio(p, SR)
    assert w.dtype == torch.float32 and w.shape == (x.size,)
    torch.testing.assert_close(w, torch.from_numpy(x), atol=atol, rtol=0)


def test_float_wav_silence_and_nan_checks(tmp_path):
    from valor_fast.data.audio import check_decoded, load_audio
    x = _tone(SR, 0.5)
    loud, quiet, nan = (str(tmp_path / n) for n in ("loud.wav", "quiet.wav", "nan.wav"))
    _write_wav(loud, x, SR, "FLOAT")
    _write_wav(quiet, np.zeros_like(x), SR, "FLOAT")
    y = x.copy()
    y[100] = np.nan
    _write_wav(nan, y, SR, "FLOAT")
    # a decoder returning zeros for a file whose stored samples are not silent is an error
    with pytest.raises(DecodeError, match="all zeros"):
        check_decoded(loud, torch.zeros(x.size))
    check_decoded(quiet, torch.zeros(x.size))                     # a truly silent file is fine
    assert load_audio(quiet, SR).abs().max() == 0
    with pytest.raises(DecodeError, match="non-finite"):
        load_audio(nan, SR)
    _write_wav(str(tmp_path / "u8.wav"), np.zeros_like(x), SR, "PCM_U8")   # 8-bit silence is 0x80
    check_decoded(str(tmp_path / "u8.wav"), torch.zeros(x.size))


# -- 3. audio inside the video container ---------------------------------------------------------
@pytest.fixture(scope="module")
def container_root(tmp_path_factory):
    """c_aac: MP4 with an AAC track of a 44.1 kHz tone and no WAV; c_wav: the same tone as a
    float32 WAV beside a WebM; c_none: a WebM without audio."""
    root = _dataset_root(str(tmp_path_factory.mktemp("ca") / "ds"), ["c_aac", "c_wav", "c_none"])
    tone = _tone(44100)
    _write_mp4(os.path.join(root, "videos", "c_aac.mp4"), _frames(1), FPS, audio=tone, sr=44100)
    write_webm(os.path.join(root, "videos", "c_wav.webm"), _frames(2), FPS)
    _write_wav(os.path.join(root, "audios", "c_wav.wav"), tone, 44100, "FLOAT")
    write_webm(os.path.join(root, "videos", "c_none.webm"), _frames(3), FPS)
    return root, tone


def _strong(ref):
    """Bins within 40 dB of the clip's loudest bin, frames away from the edges."""
    thr = 40 * np.log(10) / 10 * NAT_LOG
    m = ref > ref.max() - thr
    m[:3], m[-3:] = False, False
    return m


def _assert_aac_matches_wav(fa, fw):
    # AAC (ffmpeg's encoder, 128 kb/s mono) keeps a tone's partials; the bins far below them hold
    # the codec's shaped quantisation noise, which a perceptual coder is free to move, so only
    # bins within 40 dB of the clip's peak are compared.  Measured on this tone: max 0.030
    # normalised units (1.2 dB of power, in bins near the 40 dB line where the codec noise is
    # closest), mean 0.00045, fp16 storage included.  Bounds: max 0.06 (2x), mean 0.005 (10x);
    # a silent or wrongly decoded track misses both by orders of magnitude (a zero track sits at
    # the log floor, ~1.5 units below).
    n = min(fa.shape[0], fw.shape[0])
    assert abs(fa.shape[0] - fw.shape[0]) <= 1, (fa.shape, fw.shape)
    fa, fw = fa[:n].double(), fw[:n].double()
    m = torch.from_numpy(_strong(fw.numpy()))
    assert int(m.sum()) > 100
    d = (fa - fw).abs()[m]
    assert d.max() < 0.06 and d.mean() < 0.005, (d.max(), d.mean())


@pytest.mark.parametrize("cache", [False, True])
def test_container_aac_audio_is_used_without_a_wav(container_root, cache):
    root, tone = container_root
    ds = VideoAudioTextDataset(DataConfig(root=root, cache=cache), "test", SIZE, train=False)
    i = {r["video_id"]: k for k, r in enumerate(ds.records)}
    v, a = ds.probe(i["c_aac"])
    assert a is not None and a.source == "container" and a.sample_rate == 44100 and v.kind == "file"
    assert ds.probe(i["c_wav"])[1].source == "file" and ds.probe(i["c_none"])[1] is None
    b = collate([ds[k] for k in range(len(ds))])
    has = dict(zip(b["video_id"], b["has_audio"].tolist()))
    assert has == {"c_aac": True, "c_wav": True, "c_none": False}
    fa = ds.decode(i["c_aac"])["fbank"].float()
    ref = valor_fbank(resample(torch.from_numpy(tone.astype(np.float64)), 44100, SR), SR).float()
    _assert_aac_matches_wav(fa, ref)
    # the same tone from the float WAV: the reference itself within fp16 storage
    fw = ds.decode(i["c_wav"])["fbank"].float()
    torch.testing.assert_close(fw, ref, atol=2e-3, rtol=0)


def test_data_check_reports_audio_sources(container_root):
    from valor_fast.data.tools import check_dataset, format_check
    root, _ = container_root
    rep = check_dataset(root, workers=1, progress=False)
    s = rep["splits"]["test"]
    assert rep["bad"] == 0 and s["audio_sources"] == {"container": 1, "file": 1, "none": 1}
    src = {r["video_id"]: r["audio_source"] for r in s["rows"]}
    assert src == {"c_aac": "container", "c_wav": "file", "c_none": "none"}
    assert s["missing_audio"] == ["c_none"] and 44100 in s["sample_rates"]
    assert "audio from: container 1, file 1, none 1" in format_check(rep)


@needs_dali
def test_dali_path_decodes_container_and_float_audio(tmp_path, monkeypatch):
    """DALI's audio decoder has no AAC: the container's track goes through the CPU decoder;
    the float WAV through DALI's (which reads float samples as float); both resampled with
    fbank.resample, as the CPU path does.  (VP9 in the MP4 here: DALI's CPU video decoder has
    no H.264; on a GPU, NVDEC decodes it.)"""
    import valor_fast.data.dali_loader as DL
    from valor_fast.data.dali_loader import DaliLoader
    calls = []
    real = DL.resample
    monkeypatch.setattr(DL, "resample", lambda w, o, t: (calls.append((o, t)), real(w, o, t))[1])
    root = _dataset_root(str(tmp_path / "ds"), ["c_aac", "c_wav", "c_none"])
    tone = _tone(44100)
    _write_mp4(os.path.join(root, "videos", "c_aac.mp4"), _frames(1), FPS, audio=tone, codec="libvpx-vp9")
    write_webm(os.path.join(root, "videos", "c_wav.webm"), _frames(2), FPS)
    _write_wav(os.path.join(root, "audios", "c_wav.wav"), tone, 44100, "FLOAT")
    write_webm(os.path.join(root, "videos", "c_none.webm"), _frames(3), FPS)
    cfg = DataConfig(root=root, cache=False)
    dal = VideoAudioTextDataset(cfg, "test", SIZE, train=False, cache=False)
    cpu = VideoAudioTextDataset(cfg, "test", SIZE, train=False, cache=False)
    keys = [(k, None) for k in range(len(dal))]
    a = DaliLoader(dal, [keys], prefetch=0).make_batch(keys)
    assert not dal.bad and calls == [(44100, SR), (44100, SR)]   # both clips resampled on the device path
    b = collate([cpu[k] for k in range(len(cpu))])
    assert a["video_id"] == b["video_id"] and a["has_audio"].tolist() == b["has_audio"].tolist() == [True, True, False]
    torch.testing.assert_close(a["audio"], b["audio"], atol=3e-3, rtol=0)
    ref = valor_fbank(resample(torch.from_numpy(tone.astype(np.float64)), 44100, SR), SR).float()
    n = min(ref.shape[0], 512)
    _assert_aac_matches_wav(a["audio"][0, 0, :n], ref[:n])


def test_every_cpu_audio_path_resamples_through_fbank_resample(tmp_path, container_root, monkeypatch):
    import valor_fast.data.audio as A
    calls = []
    real = A.resample
    monkeypatch.setattr(A, "resample", lambda w, o, t: (calls.append((o, t)), real(w, o, t))[1])
    x = _tone(22050, 0.3)
    _write_wav(str(tmp_path / "a.wav"), x, 22050, "PCM_16")
    _write_wav(str(tmp_path / "a.flac"), x, 22050, "PCM_16")
    root, _ = container_root
    for p in ("a.wav", "a.flac"):
        w = A.load_audio(str(tmp_path / p), SR)
        assert w.numel() == int(np.ceil(x.size * SR / 22050))
    A.load_container_audio(os.path.join(root, "videos", "c_aac.mp4"), SR)
    assert calls == [(22050, SR), (22050, SR), (44100, SR)]


# -- 4. truncated containers ---------------------------------------------------------------------
def _streamed_webm(path, frames, fps):
    """A WebM written to a pipe (no seeking): the segment size is left "unknown"."""
    import av

    class Pipe:
        def __init__(self):
            self.b = bytearray()

        def write(self, d):
            self.b += d
            return len(d)

    out = Pipe()
    with av.open(out, "w", format="webm") as c:
        st = c.add_stream("libvpx-vp9", rate=fps)
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        st.options = {"deadline": "realtime", "cpu-used": "8"}
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    with open(path, "wb") as f:
        f.write(bytes(out.b))


@pytest.mark.parametrize("kind", ["webm", "webm_streamed", "mp4_faststart"])
def test_truncated_containers_are_bad_media(tmp_path, kind):
    from valor_fast.data.video import decode_video
    full = str(tmp_path / ("full." + kind.split("_")[0]))
    if kind == "webm":
        write_webm(full, _frames(n=2 * FPS), FPS)
    elif kind == "webm_streamed":
        _streamed_webm(full, _frames(n=5 * FPS), FPS)
    else:
        _write_mp4(full, _frames(n=2 * FPS), FPS, faststart=True)
    assert probe_video(full).n_frames > 0 and decode_video(full, [0]).shape[0] == 1   # whole: fine
    data = open(full, "rb").read()
    for share in (0.80, 0.90, 0.95):
        cut = str(tmp_path / f"cut{int(share * 100)}.{kind.split('_')[0]}")
        with open(cut, "wb") as f:
            f.write(data[:int(len(data) * share)])
        with pytest.raises(DecodeError, match="truncated"):
            probe_video(cut)
        with pytest.raises(DecodeError, match="truncated"):
            decode_video(cut, [0])   # even when the frames asked lie before the cut


def _cli_error(capsys, argv):
    """The error `valor-fast ARGV` ends with: the exception it raises, or (where the CLI turns
    errors into a one-line message and an exit code) what it printed."""
    from valor_fast.cli import main
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
        if isinstance(e.code, str):
            return e.code
    except (ValueError, OSError) as e:
        return str(e)
    assert rc not in (0, None), rc
    out = capsys.readouterr()
    return out.err + out.out


# -- 5. annotation files checked at start-up -----------------------------------------------------
def test_check_splits_names_file_and_position(tmp_path):
    from valor_fast.data.annotations import check_splits
    from valor_fast.data.jsonio import AnnotationError
    root = _dataset_root(str(tmp_path / "ds"), ["a", "b"])
    cfg = DataConfig(root=root)
    assert check_splits(cfg) == {"train": 2, "val": 2, "test": 2}
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        f.write('{"video_id": "a", "captions": ["x"]}\n{"video_id": "b", "captions": ["y"],, }\n')
    with pytest.raises(AnnotationError, match=r"test split .*test\.jsonl:2:37: not valid JSON"):
        check_splits(cfg)
    os.remove(os.path.join(root, "val.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"val split \(data\.val_ann='val\.jsonl'.*val\.jsonl"):
        check_splits(cfg, ["train", "val"])
    assert check_splits(cfg, ["train"]) == {"train": 2}
    # VALOR's ids + txt_mapper layout and a benchmark adapter: JSON positions too
    (tmp_path / "ds" / "ids.json").write_text('[\n  "a",\n  "b"\n')
    (tmp_path / "ds" / "txt_mapper.json").write_text(json.dumps({"a": ["x"], "b": ["y"]}))
    with pytest.raises(AnnotationError, match=r"ids\.json:4:1"):
        check_splits(DataConfig(root=root, train_ann="ids.json"), ["train"])
    (tmp_path / "ds" / "vatex.json").write_text('[{"videoID": "a", "enCap": ["x"]},\n {"videoID": "b" "enCap": []}]')
    with pytest.raises(AnnotationError, match=r"vatex\.json:2:18"):
        check_splits(DataConfig(root=root, train_ann="vatex:vatex.json"), ["train"])


def test_trainer_and_eval_check_annotations_before_work(tmp_path, capsys):
    from valor_fast.cli import main
    from valor_fast.config import load_config
    from valor_fast.train.trainer import train
    root = _dataset_root(str(tmp_path / "ds"), ["a", "b"])
    for k, vid in enumerate(("a", "b")):   # good media: without the check, training would run first
        write_webm(os.path.join(root, "videos", vid + ".webm"), _frames(k), FPS)
        _write_wav(os.path.join(root, "audios", vid + ".wav"), _tone(SR), SR)
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        f.write('{"video_id": "a", "captions": ["x"]}\n{"video_id": \n')
    o = {"data.root": root, "data.synth": "false", "model.image_size": str(SIZE), "model.patch_size": "8",
         "train.steps": "1", "train.batch_size": "2", "train.out_dir": str(tmp_path / "runs"), "train.run_name": "r"}
    # (AnnotationError is a ValueError; before, the file was first read after training, at the
    # final evaluation, with no column)
    with pytest.raises(ValueError, match=r"test split .*test\.jsonl:2:14"):
        train(load_config(None, o))
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()       # nothing trained first
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    over = [f"--{k}={v}" for k, v in o.items() if k.startswith(("data.", "model."))]
    assert re.search(r"test\.jsonl:2:14", _cli_error(capsys, ["eval", "--ckpt", str(ckpt), "--split", "test"] + over))


# -- 6. data check on a folder without annotations ----------------------------------------------
def test_data_check_scans_a_folder_without_annotations(tmp_path, container_root, capsys):
    from valor_fast.cli import main
    root = tmp_path / "raw"
    (root / "videos" / "sub").mkdir(parents=True)
    (root / "audios").mkdir()
    write_webm(str(root / "videos" / "a.webm"), _frames(1), FPS)
    _write_wav(str(root / "audios" / "a.wav"), _tone(SR), SR, "FLOAT")
    croot, _ = container_root
    shutil.copy(os.path.join(croot, "videos", "c_aac.mp4"), root / "videos" / "sub" / "b.mp4")
    write_webm(str(root / "videos" / "cut.webm"), _frames(2), FPS)
    data = (root / "videos" / "cut.webm").read_bytes()
    (root / "videos" / "cut.webm").write_bytes(data[:int(len(data) * 0.9)])
    frames = root / "videos" / "frames_clip"
    frames.mkdir()
    from PIL import Image
    for k in range(3):
        Image.fromarray(_frames(k, 1)[0]).save(frames / f"{k:05d}.jpg")
    (root / "videos" / "README.txt").write_text("not media")
    _write_wav(str(root / "audios" / "orphan.wav"), _tone(SR), SR)
    out = tmp_path / "rep.json"
    assert main(["data", "check", str(root), "--out", str(out), "--workers", "1"]) == 1   # cut.webm: rc 1
    rep = json.loads(out.read_text())
    s = rep["splits"]["files"]
    assert s["annotations"] is None and s["clips"] == 4
    src = {r["video_id"]: r["audio_source"] for r in s["rows"]}
    assert src == {"a": "file", "sub/b": "container", "cut": "none", "frames_clip": "none"}
    assert list(s["bad_video"]) == ["cut"] and "truncated" in s["bad_video"]["cut"] and rep["bad"] == 1
    rows = {r["video_id"]: r for r in s["rows"]}
    assert rows["a"]["frames"] == FPS and rows["frames_clip"]["frames"] == 3 and rows["a"]["sample_rate"] == SR
    assert s["orphan_audio"] == {"orphan": None} and s["skipped"] == ["videos/README.txt"]
    (root / "videos" / "cut.webm").unlink()
    assert main(["data", "check", str(root), "--workers", "1", "--quick"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no annotation file" in _cli_error(capsys, ["data", "check", str(empty)])
