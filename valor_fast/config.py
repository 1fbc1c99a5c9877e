"""Typed configuration: dataclasses with a docstring per field, YAML recipes shipped in the package
(valor_fast/recipes/, named on the command line: `--config tiny`), dotted command-line overrides
(`--train.lr 3e-4`).  The dataclass defaults are the embedded default recipe, recipes/tiny.yaml
(what `valor-fast pretrain` runs with no --config; tests/test_recipes.py holds them equal).  The resolved config is printed and saved
as `config.yaml` in every run folder.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from .model.args import FAMILIES, FAMILY_SIZES, ModelArgs, ModelConfig, family_config, family_of, model_config  # noqa: F401
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
    """MGA total = mga_weight * (weighted, mga_group_weights) mean over groups."""
    mgc_weight: float = 1.0
    """MGC total = mgc_weight * mean over groups."""
    groups: str = "tv,ta,tav"
    """Groups trained every step (comma list of tv, ta, tav)."""
    mga_group_weights: str = "tv:2,ta:0.5,tav:0.5"
    """Relative weights of the MGA groups, `group:weight,...` (> 0; a group not listed weighs 1,
    one not in `groups` is ignored; '' = all equal, upstream's plain mean and that of every
    recipe but tiny).  MGA = mga_weight * sum(w_g L_g) / sum(w_g) over the groups present.  Why
    the embedded default weighs T-V up: T-A is solved from the audio words alone and T-AV from
    audio and colour within ~100 steps, and both pull the text encoder they share with T-V to
    those words; at equal weights the tiny video tower learnt shape only after ~490 steps and
    never the direction of motion, at 2 / 0.5 / 0.5 shape after ~120 and motion too (MGA alone,
    600 steps, seed 2: T->AV R@1 0.75 against 1.00; bench/results/recipe_search.jsonl,
    proxy_g3 / proxy_g3w)."""
    mgc_groups: str = "tv,tav"
    """MGC captions the groups of `groups` that are also listed here ('' = every group of `groups`,
    upstream's choice and that of every recipe but tiny; none in common is an error).  The
    decoder and its 30522-way LM head cost most of a tiny-model step on the CPU, once per group:
    the embedded default skips the T-A pass (0.96 against 1.18 s a step, one thread each, two runs
    at once) and keeps the T-V caption, which teaches the vision tower shape and motion (T-AV alone
    for 1200 steps retrieved worse than all three groups for 900 on both seeds tried:
    bench/results/recipe_search.jsonl)."""
    mask_prob: float = 0.6
    """MGC: share of non-pad tokens selected for prediction."""
    label_smoothing: float = 0.0
    """MGC cross-entropy label smoothing."""
    scst_samples: int = 5
    """train.task=scst: captions sampled a clip (the greedy caption is the reward baseline)."""
    grouped_decoder: bool = True
    """MGC: run the groups as one decoder pass stacked on the batch, memory K/V projected once
    (False: one pass per group, the unfused baseline; same losses)."""
    fine_padding: str = "exclude"
    """Fine similarity with padded captions: upstream (VALOR's: the token similarities are
    multiplied by the 0/1 masks, so a caption shorter than fine_text_len tokens lets its padding
    into the max over text tokens as 0 - the clip-side term becomes max(0, best real match)) or
    exclude (padding takes part in no max).  exclude is the better-founded rule - a score then
    depends only on the caption's own tokens, not on how far it was padded, and negative best
    matches keep their gradient - but a checkpoint converted from upstream was trained and is
    scored with the floor.  The token-weight softmax excludes padding either way.  Used by MGA and
    by retrieval scoring.  The default (and recipes tiny, finetune_*) is exclude; the upstream
    recipes valor_b and valor_l choose upstream."""
    fine_text_len: int = 42
    """fine_padding=upstream: upstream pads every caption to this many positions (max_txt_len 40
    word pieces + [CLS] + [SEP]), so a caption with fewer real tokens gets the 0 floor whatever
    our batch's padded length."""
    mask_random_from: int = 999
    """MGC: the 10% random replacements are uniform ids in [mask_random_from, vocab): 106 is
    upstream VALOR's range, which includes bert-base-uncased's [unused] tokens 106-998 (ids that
    never occur in text: 3% of the vocabulary); 999 draws real word pieces only, the better-founded
    choice (the branch exists to teach robustness to wrong real tokens; an [unused] id is a second
    [MASK] in disguise), the default (recipes tiny, finetune_*); valor_b and valor_l choose 106."""
    missing_audio: str = "mask"
    """A clip without audio (batch has_audio False; its spectrogram is all zeros, as upstream's
    loader gives it): mask (it leaves the T-A and T-AV terms of MGA and MGC, and its audio keys
    are masked in the decoder, in training and evaluation) or zeros (upstream VALOR: the zero
    spectrogram's AST tokens take part in every group like real audio; the recipes valor_b and
    valor_l).  mask is the better-founded default: the tokens AST
    makes of an all-zero input are one fixed vector, so upstream's T-A pairs for such clips teach
    the model to match captions with nothing."""


@dataclass
class TrainConfig:
    steps: int = 800
    """Optimiser steps."""
    batch_size: int = 32
    """Global batch size."""
    lr: float = 2e-3
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
    log_every: int = 100
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
    """'' = fresh run; auto = newest complete checkpoint of the run folder train.run_name names
    (required: auto never picks another run's folder); or a checkpoint folder path.  The run's
    config.yaml must agree on every model / loss field and train.task (else refused, listing the
    differences; see train.resume_partial); a finished run resumed trains nothing."""
    resume_partial: bool = False
    """Resume although model / loss fields or train.task differ from the run's config.yaml
    (fine-tuning style): model tensors whose name and shape match are loaded, every missing /
    unexpected tensor and shape mismatch is printed, and the optimiser starts fresh when the
    model's tensors changed."""
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
    after caption fine-tuning); the recipes finetune_<task> set the matching loss weights
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
    rerank_k: int = 16
    """CoAVT retrieval (model.family=coavt): each query's top-k candidates by the contrastive S
    are re-ranked by S + the matching head's match logit (BLIP-2's practice; CoAVT's own k could
    not be read), reported as retrieval_rerank/t2av and av2t; 0 = off (contrastive scores only).
    Other families ignore it."""


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
    label_smoothing: float = 0.1
    """LM cross-entropy label smoothing."""


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
    audio_mask_ratio: float = 0.6
    """Share of a clip's audio patches masked."""
    text_mask_prob: float = 0.15
    """Share of a caption's tokens (after [CLS]) selected for prediction, at least one."""
    norm_pix: bool = True
    """Video target: each patch's pixels normalised by their own mean and std (MAE)."""


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelConfig)
    """The model: the dataclass of model.family (ModelConfig, CoAVTArgs or VLSAArgs, model/args.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    """VALOR's objective (MGA + MGC); the family tasks read their own section below."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    coavt: CoAVTLossConfig = field(default_factory=CoAVTLossConfig)
    vlsa: VLSALossConfig = field(default_factory=VLSALossConfig)


