"""Typed configuration: dataclasses with a docstring per field, YAML recipes in configs/,
dotted command-line overrides (`--train.lr 3e-4`).  The resolved config is printed and saved
as `config.yaml` in every run folder.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml

from .model.args import FAMILIES, ModelArgs, ModelConfig, family_config, family_of, model_config  # noqa: F401
from .utils.log import get_logger

log = get_logger(__name__)

@dataclass
class DataConfig:
    root: str = "data_cache/synth"
    """Dataset folder (the synthetic one is generated there when missing)."""
    synth: bool = True
    """Generate the synthetic audiovisual dataset into `root` when it is missing."""
    synth_seed: int = 0
    """Seed of the synthetic dataset."""
    synth_clips_per_combo: int = 4
    """Training clips per (video, audio) attribute combination of the synthetic set."""
    train_ann: str = "train.jsonl"
    """Training annotations: JSONL {video_id, captions[, qa]}, VALOR ids JSON + txt_mapper, or
    <format>:<file> for a benchmark's own files (msrvtt, msrvtt_1ka, vatex, audiocaps, valor32k,
    msrvtt_qa; see valor_fast/data/adapters.py), or shards:<glob> for captions stored in
    WebDataset tar shards as <key>.json / <key>.txt beside the media (data/shards.py)."""
    val_ann: str = "val.jsonl"
    """Validation annotations (model selection / periodic eval)."""
    test_ann: str = "test.jsonl"
    """Held-out test annotations (final metrics only)."""
    video_dir: str = "videos"
    """Folder of video files (relative to root)."""
    audio_dir: str = "audios"
    """Folder of audio files (relative to root)."""
    shards: str = ""
    """Comma-separated globs of WebDataset tar shards (relative to root) holding media as
    <video_id>.<ext> members; looked up before video_dir/audio_dir.  A split whose annotations
    are shards:<glob> also finds its media in those shards."""
    frames_train: int = 4
    """Frames a clip in training (one per equal segment, random within it)."""
    frames_test: int = 4
    """Frames a clip at test (middle of each segment)."""
    audio_slices: int = 1
    """512-frame fbank slices a clip."""
    sample_rate: int = 16000
    """Audio rate after resampling."""
    max_text_len: int = 40
    """Text tokens a caption (or QA prompt + answer) is cut to, incl. [CLS] and [SEP]; must fit in
    model.max_positions."""
    backend: str = "auto"
    """Decoding backend: auto (DALI when installed and training on a GPU, else cpu; logged once)
    | cpu (PyAV + soundfile in loader worker processes) | dali (NVIDIA DALI: GPU decoders on a GPU,
    its CPU operators without one; pip install nvidia-dali-cuda130).  Same batch keys, shapes and
    dtypes either way."""
    num_workers: int = 0
    """cpu backend: loader worker processes (0 = in the main process); dali backend: the
    pipeline's CPU threads (0 = 2)."""
    cache: bool = True
    """cpu backend: decode every clip once and keep frames + fbank in memory and on disk (small
    datasets; bad files are then found at start-up).  The dali backend always decodes per batch."""
    video_dtype: str = "fp32"
    """fp32 | bf16: dtype of the normalised frames a batch carries."""
    crop_scale_min: float = 1.0
    """Training: RandomResizedCrop area scale lower bound (1.0 = off; VALOR fine-tuning uses 0.8),
    aspect ratio 1, one window for every frame of a clip."""
    hflip: bool = False
    """Training: horizontal flip with probability 0.5, the same for every frame of a clip (off by
    default: it reverses left/right motion, which the synthetic captions name)."""
    allow_missing_audio: bool = True
    """A clip with no audio file (or zero samples) trains on its video groups only: the batch's
    has_audio is False and its T-A / T-AV terms of MGA and MGC are masked.  False: such a clip is
    bad media and replaced.  An audio file that exists but is empty, truncated or undecodable is
    always bad media."""
    max_bad_rate: float = 0.05
    """Bad media (missing, empty, truncated or undecodable files) are replaced by the next good
    clip of a seed-fixed permutation, logged and counted (metric data/bad_media).  When more than
    this share of the samples loaded so far had to be replaced (judged after min(200, dataset
    size) samples, or at once over the whole set when data.cache decodes it at start-up), the run
    stops with a report listing every bad id.  0 stops at the first bad file; 1 never stops."""


