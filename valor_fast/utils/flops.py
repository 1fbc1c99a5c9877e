"""Model FLOPs of a VALOR training step (matmuls only, forward x 3 for forward + backward),
for MFU.  Counts the dense projections and the attention score/value products."""
from __future__ import annotations

from ..config import ModelConfig


def _encoder_flops(tokens: int, seqs: int, width: int, layers: int, ffn: int, seq_len: int, kv_len: int = None,
                   cross: bool = False) -> float:
    kv_len = kv_len or seq_len
    per_tok = 2 * (4 * width * width + 2 * width * ffn) + 2 * 2 * kv_len * width   # qkvo + mlp + QK^T, PV
    f = tokens * per_tok * layers
    if cross:   # cross-attention: q, o on text tokens; k, v on memory (counted by the caller)
        f += tokens * layers * (2 * 2 * width * width + 2 * 2 * kv_len * width)
    return f


def swin_flops(size: str, frames: int, image_size: int) -> tuple:
    """(forward FLOPs, tokens a frame at the output) of a Video Swin over one clip: patch
    embedding, per block qkv/proj/MLP on every token plus QK^T and PV over its (clipped) window,
    and the patch mergings.  Window padding is ignored (none at 224 px / 7x7 windows)."""
    from ..model.swin import SWIN_SIZES, clip_window
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


def training_flops_per_sample(cfg: ModelConfig, frames: int, text_len: int, audio_slices: int = 1,
                              groups: int = 3, mask_prob: float = 0.6) -> float:
    """FLOPs (forward + backward = 3x forward) of one sample: encoders, three caption passes
    (the decoder re-runs the BERT layers with cross-attention), and the LM head at the masked
    positions."""
    a_len = (cfg.audio_mel_bins // 16) * (cfg.audio_frames // 16) + 1
    if cfg.vision == "swin":
        from ..config import swin_size_of
        vis, v_len = swin_flops(swin_size_of(cfg), frames, cfg.image_size)
    else:
        v_len = (cfg.image_size // cfg.patch_size) ** 2 + 1
        vis = frames * _encoder_flops(v_len, 1, cfg.vision_width, cfg.vision_layers, 4 * cfg.vision_width, v_len)
    aud = audio_slices * _encoder_flops(a_len, 1, cfg.audio_width, cfg.audio_layers, 4 * cfg.audio_width, a_len)
    txt = _encoder_flops(text_len, 1, cfg.text_width, cfg.text_layers, cfg.text_ffn, text_len)
    mem = frames * v_len + audio_slices * a_len
    dec = groups * _encoder_flops(text_len, 1, cfg.text_width, cfg.text_layers, cfg.text_ffn, text_len,
                                  kv_len=mem, cross=True)
    dec += cfg.text_layers * 2 * 2 * mem * cfg.text_width * cfg.text_width   # memory K/V once
    lm = groups * mask_prob * text_len * 2 * cfg.text_width * cfg.vocab_size
    return 3.0 * (vis + aud + txt + dec + lm)


# dense bf16 peak TFLOP/s by device name fragment (vendor figures; MFU is against these unless
# a measured peak is given)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_peak_tflops(device) -> float:
    import torch
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v
    return 0.0