class ConfigError(ValueError):
    """A config value, recipe or override that cannot be used: one line naming the field (or the
    file), the value and what is allowed.  The cli prints it with exit code 2."""


# ---------------- the rules: one per field, checked when the config is resolved ----------------
#
# A field is valid when its value has the field's type (the type of its default; see _coerce)
# and satisfies its entry in RULES.  A new field gets its rule here, in the same commit
# (tests/test_config.py fails for a field without one).  Facts that need two fields are the
# CROSS checks below.

class Rule:
    """What a field allows: `ok(value)` and the phrase `allowed()` for errors and `config show`."""

    def ok(self, value: Any) -> bool:
        return True

    def allowed(self) -> str:
        return "any value of the field's type"

    def check(self, key: str, value: Any) -> None:
        if not self.ok(value):
            raise ConfigError(f"{key}={value!r}: must be {self.allowed()}")


class Num(Rule):
    """A number in a range (floats also finite); `also`: sentinel values allowed besides."""

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                 hi_open: bool = False, also: tuple = ()):
        self.lo, self.hi, self.lo_open, self.hi_open, self.also = lo, hi, lo_open, hi_open, also

    def ok(self, v: Any) -> bool:
        if v in self.also:
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            r = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            r = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            r = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            r = "any finite number"
        return r + "".join(f" or {a!r}" for a in self.also)

    def check(self, key: str, value: Any) -> None:
        if not self.ok(value):
            kind = "an integer" if isinstance(value, int) else "a finite number"
            raise ConfigError(f"{key}={value!r}: must be {kind} {self.allowed()}")


class OneOf(Rule):
    """One of fixed choices, or of a registry's names (`provider`: a callable giving them;
    the rule is skipped while no provider is registered, see register_choices)."""

    def __init__(self, *choices: str, provider: Optional[str] = None):
        self.choices, self.provider = tuple(choices), provider

    def names(self) -> Optional[tuple]:
        if self.provider is None:
            return self.choices
        fn = CHOICE_PROVIDERS.get(self.provider)
        return tuple(fn()) if fn is not None else None

    def ok(self, v: Any) -> bool:
        names = self.names()
        return names is None or v in names

    def allowed(self) -> str:
        names = self.names()
        if names is None:
            return f"a registered {self.provider} name"
        return "one of " + " | ".join(repr(c) if c == "" else c for c in names)