@dataclass
class LossConfig:
    mga_mode: str = "fine"
    """MGA similarity: fine (VALOR's weighted token-wise max) or coarse (global features)."""
    mga_weight: float = 1.5
    """MGA total = mga_weight * mean over groups."""
    mgc_weight: float = 1.0
    """MGC total = mgc_weight * mean over groups."""
    groups: str = "tv,ta,tav"
    """Groups trained every step (comma list of tv, ta, tav)."""
    mask_prob: float = 0.6
    """MGC: share of non-pad tokens selected for prediction."""
    label_smoothing: float = 0.0
    """MGC cross-entropy label smoothing."""
    scst_samples: int = 5
    """train.task=scst: captions sampled a clip (the greedy caption is the reward baseline)."""
    grouped_decoder: bool = True
    """MGC: run the groups as one decoder pass stacked on the batch, memory K/V projected once
    (False: one pass per group, the unfused baseline; same losses)."""


@dataclass
class CoAVTLossConfig:
    """The CoAVT objective (train.task=coavt_pretrain; valor_fast/tasks/coavt.py): total =
    contrastive_weight * (AV-T + A-T + V-T) + matching_weight * matching + lm_weight * LM.  The
    paper names the three losses; its weights and negative-sampling rule could not be read here,
    so the defaults are BLIP-2's (unweighted sum; matching negatives sampled in proportion to the
    contrastive similarity): docs/family.md."""
    contrastive_weight: float = 1.0
    """Weight of the summed AV-T + A-T + V-T contrastive losses."""
    matching_weight: float = 1.0
    """Weight of the AV-text matching loss."""
    lm_weight: float = 1.0
    """Weight of the language-modelling loss."""
    hard_negatives: str = "sample"
    """Matching negatives: sample (probability softmax(S / temperature) over non-matching clips of
    the gathered batch) or hardest (the most similar non-matching clip)."""
    # rule: hard_negatives in (sample, hardest)
    label_smoothing: float = 0.1
    """LM cross-entropy label smoothing."""
    # rule: 0 <= label_smoothing < 1


@dataclass
class VLSALossConfig:
    """The VLSA objective (train.task=vlsa_pretrain; valor_fast/tasks/vlsa.py): total =
    mm_weight * (video + audio + text masked modelling) + gam_weight * (audio-video + audio-text
    matching) + contrastive_weight * (T-V + T-A + V-A).  Weights and mask ratios: ours (the
    paper's could not be read here), docs/family.md."""
    mm_weight: float = 1.0
    """Weight of each masked-modelling term (video, audio, text)."""
    gam_weight: float = 1.0
    """Weight of each global-audio-matching term (audio-video, audio-text)."""
    contrastive_weight: float = 1.0
    """Weight of each contrastive term (T-V, T-A, V-A)."""
    video_mask_ratio: float = 0.6
    """Share of a clip's video patches masked (the same count every clip)."""
    # rule: 0 < video_mask_ratio < 1
    audio_mask_ratio: float = 0.6
    """Share of a clip's audio patches masked."""
    # rule: 0 < audio_mask_ratio < 1
    text_mask_prob: float = 0.15
    """Share of a caption's tokens (after [CLS]) selected for prediction, at least one."""
    # rule: 0 < text_mask_prob <= 1
    norm_pix: bool = True
    """Video target: each patch's pixels normalised by their own mean and std (MAE)."""


