"""Model FLOPs of a VALOR training step (matmuls only, forward x 3 for forward + backward), for
MFU: the dense projections and the attention score/value products of the encoders, the decoder
passes and the LM head.  Contrastive similarities (O(B) a sample) and norms are not counted."""
from __future__ import annotations

from typing import Optional, Sequence

from .args import TASK_PROMPT_IDS, ModelConfig, swin_size_of
from .swin import SWIN_SIZES, clip_window

GROUPS = ("tv", "ta", "tav")


def encoder_flops(tokens: int, width: int, layers: int, ffn: int, seq_len: int) -> float:
    """Forward FLOPs of `layers` transformer blocks over `tokens` tokens: q, k, v, o projections
    and the MLP on every token, QK^T and PV over seq_len keys."""
    per_tok = 2 * (4 * width * width + 2 * width * ffn) + 2 * 2 * seq_len * width   # qkvo + mlp + QK^T, PV
    return tokens * per_tok * layers


def cross_flops(tokens: int, width: int, layers: int, mem: int) -> float:
    """Forward FLOPs of the decoder's cross-attention on `tokens` text tokens: q and o projections,
    QK^T and PV over `mem` memory keys (the memory's k, v projections are counted apart)."""
    return tokens * layers * (2 * 2 * width * width + 2 * 2 * mem * width)


def swin_flops(size: str, frames: int, image_size: int) -> tuple:
    """(forward FLOPs, tokens a frame at the output) of a Video Swin over one clip: patch
    embedding, per block qkv/proj/MLP on every token plus QK^T and PV over its (clipped) window,
    and the patch mergings.  Window padding is ignored (none at 224 px / 7x7 windows)."""
    a = SWIN_SIZES[size]
    C, side = a["embed_dim"], -(-image_size // 4)
    f = frames * side * side * 2 * (3 * 2 * 4 * 4) * C            # Conv3d (2, 4, 4)
    for i, (depth, _) in enumerate(zip(a["depths"], a["heads"])):
        tokens = frames * side * side
        ws, _ = clip_window((frames, side, side), a["window"], (0, 0, 0))
        n = ws[0] * ws[1] * ws[2]
        f += depth * tokens * (2 * (4 * C * C + 8 * C * C) + 2 * 2 * n * C)
        if i < len(a["depths"]) - 1:
            side = -(-side // 2)
            f += frames * side * side * 2 * (4 * C) * (2 * C)     # merge: Linear(4C, 2C)
            C *= 2
    return f, side * side


def _vision(cfg: ModelConfig, frames: int) -> tuple:
    """(forward FLOPs, tokens a frame) of the vision encoder over one clip."""
    if cfg.vision == "swin":
        return swin_flops(swin_size_of(cfg), frames, cfg.image_size)
    v_len = (cfg.image_size // cfg.patch_size) ** 2 + 1
    return frames * encoder_flops(v_len, cfg.vision_width, cfg.vision_layers, 4 * cfg.vision_width, v_len), v_len


def training_flops_per_sample(cfg: ModelConfig, *, frames: int, text_len: int, audio_slices: int = 1,
                              mga_groups: Sequence[str] = (), mgc_groups: Sequence[str] = (),
                              mask_prob: float = 0.6) -> float:
    """FLOPs (forward + backward = 3x forward) one sample of a training step needs, given the
    groups (tv, ta, tav) its objective trains: MGA (`mga_groups`: contrastive alignment, reads the
    text encoder) and MGC (`mgc_groups`: one decoder pass a group, masked captioning; QA decodes
    its groups too).  Retrieval has MGC groups (); captioning and QA have MGA groups ().

    Counted: the vision encoder when a group reads video (tv, tav), the audio encoder when one
    reads audio (ta, tav), the text encoder with MGA; per MGC group a decoder pass (the BERT layers,
    causal self-attention over the text, plus cross-attention over the memory: the counted
    encoders' tokens, whose other-modality keys a group masks rather than drops), the memory K/V
    projected once, and the LM head at the `mask_prob` share of the text positions.  Work a step does that its objective does not read
    is not model FLOPs and is left out."""
    bad = [g for g in (*mga_groups, *mgc_groups) if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown groups {bad}; choose from {GROUPS}")
    groups = set(mga_groups) | set(mgc_groups)
    f, mem = 0.0, 0
    if groups & {"tv", "tav"}:
        vis, v_len = _vision(cfg, frames)
        f, mem = f + vis, mem + frames * v_len
    if groups & {"ta", "tav"}:
        a_len = (cfg.audio_mel_bins // 16) * (cfg.audio_frames // 16) + 1
        f += audio_slices * encoder_flops(a_len, cfg.audio_width, cfg.audio_layers, 4 * cfg.audio_width, a_len)
        mem += audio_slices * a_len
    tw, tl = cfg.text_width, cfg.text_layers
    # model.task_prompts: the prompt's tokens run through the BERT beside the text (VALOR-L)
    pe = len(TASK_PROMPT_IDS["contra"]) if cfg.task_prompts else 0
    pd = len(TASK_PROMPT_IDS["caption"]) if cfg.task_prompts else 0
    if mga_groups:
        f += encoder_flops(text_len + pe, tw, tl, cfg.text_ffn, text_len + pe)
    if mgc_groups:
        n = len(mgc_groups)
        f += n * (encoder_flops(text_len + pd, tw, tl, cfg.text_ffn, text_len + pd)
                  + cross_flops(text_len + pd, tw, tl, mem))
        f += tl * 2 * 2 * mem * tw * tw                                    # memory K/V once
        f += n * mask_prob * text_len * 2 * tw * cfg.vocab_size           # LM head at the masked rows
    return 3.0 * f