class CommaSet(Rule):
    """A non-empty comma list of distinct choices (loss.groups: tv,ta,tav); with `allow_empty`, ''
    too (loss.mgc_groups: '' = the same as loss.groups)."""

    def __init__(self, *choices: str, allow_empty: bool = False):
        self.choices, self.allow_empty = choices, allow_empty

    def ok(self, v: Any) -> bool:
        if self.allow_empty and str(v).strip() == "":
            return True
        items = [x.strip() for x in str(v).split(",")]
        return bool(items) and all(items) and len(set(items)) == len(items) and set(items) <= set(self.choices)

    def allowed(self) -> str:
        tail = "or '' (the same as loss.groups)" if self.allow_empty else "(at least one)"
        return f"a comma list of distinct {', '.join(self.choices)} {tail}"


class GroupWeights(Rule):
    """'' or a comma list of distinct `group:weight`, each group one of `choices` and each weight
    a finite number > 0 (loss.mga_group_weights: tv:2,ta:0.5,tav:0.5)."""

    def __init__(self, *choices: str):
        self.choices = choices

    def ok(self, v: Any) -> bool:
        items = [x.strip() for x in str(v).split(",") if x.strip()]
        seen = set()
        for kv in items:
            g, sep, w = kv.partition(":")
            try:
                w = float(w)
            except ValueError:
                return False
            if not sep or g.strip() not in self.choices or g.strip() in seen or not (0 < w < math.inf):
                return False
            seen.add(g.strip())
        return True

    def allowed(self) -> str:
        return f"'' or a comma list of distinct group:weight ({', '.join(self.choices)}; weight > 0), e.g. tv:2,ta:0.5"


class Pair(Rule):
    """A pair of numbers each satisfying `each` (train.betas)."""

    def __init__(self, each: Num):
        self.each = each

    def ok(self, v: Any) -> bool:
        return isinstance(v, tuple) and len(v) == 2 and all(self.each.ok(x) for x in v)

    def allowed(self) -> str:
        return f"a pair of numbers, each {self.each.allowed()} (e.g. 0.9,0.98)"


class Text(Rule):
    """A string; `pattern`: a full-match regex with its description; `nonempty`."""

    def __init__(self, pattern: Optional[str] = None, desc: str = "", nonempty: bool = False):
        self.pattern, self.desc, self.nonempty = pattern, desc, nonempty

    def ok(self, v: Any) -> bool:
        if self.nonempty and not v:
            return False
        return self.pattern is None or re.fullmatch(self.pattern, v) is not None

    def allowed(self) -> str:
        return self.desc or ("a non-empty string" if self.nonempty else "any string")


CHOICE_PROVIDERS: Dict[str, Callable[[], Sequence[str]]] = {}


def register_choices(name: str, provider: Callable[[], Sequence[str]]) -> None:
    """Let a registry (the task registry in tasks/base.py) supply the names a OneOf(provider=
    name) rule allows, without config.py importing it."""
    CHOICE_PROVIDERS[name] = provider


ANY = Rule()
POS_INT, NONNEG_INT = Num(lo=1), Num(lo=0)
POSITIVE, NONNEG, UNIT = Num(lo=0, lo_open=True), Num(lo=0), Num(lo=0, hi=1)
NAME = Text(r"(?!\.\.?$)[^/\\]*", "a plain folder name ('' = a timestamp; no '/', not '.' or '..')")
GROUP = OneOf("tv", "ta", "tav")