@dataclass
class TrainConfig:
    steps: int = 600
    """Optimiser steps."""
    batch_size: int = 32
    """Global batch size."""
    lr: float = 1e-4
    """Peak learning rate."""
    vision_lr: float = 0.0
    """Learning rate of pretrained vision weights (0 = same as lr)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases, norms, embeddings)."""
    betas: tuple = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup: float = 0.1
    """Warmup share of the steps (linear), then linear decay to 0."""
    grad_clip: float = 5.0
    """Gradient norm clip (0 = off)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 | fp32."""
    seed: int = 0
    """Run seed."""
    eval_every: int = 0
    """Validate on the val split every N steps: the task's metrics as val/... in history.json and
    TensorBoard (0 = never; the test split is evaluated at the end when train.final_eval)."""
    log_every: int = 20
    """Log a metrics line every N steps."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    run_name: str = ""
    """Run folder name ('' = timestamp)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    threads: int = 0
    """torch CPU threads (0 = all cores)."""
    grad_accum: int = 1
    """Micro-batches a step; per-rank micro-batch = batch_size / (world * grad_accum)."""
    parallel: str = "fsdp"
    """Multi-process data parallelism: fsdp (FSDP2 fully_shard per block + root) or ddp."""
    hsdp_replicas: int = 0
    """>1: HSDP over a 2-D mesh (replicate across this many groups, shard within each)."""
    activation_checkpointing: str = "none"
    """none | full (every transformer block) | selective (every other block)."""
    compile: bool = False
    """torch.compile each transformer block."""
    ckpt_every: int = 0
    """Write a sharded training checkpoint every N steps (0 = only at the end)."""
    keep_ckpts: int = 3
    """Newest complete training checkpoints kept."""
    async_ckpt: bool = False
    """Write checkpoints asynchronously (torch.distributed.checkpoint.async_save)."""
    resume: str = ""
    """'' = fresh run; auto = newest complete checkpoint of the run folder; or a checkpoint path."""
    nan_policy: str = "stop"
    """On a non-finite loss or gradient norm: stop (keep the last good checkpoint) or skip the step."""
    max_skips: int = 10
    """With nan_policy=skip: stop after this many skipped steps."""
    profile: bool = False
    """Record a torch.profiler schedule (traces for TensorBoard / Perfetto) in the run folder."""
    profile_steps: int = 6
    """Active steps the profiler records (after 1 wait + 2 warmup steps)."""
    tensorboard: bool = True
    """Write TensorBoard scalars if tensorboard is installed."""
    deterministic: bool = False
    """Deterministic algorithms (tests, debugging)."""
    fail_at_step: int = -1
    """Testing aid: make the loss NaN at this step (-1 = never)."""
    sleep_per_step: float = 0.0
    """Testing aid: seconds to sleep after each step (lets a test kill a run mid-way)."""
    final_eval: bool = True
    """Evaluate on the test split at the end of training."""
    task: str = "pretrain"
    """pretrain (MGA + MGC) | retrieval (MGA on loss.groups) | caption (MGC on loss.groups) | qa
    (answer generation, MGC on the answer tokens) | scst (self-critical CIDEr-reward captioning,
    after caption fine-tuning); the recipes configs/finetune_*.yaml set the matching loss weights
    and groups."""
    init: str = ""
    """Checkpoint to start from: our model.safetensors (or its run folder), or an upstream VALOR
    checkpoint (converted on load, unmatched keys reported).  '' = random / HF init."""


