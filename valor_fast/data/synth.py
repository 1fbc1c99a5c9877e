"""The embedded default dataset: deterministic synthetic audiovisual clips.

A coloured shape crosses the frame (what only the video shows: colour, shape, direction) while a
tone plays (what only the audio carries: pitch, rhythm).  Captions name both, in paraphrases.
24 video x 6 audio = 144 attribute combinations; 48 are held out for test such that every test
video combination appears with 2 audio ones and every audio combination with 8 video ones, so
text->video and text->audio retrieval alone cannot single out a test clip while
text->audiovisual can (VALOR's claim, measurable).  Every single attribute value still appears in
training: the test measures composition, not new words.

Layout written under `root`: videos/<id>.webm (VP9), audios/<id>.wav (16-bit mono),
{train,val,test}.jsonl ({"video_id", "captions", "qa", "attrs"}), meta.json, and the owner
marker (utils/fs.py) listing every file written.  Generation is atomic (written to root.tmp,
then renamed).  Nothing is ever deleted that the generator cannot prove it wrote: `root` is
replaced only when it is missing, empty, or marked as a synthetic set holding nothing but the
files the marker lists and the loaders' cache (.cache/); anything else is a ForeignContentError
naming the folder and what to do.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Tuple

import numpy as np

from ..utils.fs import ForeignContentError, check_owned, write_owner_marker
from ..utils.log import get_logger

log = get_logger(__name__)

KIND = "synthetic-dataset"              # the owner marker of a finished set
PARTIAL_KIND = "synthetic-dataset-partial"   # of root.tmp while it is being written
OWN_PATTERNS = (".cache/*",)             # written into a set after it was made: the loaders' caches
PARTIAL_PATTERNS = ("videos/*.webm", "audios/*.wav", "*.jsonl", "meta.json", "videos", "audios")

VERSION = 1
COLORS = {"red": (215, 40, 40), "green": (40, 175, 60), "blue": (45, 85, 225), "yellow": (235, 210, 40)}
SHAPES = ["circle", "square", "triangle"]
MOTIONS = ["left to right", "top to bottom"]
PITCHES = {"low": 220.0, "medium": 660.0, "high": 1760.0}
RHYTHMS = ["steady", "beeping"]

SHAPE_WORDS = {"circle": ["circle", "round shape", "ball", "disc"], "square": ["square", "box", "block", "square shape"],
               "triangle": ["triangle", "triangular shape", "wedge", "triangle shape"]}
MOTION_WORDS = {"left to right": ["moves from left to right", "slides to the right", "travels from the left side to the right side",
                                  "goes across to the right"],
                "top to bottom": ["moves from top to bottom", "slides down", "falls from the top to the bottom",
                                  "goes down the screen"]}
PITCH_WORDS = {"low": ["low", "deep", "low pitched"], "medium": ["medium", "mid pitched", "moderate"],
               "high": ["high", "high pitched", "shrill"]}


def video_combos() -> List[Tuple[str, str, str]]:
    return [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS]


def audio_combos() -> List[Tuple[str, str]]:
    return [(p, r) for p in PITCHES for r in RHYTHMS]


def split_combos():
    """(train combos, held-out test combos, val combos) as (video index, audio index) pairs."""
    nv, na = len(video_combos()), len(audio_combos())
    test = {(v, a) for v in range(nv) for a in ((v % na), (v + na // 2) % na)}
    train = [(v, a) for v in range(nv) for a in range(na) if (v, a) not in test]
    val = [(v, (v + 1) % na) for v in range(nv)]            # training combos, fresh clips
    return train, sorted(test), val


def _audio_phrase(pitch: str, rhythm: str, rng: np.random.Generator) -> str:
    p = PITCH_WORDS[pitch][rng.integers(len(PITCH_WORDS[pitch]))]
    if rhythm == "steady":
        forms = ["a steady {p} tone plays", "a continuous {p} sound is heard", "a {p} tone hums steadily"]
    else:
        forms = ["a {p} tone beeps", "a {p} beeping sound repeats", "{p} beeps are heard"]
    return forms[rng.integers(len(forms))].format(p=p)


def captions_for(attrs: dict, rng: np.random.Generator, n: int = 5) -> List[str]:
    c, s, m, p, r = attrs["color"], attrs["shape"], attrs["motion"], attrs["pitch"], attrs["rhythm"]
    canon = f"a {c} {s} {MOTION_WORDS[m][0]} while a {p} tone {'beeps' if r == 'beeping' else 'plays steadily'}"
    caps = [canon]
    tries = 0
    while len(caps) < n and tries < 50:
        tries += 1
        shape = SHAPE_WORDS[s][rng.integers(len(SHAPE_WORDS[s]))]
        motion = MOTION_WORDS[m][rng.integers(len(MOTION_WORDS[m]))]
        audio = _audio_phrase(p, r, rng)
        form = rng.integers(3)
        if form == 0:
            cap = f"a {c} {shape} {motion} while {audio}"
        elif form == 1:
            cap = f"{audio} as a {c} {shape} {motion}"
        else:
            cap = f"a {c} {shape} {motion} and {audio}"
        if cap not in caps:
            caps.append(cap)
    return caps


def qa_for(attrs: dict) -> List[dict]:
    return [{"question": "what color is the shape?", "answer": attrs["color"]},
            {"question": "what shape is moving?", "answer": attrs["shape"]},
            {"question": "which way does the shape move?", "answer": "right" if attrs["motion"] == "left to right" else "down"},
            {"question": "is the sound low, medium or high?", "answer": attrs["pitch"]},
            {"question": "is the sound steady or beeping?", "answer": attrs["rhythm"]}]


def render_frames(attrs: dict, rng: np.random.Generator, size: int, n_frames: int) -> np.ndarray:
    """(F, size, size, 3) uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    bg = int(rng.integers(85, 140))
    radius = size * rng.uniform(0.2, 0.25)   # ~15% of the frame: enough signal for tiny encoders
    cross = rng.uniform(0.35, 0.65)          # the fixed coordinate of the path
    start, end = rng.uniform(0.2, 0.3), rng.uniform(0.7, 0.8)
    color = np.array(COLORS[attrs["color"]], np.float32) + rng.uniform(-12, 12, 3)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for f in range(n_frames):
        t = start + (end - start) * f / max(1, n_frames - 1)
        cx, cy = (t, cross) if attrs["motion"] == "left to right" else (cross, t)
        cx, cy = cx * size, cy * size
        dx, dy = xx - cx, yy - cy
        if attrs["shape"] == "circle":
            m = dx * dx + dy * dy <= radius * radius
        elif attrs["shape"] == "square":
            m = (np.abs(dx) <= radius * 0.9) & (np.abs(dy) <= radius * 0.9)
        else:   # upward triangle: apex at top, base at bottom
            h = radius * 1.1
            m = (dy <= h) & (dy >= -h) & (np.abs(dx) <= (dy + h) * 0.58)
        img = np.full((size, size, 3), bg, np.float32)
        img[m] = color
        frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def render_audio(attrs: dict, rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    n = int(sr * seconds)
    t = np.arange(n) / sr
    f0 = PITCHES[attrs["pitch"]] * rng.uniform(0.97, 1.03)
    amp = rng.uniform(0.25, 0.45)
    x = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
    if attrs["rhythm"] == "beeping":
        rate = rng.uniform(2.2, 2.8)
        phase = rng.uniform(0, 1)
        gate = ((t * rate + phase) % 1.0) < 0.5
        # 5 ms ramps so the gate does not click across the spectrum
        k = max(1, int(0.005 * sr))
        env = np.convolve(gate.astype(np.float64), np.ones(k) / k, mode="same")
        x = x * env
    x = amp * x + 0.01 * rng.standard_normal(n)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def write_webm(path: str, frames: np.ndarray, fps: int) -> None:
    import av
    with av.open(path, "w", format="webm") as c:
        st = c.add_stream("libvpx-vp9", rate=fps)
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # realtime speed, constant quality good enough that colours survive 4:2:0
        st.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b:v": "0", "row-mt": "1"}
        for fr in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


def write_wav(path: str, pcm: np.ndarray, sr: int) -> None:
    import soundfile as sf
    sf.write(path, pcm, sr, subtype="PCM_16")


def _make_clip(job) -> None:
    vid, attrs, seed, root, size, fps, seconds, sr = job
    rng = np.random.default_rng(seed)
    n_frames = int(round(fps * seconds))
    write_webm(os.path.join(root, "videos", vid + ".webm"), render_frames(attrs, rng, size, n_frames), fps)
    write_wav(os.path.join(root, "audios", vid + ".wav"), render_audio(attrs, rng, sr, seconds), sr)


def generate(root: str, seed: int = 0, clips_per_combo: int = 4, image_size: int = 96, fps: int = 8,
             seconds: float = 4.0, sample_rate: int = 16000, progress: bool = True, workers: int = 2) -> Dict:
    """Write the synthetic dataset to `root` (replaced atomically); returns a summary."""
    t0 = time.time()
    vcs, acs = video_combos(), audio_combos()
    train, test, val = split_combos()
    rng = np.random.default_rng(seed)
    records = {"train": [], "val": [], "test": []}
    jobs = []
    root = root.rstrip("/") or root
    tmp = root + ".tmp"
    _check_replaceable(root)   # before minutes of work: refuse a folder we cannot prove ours
    _clear_partial(tmp)
    os.makedirs(tmp)
    write_owner_marker(tmp, PARTIAL_KIND, with_manifest=False)
    os.makedirs(os.path.join(tmp, "videos"))
    os.makedirs(os.path.join(tmp, "audios"))
    for split, combos, reps in (("train", train, clips_per_combo), ("val", val, 1), ("test", test, 1)):
        for vi, ai in combos:
            for r in range(reps):
                c, s, m = vcs[vi]
                p, rh = acs[ai]
                attrs = {"color": c, "shape": s, "motion": m, "pitch": p, "rhythm": rh}
                vid = f"{split}{len(records[split]):04d}"
                clip_seed = int(rng.integers(2**31))
                records[split].append({"video_id": vid, "captions": captions_for(attrs, np.random.default_rng(clip_seed + 1)),
                                       "qa": qa_for(attrs), "attrs": attrs})
                jobs.append((vid, attrs, clip_seed, tmp, image_size, fps, seconds, sample_rate))
    it = jobs
    if workers > 1:
        ex = ProcessPoolExecutor(workers)
        it = ex.map(_make_clip, jobs, chunksize=8)
    else:
        it = map(_make_clip, jobs)
    from tqdm import tqdm
    for _ in tqdm(it, total=len(jobs), desc="synth clips", disable=not progress, mininterval=2.0):
        pass
    if workers > 1:
        ex.shutdown()
    for split, recs in records.items():
        with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
            for r in recs:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    meta = {"version": VERSION, "seed": seed, "clips_per_combo": clips_per_combo, "image_size": image_size,
            "fps": fps, "seconds": seconds, "sample_rate": sample_rate, "colors": list(COLORS), "shapes": SHAPES,
            "motions": MOTIONS, "pitches": list(PITCHES), "rhythms": RHYTHMS,
            "counts": {k: len(v) for k, v in records.items()}}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    write_owner_marker(tmp, KIND, version=VERSION)
    _check_replaceable(root, remove=True)
    os.replace(tmp, root)
    meta["seconds_taken"] = round(time.time() - t0, 1)
    log.info("synthetic dataset: %s in %s (%.1fs)", meta["counts"], root, meta["seconds_taken"])
    return meta


def _check_replaceable(root: str, remove: bool = False) -> None:
    """`root` may be replaced: missing, an empty folder, or provably a synthetic set of ours
    (ForeignContentError naming the folder otherwise).  `remove`: clear it now."""
    if not os.path.lexists(root):
        return
    if os.path.isdir(root) and not os.path.islink(root) and not os.listdir(root):
        if remove:
            os.rmdir(root)
        return
    why = check_owned(root, KIND, patterns=OWN_PATTERNS)
    if why is not None:
        raise ForeignContentError(f"refusing to write the synthetic dataset into {root}: {why}, so valor-fast cannot "
                                  f"prove it wrote that folder; nothing was changed. Choose a new or empty folder "
                                  f"(data synth --root / --data.root), or empty this one yourself")
    if remove:
        shutil.rmtree(root)


def _clear_partial(tmp: str) -> None:
    """A root.tmp left by a crashed generation: removed when provably one of ours."""
    if not os.path.lexists(tmp):
        return
    why = check_owned(tmp, PARTIAL_KIND, patterns=PARTIAL_PATTERNS)
    if why is not None:
        raise ForeignContentError(f"{tmp} (where the synthetic dataset is written before its rename) exists and "
                                  f"is not a partial set of ours ({why}); nothing was changed: move it away")
    shutil.rmtree(tmp)


def _stale_synthetic(cfg, meta_path: str) -> bool:
    """data.root holds a meta.json: True when it is a synthetic set of ours with other settings
    (to regenerate); False when it matches (reuse); ForeignContentError when its settings differ
    and valor-fast cannot prove it wrote the folder (a real dataset with its own meta.json)."""
    try:
        with open(meta_path) as f:
            m = json.load(f)
    except (OSError, ValueError):
        m = None
    want = {"version": VERSION, "seed": cfg.data.synth_seed, "clips_per_combo": cfg.data.synth_clips_per_combo}
    have = {k: m.get(k) for k in want} if isinstance(m, dict) else None
    if have == want:
        return False
    why = check_owned(cfg.data.root, KIND, patterns=OWN_PATTERNS)
    if why is None:
        log.warning("synthetic dataset in %s was generated with %s, the config asks for %s: regenerating",
                    cfg.data.root, have, want)
        return True
    raise ForeignContentError(
        f"data.root={cfg.data.root} has a meta.json that is not this synthetic set's ({have or 'unreadable'}; the "
        f"config asks for {want}) and {why}: it is left untouched. To train on it as your dataset, pass "
        f"--data.synth false; for the synthetic set, point --data.root at a new folder")


def prepare_data(cfg) -> None:
    """Generate the synthetic dataset into data.root when it is missing and data.synth is on
    (`cfg` is the run's Config)."""
    ann = os.path.join(cfg.data.root, cfg.data.train_ann)
    fmt, sep, rest = cfg.data.train_ann.partition(":")
    if sep and not os.path.isabs(cfg.data.train_ann):
        # <format>:<file>[,<file>] (a benchmark's own annotations) or shards:<glob>
        import glob as _glob
        first = rest.split(",")[0]
        hits = _glob.glob(first if os.path.isabs(first) else os.path.join(cfg.data.root, first))
        if hits:
            return
        ann = os.path.join(cfg.data.root, first)
    meta = os.path.join(cfg.data.root, "meta.json")
    stale = os.path.exists(ann) and cfg.data.synth and os.path.exists(meta) and _stale_synthetic(cfg, meta)
    if os.path.exists(ann) and not stale:
        return
    if not cfg.data.synth:
        raise FileNotFoundError(f"no training annotations at {ann!r} (set data.root, or data.synth=true "
                                f"to generate the synthetic dataset)")
    if not stale and os.path.isdir(cfg.data.root) and os.listdir(cfg.data.root) \
            and check_owned(cfg.data.root, KIND, patterns=OWN_PATTERNS) is not None:
        raise ForeignContentError(f"no training annotations at {ann!r}, and data.root={cfg.data.root} holds other "
                                  f"files: the synthetic dataset is not generated over them. Set data.train_ann "
                                  f"(and val_ann / test_ann) to the folder's annotations, or data.root to a new folder")
    log.info("generating the synthetic audiovisual dataset into %s", cfg.data.root)
    generate(cfg.data.root, seed=cfg.data.synth_seed, clips_per_combo=cfg.data.synth_clips_per_combo)