RULES: Dict[str, Rule] = {
    # model
    "model.family": OneOf(*FAMILIES), "model.size": OneOf(*FAMILY_SIZES["valor"]), "model.vision": OneOf("clip", "swin"),
    "model.swin_size": OneOf("", "tiny", "T", "S", "B"), "model.swin_drop_path": Num(hi=1, hi_open=True),
    "model.image_size": POS_INT, "model.patch_size": POS_INT, "model.vision_width": POS_INT,
    "model.vision_layers": POS_INT, "model.vision_heads": POS_INT, "model.text_width": POS_INT,
    "model.text_layers": POS_INT, "model.text_heads": POS_INT, "model.text_ffn": POS_INT,
    "model.audio_width": POS_INT, "model.audio_layers": POS_INT, "model.audio_heads": POS_INT,
    "model.audio_mel_bins": Num(lo=16), "model.audio_frames": Num(lo=16), "model.contra_dim": POS_INT,
    "model.max_frames": POS_INT, "model.vocab_size": POS_INT, "model.max_positions": Num(lo=3),
    "model.init_text": ANY, "model.init_vision": ANY, "model.pool": OneOf("cls", "mean"),
    "model.temperature": POSITIVE, "model.vision_pos_std": NONNEG,
    "model.temperature_param": OneOf("auto", "logit_scale", "contra_temp"), "model.task_prompts": ANY,
    # data
    "data.root": Text(nonempty=True), "data.synth": ANY, "data.synth_seed": NONNEG_INT,
    "data.synth_clips_per_combo": POS_INT, "data.train_ann": Text(nonempty=True),
    "data.val_ann": Text(nonempty=True), "data.test_ann": Text(nonempty=True), "data.video_dir": ANY,
    "data.audio_dir": ANY, "data.shards": ANY, "data.frames_train": POS_INT, "data.frames_test": POS_INT,
    "data.audio_slices": POS_INT, "data.sample_rate": Num(lo=1000), "data.max_text_len": Num(lo=3),
    "data.backend": OneOf("auto", "cpu", "dali"), "data.num_workers": NONNEG_INT, "data.cache": ANY,
    "data.video_dtype": OneOf("fp32", "bf16"), "data.crop_scale_min": Num(lo=0, hi=1, lo_open=True),
    "data.hflip": ANY, "data.allow_missing_audio": ANY, "data.max_bad_rate": UNIT,
    # loss
    "loss.mga_mode": OneOf("fine", "coarse"), "loss.mga_weight": NONNEG, "loss.mgc_weight": NONNEG,
    "loss.groups": CommaSet("tv", "ta", "tav"), "loss.mgc_groups": CommaSet("tv", "ta", "tav", allow_empty=True),
    "loss.mga_group_weights": GroupWeights("tv", "ta", "tav"), "loss.mask_prob": UNIT,
    "loss.label_smoothing": Num(lo=0, hi=1, hi_open=True), "loss.scst_samples": Num(lo=2),
    "loss.grouped_decoder": ANY, "loss.fine_padding": OneOf("upstream", "exclude"),
    "loss.fine_text_len": POS_INT, "loss.mask_random_from": NONNEG_INT,
    "loss.missing_audio": OneOf("mask", "zeros"),
    # train
    "train.steps": POS_INT, "train.batch_size": POS_INT, "train.lr": POSITIVE, "train.vision_lr": NONNEG,
    "train.weight_decay": NONNEG, "train.betas": Pair(Num(lo=0, hi=1, hi_open=True)), "train.eps": POSITIVE,
    "train.warmup": UNIT, "train.grad_clip": NONNEG, "train.precision": OneOf("auto", "bf16", "fp16", "fp32"),
    "train.seed": NONNEG_INT, "train.eval_every": NONNEG_INT, "train.log_every": POS_INT,
    "train.out_dir": Text(nonempty=True), "train.run_name": NAME,
    "train.device": Text(r"auto|cpu|cuda(:\d+)?", "auto | cpu | cuda | cuda:N"), "train.threads": NONNEG_INT,
    "train.grad_accum": POS_INT, "train.parallel": OneOf("fsdp", "ddp"), "train.hsdp_replicas": NONNEG_INT,
    "train.activation_checkpointing": OneOf("none", "full", "selective"), "train.compile": ANY,
    "train.ckpt_every": NONNEG_INT, "train.keep_ckpts": POS_INT, "train.async_ckpt": ANY, "train.resume": ANY,
    "train.resume_partial": ANY, "train.nan_policy": OneOf("stop", "skip"), "train.max_skips": NONNEG_INT,
    "train.profile": ANY, "train.profile_steps": POS_INT, "train.tensorboard": ANY, "train.deterministic": ANY,
    "train.fail_at_step": Num(lo=-1), "train.sleep_per_step": NONNEG, "train.final_eval": ANY,
    "train.task": OneOf(provider="task"), "train.init": ANY,
    # eval
    "eval.beam": POS_INT, "eval.max_len": POS_INT, "eval.length_penalty": NONNEG, "eval.batch_size": POS_INT,
    "eval.caption_group": GROUP, "eval.retrieval_mode": OneOf("", "fine", "coarse"),
    "eval.retrieval_captions": OneOf("first", "all"), "eval.qa_max_answer_len": POS_INT,
    "eval.rerank_k": NONNEG_INT,
    # coavt (the CoAVT objective)
    "coavt.contrastive_weight": NONNEG, "coavt.matching_weight": NONNEG, "coavt.lm_weight": NONNEG,
    "coavt.hard_negatives": OneOf("sample", "hardest"), "coavt.label_smoothing": Num(lo=0, hi=1, hi_open=True),
    # vlsa (the VLSA objective)
    "vlsa.mm_weight": NONNEG, "vlsa.gam_weight": NONNEG, "vlsa.contrastive_weight": NONNEG,
    "vlsa.video_mask_ratio": Num(lo=0, hi=1, lo_open=True, hi_open=True),
    "vlsa.audio_mask_ratio": Num(lo=0, hi=1, lo_open=True, hi_open=True),
    "vlsa.text_mask_prob": Num(lo=0, hi=1, lo_open=True), "vlsa.norm_pix": ANY,
}