@dataclass
class EvalConfig:
    beam: int = 3
    """Beam width of caption decoding."""
    max_len: int = 30
    """Max caption tokens."""
    length_penalty: float = 1.0
    """Beam score = logprob / len**length_penalty."""
    batch_size: int = 64
    """Eval batch size."""
    caption_group: str = "tav"
    """Group the captioner is conditioned on at eval."""
    retrieval_mode: str = ""
    """Similarity used for retrieval scoring ('' = the training mga_mode)."""
    retrieval_captions: str = "first"
    """Text queries of retrieval: first (one caption a clip, MSRVTT-1kA style) or all (every
    caption is a query; a clip is found by its best-ranked caption: VATEX, AudioCaps)."""
    qa_max_answer_len: int = 8
    """Max generated answer tokens in QA evaluation."""
    rerank_k: int = 0
    """CoAVT retrieval: re-rank each query's top-k candidates by the matching head (score = the
    match logit averaged over queries + the contrastive S, BLIP-2's practice), reported as
    retrieval_rerank/...; 0 = off (contrastive scores only)."""
    # rule: rerank_k >= 0


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelConfig)
    """The model: the dataclass of model.family (ModelConfig, CoAVTArgs or VLSAArgs, model/args.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    coavt: CoAVTLossConfig = field(default_factory=CoAVTLossConfig)
    vlsa: VLSALossConfig = field(default_factory=VLSALossConfig)


def _coerce(value: Any, current: Any, name: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            f = float(value)
            if f != int(f):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
            return int(f)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v]
        return tuple(type(c)(v) for c, v in zip(current, value))
    return value if not isinstance(current, str) else str(value)


def _int(key: str, value: Any) -> int:
    return _coerce(value, 0, key)


def _migrate(overrides: dict) -> dict:
    """Fields that moved or went, mapped so that recipes and run folders' config.yaml written
    before the change still load (each mapping logged):

    model.max_text_len        only sized the position table (max(512, it) rows): it becomes
                              model.max_positions = max(512, it); the text length is data.max_text_len
    data.audio_mel_bins       the fbank bins are model.audio_mel_bins alone (the AST patch grid
                              depends on them; the loaders read them from there)
    model.gradient_checkpointing  never took effect: false is dropped, true is an error naming
                              train.activation_checkpointing
    """
    out = dict(overrides)
    if "model.max_text_len" in out:
        rows = max(512, _int("model.max_text_len", out.pop("model.max_text_len")))
        if "model.max_positions" in out and _int("model.max_positions", out["model.max_positions"]) != rows:
            raise ValueError(f"model.max_text_len (moved: it set model.max_positions = {rows}) conflicts with "
                             f"model.max_positions={out['model.max_positions']}; keep model.max_positions only")
        out.setdefault("model.max_positions", rows)
        log.warning("config: model.max_text_len is gone; the text length is data.max_text_len and the position "
                    "table model.max_positions (set to %d)", rows)
    if "data.audio_mel_bins" in out:
        bins = _int("data.audio_mel_bins", out.pop("data.audio_mel_bins"))
        if "model.audio_mel_bins" in out and _int("model.audio_mel_bins", out["model.audio_mel_bins"]) != bins:
            raise ValueError(f"data.audio_mel_bins={bins} and model.audio_mel_bins={out['model.audio_mel_bins']} "
                             "differ; the fbank bins are now model.audio_mel_bins alone")
        out["model.audio_mel_bins"] = bins
        log.warning("config: data.audio_mel_bins moved to model.audio_mel_bins (= %d)", bins)
    if "model.gradient_checkpointing" in out:
        if _coerce(out.pop("model.gradient_checkpointing"), False, "model.gradient_checkpointing"):
            raise ValueError("model.gradient_checkpointing was removed (it never took effect); use "
                             "train.activation_checkpointing=full (or selective)")
        log.warning("config: model.gradient_checkpointing (removed, it never took effect) ignored")
    return out


def check(cfg: Config) -> Config:
    """Cross-section facts one field cannot check alone: the model section fits its family, the
    texts fit the position table."""
    family_of(cfg.model)
    rows = cfg.model.max_positions
    if cfg.data.max_text_len > rows:
        raise ValueError(f"data.max_text_len={cfg.data.max_text_len} exceeds model.max_positions={rows}")
    if cfg.eval.max_len + 2 > rows:
        raise ValueError(f"eval.max_len={cfg.eval.max_len} + [CLS] + [MASK] exceeds model.max_positions={rows}")
    return cfg


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """Apply {"train.lr": "3e-4", ...}; unknown keys are an error naming the key; moved fields
    are mapped (`_migrate`)."""
    for key, value in _migrate(overrides).items():
        parts = key.split(".")
        if len(parts) != 2:
            raise ValueError(f"override {key!r}: expected section.field, e.g. train.lr")
        sec, name = parts
        if not hasattr(cfg, sec):
            raise ValueError(f"override {key!r}: no section {sec!r} (sections: {[f.name for f in fields(cfg)]})")
        section = getattr(cfg, sec)
        if not hasattr(section, name):
            raise ValueError(f"override {key!r}: section {sec!r} has no field {name!r} "
                             f"(fields: {[f.name for f in fields(section)]})")
        setattr(section, name, _coerce(value, getattr(section, name), key))
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> Config:
    """Build a Config: defaults <- named size of model.family <- recipe YAML <- dotted overrides."""
    raw: dict = {}
    if path:
        if not os.path.exists(path):
            here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
            alt = os.path.join(here, path if path.endswith(".yaml") else path + ".yaml")
            if os.path.exists(alt):
                path = alt
            else:
                raise FileNotFoundError(f"config {path!r} not found (recipes live in configs/)")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    overrides = dict(overrides or {})
    size = overrides.get("model.size") or (raw.get("model") or {}).get("size", "tiny")
    family = overrides.get("model.family") or (raw.get("model") or {}).get("family", "valor")
    cfg = Config(model=family_config(str(family), str(size)))
    flat = {f"{s}.{k}": v for s, sec in raw.items() for k, v in (sec or {}).items()}
    flat.update(overrides)
    return check(apply_overrides(cfg, flat))


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["train"]["betas"] = list(d["train"]["betas"])
    return d


def dump(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