# The `model` section of the other families (model.family=coavt | vlsa: CoAVTArgs / VLSAArgs):
# their rules replace RULES' model.* ones (`rules_of`).
_FAMILY_COMMON: Dict[str, Rule] = {
    "model.family": OneOf(*FAMILIES), "model.image_size": POS_INT, "model.patch_size": POS_INT,
    "model.max_frames": POS_INT, "model.audio_mel_bins": Num(lo=16), "model.audio_frames": Num(lo=16),
    "model.audio_patch": POS_INT, "model.max_slices": POS_INT, "model.width": POS_INT, "model.heads": POS_INT,
    "model.mlp_ratio": POSITIVE, "model.vocab_size": POS_INT, "model.max_positions": Num(lo=3),
    "model.contra_dim": POS_INT, "model.temperature": POSITIVE,
}
MODEL_RULES: Dict[str, Dict[str, Rule]] = {
    "coavt": {**_FAMILY_COMMON, "model.size": OneOf(*FAMILY_SIZES["coavt"]), "model.vision_layers": POS_INT,
              "model.audio_layers": POS_INT, "model.joint_layers": POS_INT, "model.text_layers": POS_INT,
              "model.query_count": POS_INT, "model.query_layers": POS_INT, "model.query_cross_every": POS_INT,
              "model.pool": OneOf("cls", "mean")},
    "vlsa": {**_FAMILY_COMMON, "model.size": OneOf(*FAMILY_SIZES["vlsa"]), "model.layers": POS_INT,
             "model.global_tokens": POS_INT, "model.pool": OneOf("global", "mean")},
}


def rules_of(cfg: "Config") -> Dict[str, Rule]:
    """The rule of every field of `cfg`: RULES, with the model.* rules of cfg.model's family."""
    fam = getattr(cfg.model, "family", "valor")
    if fam == "valor" or fam not in MODEL_RULES:
        return RULES
    return {**{k: v for k, v in RULES.items() if not k.startswith("model.")}, **MODEL_RULES[fam]}


def _cross_positions(cfg: "Config", world: int) -> Optional[str]:
    rows = cfg.model.max_positions
    if cfg.data.max_text_len > rows:
        return f"data.max_text_len={cfg.data.max_text_len}: must be <= model.max_positions ({rows})"
    if cfg.eval.max_len + 2 > rows:
        return f"eval.max_len={cfg.eval.max_len}: [CLS] + it + [MASK] must fit model.max_positions ({rows})"
    if cfg.eval.qa_max_answer_len >= cfg.data.max_text_len - 2:
        return (f"eval.qa_max_answer_len={cfg.eval.qa_max_answer_len}: must be < data.max_text_len - 2 "
                f"({cfg.data.max_text_len - 2}), leaving room for the question")
    return None


def _cross_family(cfg: "Config", world: int) -> Optional[str]:
    try:
        family_of(cfg.model)
    except ValueError as e:
        return str(e)
    return None   # (the task fits the family: tasks.build_task, which knows each task's family)


def _cross_family_shapes(cfg: "Config", world: int) -> Optional[str]:
    # CoAVT / VLSA: the slot tables and head split of their own dataclasses
    m, d = cfg.model, cfg.data
    for key, n, slots, what in (("data.frames_train", d.frames_train, m.max_frames, "model.max_frames"),
                                ("data.frames_test", d.frames_test, m.max_frames, "model.max_frames"),
                                ("data.audio_slices", d.audio_slices, m.max_slices, "model.max_slices")):
        if n > slots:
            return f"{key}={n}: must be <= {what} ({slots}, the embedding's slots)"
    if m.patch_size > m.image_size:
        return f"model.patch_size={m.patch_size}: must be <= model.image_size ({m.image_size})"
    if m.width % m.heads:
        return f"model.heads={m.heads}: must divide model.width ({m.width})"
    return None


def _cross_frames(cfg: "Config", world: int) -> Optional[str]:
    m, d = cfg.model, cfg.data
    if m.family != "valor":
        return _cross_family_shapes(cfg, world)
    for key, n in (("data.frames_train", d.frames_train), ("data.frames_test", d.frames_test),
                   ("data.audio_slices", d.audio_slices)):
        if n > m.max_frames:
            return f"{key}={n}: must be <= model.max_frames ({m.max_frames}, the frame embedding's slots)"
    if m.vision == "clip" and m.patch_size > m.image_size:
        return f"model.patch_size={m.patch_size}: must be <= model.image_size ({m.image_size})"
    return None


def _cross_vocab(cfg: "Config", world: int) -> Optional[str]:
    if cfg.loss.mask_random_from >= cfg.model.vocab_size:
        return (f"loss.mask_random_from={cfg.loss.mask_random_from}: must be < model.vocab_size "
                f"({cfg.model.vocab_size})")
    return None


def _cross_heads(cfg: "Config", world: int) -> Optional[str]:
    m = cfg.model
    if m.family != "valor":
        return None   # one width for every tower: _cross_family_shapes
    pairs = [("text", m.text_width, m.text_heads), ("audio", m.audio_width, m.audio_heads)]
    if m.vision == "clip":
        pairs.append(("vision", m.vision_width, m.vision_heads))
    for name, width, heads in pairs:
        if width % heads:
            return f"model.{name}_heads={heads}: must divide model.{name}_width ({width})"
    return None


def _cross_groups(cfg: "Config", world: int) -> Optional[str]:
    want = {g.strip() for g in cfg.loss.mgc_groups.split(",") if g.strip()}
    if want and not want & {g.strip() for g in cfg.loss.groups.split(",")}:
        return (f"loss.mgc_groups={cfg.loss.mgc_groups}: no group in common with loss.groups ({cfg.loss.groups}), "
                f"MGC would train nothing; set --loss.mgc_groups '' (all of loss.groups) or some of them")
    return None


def _cross_batch(cfg: "Config", world: int) -> Optional[str]:
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        return (f"train.batch_size={t.batch_size}: must divide by world ({world}) x train.grad_accum "
                f"({t.grad_accum})")
    if t.hsdp_replicas > 1 and world > 1 and world % t.hsdp_replicas:
        return f"train.hsdp_replicas={t.hsdp_replicas}: must divide the world size ({world})"
    return None


CROSS: List[Callable[["Config", int], Optional[str]]] = [_cross_positions, _cross_frames, _cross_heads,
                                                         _cross_batch, _cross_vocab, _cross_groups]


def validate(cfg: "Config", world: Optional[int] = None) -> "Config":
    """Check every field against RULES and the CROSS facts; ConfigError (one line) at the first
    violation.  `world`: processes of the run (default: WORLD_SIZE, else 1)."""
    if world is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    msg = _cross_family(cfg, world)   # first: the rules to check depend on the family
    if msg:
        raise ConfigError(msg)
    rules = rules_of(cfg)
    for sec in fields(cfg):
        section = getattr(cfg, sec.name)
        for f in fields(section):
            key = f"{sec.name}.{f.name}"
            rule = rules.get(key)
            if rule is None:
                raise ConfigError(f"{key}: the field has no rule in valor_fast.config.RULES (add one)")
            rule.check(key, getattr(section, f.name))
    for cross in CROSS:
        msg = cross(cfg, world)
        if msg:
            raise ConfigError(msg)
    return cfg


check = validate   # the older name


# ---------------- types: coercing override strings and YAML values ----------------

def type_name(current: Any) -> str:
    if isinstance(current, bool):
        return "bool"
    if isinstance(current, tuple):
        return "tuple[" + ", ".join(type_name(c) for c in current) + "]"
    return type(current).__name__


def _bad_type(name: str, value: Any, what: str) -> ConfigError:
    return ConfigError(f"{name}={value!r}: expected {what}")


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).lower() if isinstance(value, (str, int)) else None
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise _bad_type(name, value, "a boolean (true / false)")


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad_type(name, value, "an integer")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise _bad_type(name, value, "an integer") from None
        if not math.isfinite(f) or f != int(f):
            raise _bad_type(name, value, "an integer") from None
        return int(f)


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad_type(name, value, "a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _bad_type(name, value, "a number") from None


def _coerce(value: Any, current: Any, name: str) -> Any:
    """`value` (an override string or a YAML value) as the type of the field's `current`
    value; ConfigError naming the field and the expected type otherwise."""
    if isinstance(current, bool):
        return _to_bool(value, name)
    if isinstance(current, int):
        return _to_int(value, name)
    if isinstance(current, float):
        return _to_float(value, name)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise _bad_type(name, value, f"{len(current)} comma-separated values ({type_name(current)})")
        return tuple(_coerce(v, c, name) for c, v in zip(current, value))
    if isinstance(current, str):
        if value is None or isinstance(value, (dict, list, tuple)):
            raise _bad_type(name, value, "a string (write '' for empty)")
        return str(value)
    return value


def _int(key: str, value: Any) -> int:
    return _to_int(value, key)


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
            raise ConfigError(f"model.max_text_len (moved: it set model.max_positions = {rows}) conflicts with "
                             f"model.max_positions={out['model.max_positions']}; keep model.max_positions only")
        out.setdefault("model.max_positions", rows)
        log.warning("config: model.max_text_len is gone; the text length is data.max_text_len and the position "
                    "table model.max_positions (set to %d)", rows)
    if "data.audio_mel_bins" in out:
        bins = _int("data.audio_mel_bins", out.pop("data.audio_mel_bins"))
        if "model.audio_mel_bins" in out and _int("model.audio_mel_bins", out["model.audio_mel_bins"]) != bins:
            raise ConfigError(f"data.audio_mel_bins={bins} and model.audio_mel_bins={out['model.audio_mel_bins']} "
                             "differ; the fbank bins are now model.audio_mel_bins alone")
        out["model.audio_mel_bins"] = bins
        log.warning("config: data.audio_mel_bins moved to model.audio_mel_bins (= %d)", bins)
    if "model.gradient_checkpointing" in out:
        if _coerce(out.pop("model.gradient_checkpointing"), False, "model.gradient_checkpointing"):
            raise ConfigError("model.gradient_checkpointing was removed (it never took effect); use "
                             "train.activation_checkpointing=full (or selective)")
        log.warning("config: model.gradient_checkpointing (removed, it never took effect) ignored")
    return out


def apply_overrides(cfg: Config, overrides: dict, source: str = "override") -> Config:
    """Apply {"train.lr": "3e-4", ...}; unknown keys are an error naming the key (and
    `source`: the recipe file or "override"); moved fields are mapped (`_migrate`)."""
    for key, value in _migrate(overrides).items():
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"{source} {key!r}: expected section.field, e.g. train.lr")
        sec, name = parts
        if sec not in {f.name for f in fields(cfg)}:
            raise ConfigError(f"{source} {key!r}: no section {sec!r} (sections: {', '.join(f.name for f in fields(cfg))})")
        section = getattr(cfg, sec)
        if name not in {f.name for f in fields(section)}:
            raise ConfigError(f"{source} {key!r}: section {sec!r} has no field {name!r} (valor-fast config show "
                              f"--section {sec} lists them)")
        setattr(section, name, _coerce(value, getattr(section, name), key))
    return cfg


RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
"""The recipes shipped in the package (package data: an installed valor-fast has them too)."""


def recipe_names() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml")) if os.path.isdir(RECIPES_DIR) else []


def find_recipe(path: str) -> str:
    """A recipe's file: an existing YAML path, else a shipped recipe by name (`tiny`,
    `finetune_qa`, `finetune_qa.yaml`).  The recipes' old place, `configs/<name>.yaml` (gone from
    the repository), also resolves to the shipped recipe, with a warning."""
    if os.path.isfile(path):
        return path
    name = os.path.basename(path) if os.path.dirname(os.path.normpath(path)) == "configs" else path
    stem = name[:-5] if name.endswith(".yaml") else name
    alt = os.path.join(RECIPES_DIR, stem + ".yaml")
    if os.sep not in stem and "/" not in stem and os.path.isfile(alt):
        if name != path:
            log.warning("config %s: the recipes moved into the package; using the recipe %r (%s)", path, stem, alt)
        return alt
    raise ConfigError(f"config {path!r} not found (a YAML path, or a recipe name: {', '.join(recipe_names())})")


def read_recipe(path: str) -> Dict[str, Any]:
    """The recipe's {"section.field": value}: the file must be a mapping of sections, each a
    mapping of fields (ConfigError naming the file otherwise)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config {path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except OSError as e:
        raise ConfigError(f"config {path}: cannot be read ({e.strerror or e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping of sections (model:, data:, loss:, train:, eval:), "
                          f"got a {type(raw).__name__}")
    flat = {}
    for sec, body in raw.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"config {path}: section {sec!r} must be a mapping of fields, got a "
                              f"{type(body).__name__} ({body!r})")
        flat.update({f"{sec}.{k}": v for k, v in body.items()})
    return flat


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None, world: Optional[int] = None) -> Config:
    """Build a Config: defaults <- named model size <- recipe YAML <- dotted overrides; then
    every field is validated (`validate`; ConfigError naming the field, value and range).
    `path`: a YAML path or a recipe name (`find_recipe`); None = the defaults, which are the
    embedded default recipe (tiny)."""
    flat = read_recipe(find_recipe(path)) if path else {}
    source = f"config {path}:" if path else "override"
    overrides = dict(overrides or {})
    family = str(overrides.get("model.family", flat.get("model.family", "valor")))
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r}: must be one of {' | '.join(FAMILIES)}")
    sizes = FAMILY_SIZES[family]
    size = str(overrides.get("model.size", flat.get("model.size", "tiny")))
    if size not in sizes:
        raise ConfigError(f"model.size={size!r}: must be one of {' | '.join(sizes)} (model.family={family})")
    cfg = Config(model=family_config(family, size))
    apply_overrides(cfg, flat, source)
    apply_overrides(cfg, overrides)
    users = set(overrides) | (set(flat) if path and not _shipped(find_recipe(path)) else set())
    upstream_semantics(cfg, users)
    return validate(cfg, world)


# What upstream VALOR computes where our default differs (docs/upstream.md P1, P4, X1): the
# semantics of a model that starts from an upstream checkpoint unless the user says otherwise.
UPSTREAM_SEMANTICS = {"loss.fine_padding": "upstream", "loss.mask_random_from": 106, "loss.missing_audio": "zeros"}


def _shipped(recipe: str) -> bool:
    return os.path.dirname(os.path.abspath(recipe)) == RECIPES_DIR


def is_upstream_init(init: str) -> bool:
    """train.init names an upstream VALOR checkpoint: a `model_step_N.pt`-style file (our own
    weights are safetensors) or a safetensors file `valor-fast convert` wrote (its metadata says
    what it was converted from).  Only the metadata is read."""
    if not init or not os.path.isfile(init):
        return False
    if not init.endswith(".safetensors"):
        return True
    try:
        from safetensors import safe_open
        with safe_open(init, "pt") as f:
            return bool((f.metadata() or {}).get("converted_from"))
    except Exception:   # an unreadable file is the loader's error to report, by name
        return False


def upstream_semantics(cfg: "Config", users: set) -> None:
    """A run that starts from an upstream checkpoint computes what upstream computes: the fields
    of UPSTREAM_SEMANTICS take upstream's values unless the user set them (a command-line
    override, or their own recipe file; the shipped recipes' choices are ours, not the user's)."""
    if cfg.model.family != "valor" or not is_upstream_init(cfg.train.init):
        return
    changed = []
    for key, value in UPSTREAM_SEMANTICS.items():
        sec, name = key.split(".")
        if key not in users and getattr(getattr(cfg, sec), name) != value:
            setattr(getattr(cfg, sec), name, value)
            changed.append(f"{key}={value}")
    if changed:
        log.info("train.init %s is an upstream VALOR checkpoint: %s, as upstream computes (set a field "
                 "to keep ours, e.g. --loss.fine_padding exclude)", cfg.train.init, ", ".join(changed))


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["train"]["betas"] = list(d["train"]["betas"])
    return d


def dump(cfg: Config, path: str) -> None:
    """config.yaml of a run folder, written atomically."""
    from .utils.fs import atomic_write_bytes
    atomic_write_bytes(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode(), "config")


# ---------------- `valor-fast config show` ----------------

def field_docs(cls) -> Dict[str, str]:
    """{field: docstring} of a dataclass whose fields carry a string literal below them."""
    import ast
    import inspect
    import textwrap
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def show(cfg: Config, section: Optional[str] = None, width: int = 100) -> str:
    """Every field (of `section`, or all): `section.field: type = value` (with the size's
    default when the value differs), the allowed values, and the docstring."""
    import textwrap
    secs = [f.name for f in fields(cfg)]
    if section is not None and section not in secs:
        raise ConfigError(f"--section {section!r}: choose one of {', '.join(secs)}")
    default = Config(model=family_config(cfg.model.family, cfg.model.size))
    rules = rules_of(cfg)
    lines = []
    for sec in secs if section is None else [section]:
        part, base = getattr(cfg, sec), getattr(default, sec)
        docs = field_docs(type(part))
        lines.append(f"[{sec}]")
        for f in fields(part):
            key, cur, dflt = f"{sec}.{f.name}", getattr(part, f.name), getattr(base, f.name)
            note = "" if cur == dflt else f"   (default {dflt!r})"
            lines.append(f"  {key}: {type_name(cur)} = {cur!r}{note}")
            lines.append(f"      allowed: {rules[key].allowed() if key in rules else '(no rule)'}")
            lines += textwrap.wrap(docs.get(f.name, "(no docstring)"), width, initial_indent="      ",
                                   subsequent_indent="      ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
