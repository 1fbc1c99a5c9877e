"""Upstream VALOR semantics in float64, computed directly from an upstream-layout state dict.

An independent re-derivation of docs/upstream.md (TXH-mercury/VALOR @ 1b51e66) for the conversion
parity test (tests/model/test_upstream_parity.py): pure torch, importing nothing from valor_fast.  It
has two halves:

  * `build_state_dict(dims)`: a small model's state dict with upstream's key names and tensor
    layouts (BERT with va_concate cross-attention under multimodal_encoder.* and again under
    txt_encoder.*, the `cls.*` LM head, CLIP `clip_model.*` with packed in_proj and logit_scale
    (VALOR-L shape) or Video Swin `video_encoder.*` (VALOR-B shape), AST, contrastive heads,
    fine-weight MLPs or va_fusion, contra_temp, frame/type embeddings, prompt_embedding), random
    values;
  * forward functions reading that dict: encoders, fine/coarse similarities with upstream's
    padded max, per-group InfoNCE with the recipe's temperature, masked-caption losses for given
    masking, decoder logits, task prompts on VALOR-L.

`Tracked(sd)` records every key the forward reads, so a test can check that the converter keeps
each of them.  Shapes follow upstream: audio is (B, S, mel, frames), video (B, n, 3, H, W), text
ids (B, L) padded with 0.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

DT = torch.float64
NEG_MASK = -10000.0          # BERT's additive mask value
SWIN_REGION_MASK = -100.0    # Swin's cross-region score offset
MASK_ID, FIRST_RANDOM_ID = 103, 106
VOCAB = 8192                 # small, still above every prompt id (upstream: bert-base-uncased, 30522)
TEXT_LEN = 42                # upstream pads every caption to max_txt_len 40 + [CLS] + [SEP]
# bert-base-uncased ids of upstream's task prompts (docs/upstream.md section 7)
PROMPT_CONTRA = (101, 2622, 2653, 1999, 2691, 2686, 102)           # project language in common space
PROMPT_CAPTION = (101, 6235, 1996, 2678, 2007, 3019, 2653, 102)    # describe the video with natural language
GROUPS = ("tva", "tv", "ta")                                        # upstream's group names


@dataclass(frozen=True)
class Dims:
    """A tiny VALOR.  kind "b": Video Swin + contra_temp, no prompts; "l": CLIP ViT + logit_scale +
    task prompts.  contra "fine" carries the fine-weight MLPs, "coarse" va_fusion (upstream builds
    one or the other).  The audio width equals the text width, as AST-768 = BERT-768 upstream, so
    there is no hidden_trans_audio_multimodal."""
    kind: str = "b"
    contra: str = "fine"
    d: int = 48
    text_layers: int = 2
    text_heads: int = 2
    ffn: int = 96
    C: int = 32
    audio_layers: int = 2
    audio_heads: int = 2
    mel: int = 32
    frames: int = 64
    clip_width: int = 128      # heads = width // 64, upstream's rule
    clip_layers: int = 2
    patch: int = 8
    swin_embed: int = 32       # valor-fast's "tiny" Swin
    swin_depths: Tuple[int, ...] = (2, 2)
    swin_heads: Tuple[int, ...] = (2, 4)
    window: Tuple[int, int, int] = (2, 4, 4)
    contra_temp: float = 0.05
    logit_scale: float = math.log(1 / 0.03)

    @property
    def image(self) -> int:
        return 16 if self.kind == "l" else 32

    @property
    def vision_width(self) -> int:
        return self.clip_width if self.kind == "l" else self.swin_embed * 2 ** (len(self.swin_depths) - 1)

    @property
    def prompts(self) -> bool:
        return self.kind == "l"


class Tracked(dict):
    """A state dict that remembers which keys were read."""

    def __init__(self, sd):
        super().__init__(sd)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)


# ----------------------------------------------------------------------------------------------
# the upstream-layout state dict
# ----------------------------------------------------------------------------------------------
def swin_relative_index(window) -> torch.Tensor:
    """(N, N) index into the ((2wd-1)(2wh-1)(2ww-1), heads) bias table, tokens d-major: the buffer
    upstream stores as attn.relative_position_index."""
    wd, wh, ww = window
    pts = [(a, b, c) for a in range(wd) for b in range(wh) for c in range(ww)]
    idx = [[(p[0] - q[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1) + (p[1] - q[1] + wh - 1) * (2 * ww - 1)
            + (p[2] - q[2] + ww - 1) for q in pts] for p in pts]
    return torch.tensor(idx, dtype=torch.long)


def build_state_dict(dm: Dims, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: torch.randn(*s, generator=g, dtype=DT) * std  # noqa: E731
    sd: Dict[str, torch.Tensor] = {}

    def linear(p, n_out, n_in, bias=True):
        sd[p + ".weight"] = rnd(n_out, n_in, std=n_in ** -0.5)
        if bias:
            sd[p + ".bias"] = rnd(n_out, std=0.1)

    def norm(p, n):
        sd[p + ".weight"], sd[p + ".bias"] = 1 + rnd(n, std=0.1), rnd(n, std=0.1)

    d, C, V = dm.d, dm.C, VOCAB
    mm = "multimodal_encoder."
    sd[mm + "embeddings.word_embeddings.weight"] = rnd(V, d, std=0.5)
    sd[mm + "embeddings.position_embeddings.weight"] = rnd(512, d, std=0.5)
    sd[mm + "embeddings.token_type_embeddings.weight"] = rnd(2, d, std=0.5)
    sd[mm + "embeddings.prompt_embedding.weight"] = rnd(1, d, std=0.5)
    norm(mm + "embeddings.LayerNorm", d)
    for i in range(dm.text_layers):
        p = f"{mm}encoder.layer.{i}."
        for blk in ("attention.self", "cross_attn.cross"):
            for n in ("query", "key", "value"):
                linear(f"{p}{blk}.{n}", d, d)
        for blk in ("attention.output", "cross_attn.output"):
            linear(f"{p}{blk}.dense", d, d)
            norm(f"{p}{blk}.LayerNorm", d)
        linear(p + "intermediate.dense", dm.ffn, d)
        linear(p + "output.dense", d, dm.ffn)
        norm(p + "output.LayerNorm", d)
    linear(mm + "pooler.dense", d, d)                       # never read
    for k in [k for k in sd if k.startswith(mm)]:           # the shared text encoder, saved twice
        sd["txt_encoder." + k[len(mm):]] = sd[k]
    linear("cls.dense", d, d)
    norm("cls.layernorm", d)
    sd["cls.decoder.weight"] = sd[mm + "embeddings.word_embeddings.weight"]   # tied
    sd["cls.decoder.bias"] = rnd(V, std=0.1)

    vw = dm.vision_width
    if dm.kind == "l":
        cv = "clip_model.visual."
        n = dm.image // dm.patch
        sd[cv + "conv1.weight"] = rnd(vw, 3, dm.patch, dm.patch, std=(3 * dm.patch ** 2) ** -0.5)
        sd[cv + "class_embedding"] = rnd(vw, std=0.5)
        sd[cv + "positional_embedding"] = rnd(n * n + 1, vw, std=0.5)
        norm(cv + "ln_pre", vw)
        norm(cv + "ln_post", vw)
        for i in range(dm.clip_layers):
            p = f"{cv}transformer.resblocks.{i}."
            sd[p + "attn.in_proj_weight"] = rnd(3 * vw, vw, std=vw ** -0.5)   # q; k; v packed
            sd[p + "attn.in_proj_bias"] = rnd(3 * vw, std=0.1)
            linear(p + "attn.out_proj", vw, vw)
            norm(p + "ln_1", vw)
            norm(p + "ln_2", vw)
            linear(p + "mlp.c_fc", 4 * vw, vw)
            linear(p + "mlp.c_proj", vw, 4 * vw)
        sd[cv + "proj"] = rnd(vw, 24, std=vw ** -0.5)       # CLIP's own projection: not read (BERT text)
        # CLIP's text tower is in upstream's state dict but never read with a BERT text encoder
        sd["clip_model.token_embedding.weight"] = rnd(50, 16)
        sd["clip_model.positional_embedding"] = rnd(8, 16)
        sd["clip_model.prompt_embedding.weight"] = rnd(1, 16)
        sd["clip_model.text_projection"] = rnd(16, 24)
        norm("clip_model.ln_final", 16)
        linear("clip_model.transformer.resblocks.0.mlp.c_fc", 64, 16)
        sd["clip_model.logit_scale"] = torch.tensor(dm.logit_scale, dtype=DT)
    else:
        sw = "video_encoder."
        e = dm.swin_embed
        sd[sw + "patch_embed.proj.weight"] = rnd(e, 3, 2, 4, 4, std=96 ** -0.5)
        sd[sw + "patch_embed.proj.bias"] = rnd(e, std=0.1)
        norm(sw + "patch_embed.norm", e)
        n_rel = (2 * dm.window[0] - 1) * (2 * dm.window[1] - 1) * (2 * dm.window[2] - 1)
        for i, (depth, heads) in enumerate(zip(dm.swin_depths, dm.swin_heads)):
            c = e * 2 ** i
            for j in range(depth):
                p = f"{sw}layers.{i}.blocks.{j}."
                norm(p + "norm1", c)
                linear(p + "attn.qkv", 3 * c, c)
                linear(p + "attn.proj", c, c)
                sd[p + "attn.relative_position_bias_table"] = rnd(n_rel, heads, std=0.5)
                sd[p + "attn.relative_position_index"] = swin_relative_index(dm.window)
                norm(p + "norm2", c)
                linear(p + "mlp.fc1", 4 * c, c)
                linear(p + "mlp.fc2", c, 4 * c)
            if i < len(dm.swin_depths) - 1:
                norm(f"{sw}layers.{i}.downsample.norm", 4 * c)
                linear(f"{sw}layers.{i}.downsample.reduction", 2 * c, 4 * c, bias=False)
        norm(sw + "norm", vw)

    grid = (dm.mel // 16) * (dm.frames // 16)
    sd["audio_embeddings.cls_token"] = rnd(1, 1, d, std=0.5)
    sd["audio_embeddings.first_conv.weight"] = rnd(d, 1, 16, 16, std=1 / 16)
    sd["audio_embeddings.first_conv.bias"] = rnd(d, std=0.1)
    sd["audio_embeddings.position_embeddings.weight"] = rnd(grid + 1, d, std=0.5)
    for i in range(dm.audio_layers):
        p = f"audio_encoder.layer.{i}."
        for j in range(4):
            linear(f"{p}attention.linears.{j}", d, d)
        linear(p + "ff_layer.linear1", 4 * d, d)
        linear(p + "ff_layer.linear2", d, 4 * d)
        norm(p + "layernorm1", d)
        norm(p + "layernorm2", d)
    norm("audio_encoder.last_layernorm", d)

    sd["contra_head_t.linear.weight"] = rnd(C, d, std=d ** -0.5)
    sd["contra_head_v.linear.weight"] = rnd(C, vw, std=vw ** -0.5)
    sd["contra_head_a.linear.weight"] = rnd(C, d, std=d ** -0.5)
    if dm.contra == "fine":
        for m in ("text", "video", "audio"):
            linear(f"{m}_fine_weight.0", C, C)
            sd[f"{m}_fine_weight.2.weight"], sd[f"{m}_fine_weight.2.bias"] = rnd(1, C, std=2.0), rnd(1, std=0.5)
    else:
        linear("va_fusion", C, 2 * C)
        sd["va_fusion.bias"] = rnd(C, std=0.5)
    sd["contra_temp"] = torch.tensor(dm.contra_temp, dtype=DT)     # read only without CLIP vision
    for m in ("video", "audio"):
        sd[f"{m}_frame_embedding"] = rnd(1, 32, d, std=0.5)
        sd[f"{m}_type_embeddings"] = rnd(1, 1, d, std=0.5)
    if vw != d:
        linear("hidden_trans_video_multimodal.0", d, vw)
        norm("hidden_trans_video_multimodal.1", d)
    return sd


# ----------------------------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------------------------
def _ln(sd, p, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(sd, p, x, bias=True):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"] if bias else None)


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _attend(q, k, v, heads, add=None):
    """softmax(q k^T / sqrt(hd) + add) v per head; q (B, Lq, D), k/v (B, Lk, D)."""
    B, Lq, D = q.shape
    split = lambda x: x.reshape(B, x.shape[1], heads, D // heads).transpose(1, 2)  # noqa: E731
    s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(D // heads)
    if add is not None:
        s = s + add
    return (s.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, Lq, D)


def norm(x):
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# encoders (docs/upstream.md section 3)
# ----------------------------------------------------------------------------------------------
def bert(sd, dm: Dims, ids, prompt=None, memory=None, causal=False):
    """The shared BERT: text encoder (causal False, memory None) or decoder.  Sequence
    [text ; prompt], prompt positions from 0 with prompt_embedding; returns the text rows."""
    e = "multimodal_encoder.embeddings."

    def embed(x, type_row):
        return _ln(sd, e + "LayerNorm", sd[e + "word_embeddings.weight"][x]
                   + sd[e + "position_embeddings.weight"][:x.shape[1]] + type_row, 1e-12)

    x, real, L = embed(ids, sd[e + "token_type_embeddings.weight"][0]), ids != 0, ids.shape[1]
    if prompt is not None:
        x = torch.cat([x, embed(prompt, sd[e + "prompt_embedding.weight"][0])], 1)
        real = torch.cat([real, prompt != 0], 1)
    N = x.shape[1]
    allow = real[:, None, :].expand(-1, N, -1).clone()          # (B, query, key)
    if causal:
        allow[:, :L, :L] &= torch.ones(L, L, dtype=torch.bool).tril()
        allow[:, L:, :L] = False                                # prompt rows never see the text
    add = (~allow).to(DT)[:, None] * NEG_MASK
    h = dm.text_heads
    for i in range(dm.text_layers):
        p = f"multimodal_encoder.encoder.layer.{i}."
        a = _attend(*(_lin(sd, f"{p}attention.self.{n}", x) for n in ("query", "key", "value")), h, add)
        x = _ln(sd, p + "attention.output.LayerNorm", _lin(sd, p + "attention.output.dense", a) + x, 1e-12)
        if memory is not None:
            c = _attend(_lin(sd, p + "cross_attn.cross.query", x), _lin(sd, p + "cross_attn.cross.key", memory),
                        _lin(sd, p + "cross_attn.cross.value", memory), h)
            x = _ln(sd, p + "cross_attn.output.LayerNorm", _lin(sd, p + "cross_attn.output.dense", c) + x, 1e-12)
        f = _lin(sd, p + "output.dense", gelu(_lin(sd, p + "intermediate.dense", x)))
        x = _ln(sd, p + "output.LayerNorm", f + x, 1e-12)
    return x[:, :L]


def clip_video(sd, dm: Dims, video):
    """(B, n, 3, H, W) -> (B, n, 1 + (H/p)^2, W): every frame alone, all tokens after ln_post."""
    p = "clip_model.visual."
    B, n = video.shape[:2]
    x = F.conv2d(video.flatten(0, 1), sd[p + "conv1.weight"], stride=dm.patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd[p + "positional_embedding"]
    x = _ln(sd, p + "ln_pre", x, 1e-5)
    W = x.shape[-1]
    for i in range(dm.clip_layers):
        q = f"{p}transformer.resblocks.{i}."
        h = _ln(sd, q + "ln_1", x, 1e-5)
        proj = [F.linear(h, w, b) for w, b in zip(sd[q + "attn.in_proj_weight"].chunk(3),
                                                  sd[q + "attn.in_proj_bias"].chunk(3))]
        x = x + _lin(sd, q + "attn.out_proj", _attend(*proj, W // 64))
        x = x + _lin(sd, q + "mlp.c_proj", quick_gelu(_lin(sd, q + "mlp.c_fc", _ln(sd, q + "ln_2", x, 1e-5))))
    x = _ln(sd, p + "ln_post", x, 1e-5)
    return x.reshape(B, n, x.shape[1], W)


def _swin_regions(P, w, s):
    """Upstream's shift-region label along one padded dimension of size P: [0, P-w), [P-w, P-s),
    [P-s, P) when shifted; one region when the shift is 0 (its third slice covers everything)."""
    r = torch.arange(P)
    if s == 0:
        return torch.zeros(P, dtype=torch.long)
    return (r >= P - w).long() + (r >= P - s).long()


def _swin_block(sd, p, x, window, shift, heads):
    """One block over the whole padded, rolled grid as one attention with an explicit mask:
    tokens attend within their window only, plus the relative-position bias (upstream's
    index[:N, :N] of the full window) and -100 between shift regions."""
    B, D, H, W, C = x.shape
    ws = tuple(n if n <= w else w for n, w in zip((D, H, W), window))
    ss = tuple(0 if n <= w else s for n, w, s in zip((D, H, W), window, shift))
    P = tuple(-(-n // w) * w for n, w in zip((D, H, W), ws))
    h = F.pad(_ln(sd, p + "norm1", x, 1e-5), (0, 0, 0, P[2] - W, 0, P[1] - H, 0, P[0] - D))
    h = torch.roll(h, shifts=tuple(-s for s in ss), dims=(1, 2, 3)).reshape(B, -1, C)
    r = torch.stack(torch.meshgrid(*(torch.arange(n) for n in P), indexing="ij"), -1).reshape(-1, 3)
    win, loc = r // torch.tensor(ws), r % torch.tensor(ws)
    same = (win[:, None] == win[None, :]).all(-1)                                   # (Nall, Nall)
    flat = loc[:, 0] * ws[1] * ws[2] + loc[:, 1] * ws[2] + loc[:, 2]                 # index inside a window
    N = ws[0] * ws[1] * ws[2]
    idx = sd[p + "attn.relative_position_index"][:N, :N][flat[:, None], flat[None, :]]
    add = sd[p + "attn.relative_position_bias_table"][idx].permute(2, 0, 1)         # (heads, Nall, Nall)
    if any(ss):
        lab = [_swin_regions(n, w, s)[r[:, k]] for k, (n, w, s) in enumerate(zip(P, ws, ss))]
        lab = lab[0] * 9 + lab[1] * 3 + lab[2]
        add = add + SWIN_REGION_MASK * (lab[:, None] != lab[None, :])
    add = add.masked_fill(~same, float("-inf"))[None]
    q, k, v = _lin(sd, p + "attn.qkv", h).chunk(3, dim=-1)
    o = _lin(sd, p + "attn.proj", _attend(q, k, v, heads, add)).reshape(B, *P, C)
    o = torch.roll(o, shifts=ss, dims=(1, 2, 3))[:, :D, :H, :W]
    x = x + o
    return x + _lin(sd, p + "mlp.fc2", gelu(_lin(sd, p + "mlp.fc1", _ln(sd, p + "norm2", x, 1e-5))))


def swin_video(sd, dm: Dims, video):
    """(B, T, 3, H, W) -> (B, T, h*w, C_out): T temporal tokens (one zero frame appended,
    temporal stride 1), shifted-window stages, 2x2 patch merging, final LN."""
    p = "video_encoder."
    x = F.pad(video.transpose(1, 2), (0, 0, 0, 0, 0, 1))
    x = F.conv3d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=(1, 4, 4))
    x = _ln(sd, p + "patch_embed.norm", x.permute(0, 2, 3, 4, 1), 1e-5)
    for i, (depth, heads) in enumerate(zip(dm.swin_depths, dm.swin_heads)):
        for j in range(depth):
            shift = tuple(w // 2 for w in dm.window) if j % 2 else (0, 0, 0)
            x = _swin_block(sd, f"{p}layers.{i}.blocks.{j}.", x, dm.window, shift, heads)
        if i < len(dm.swin_depths) - 1:
            q = f"{p}layers.{i}.downsample."
            x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
            x = _lin(sd, q + "reduction", _ln(sd, q + "norm", x, 1e-5), bias=False)
    x = _ln(sd, p + "norm", x, 1e-5)
    B, T, h, w, C = x.shape
    return x.reshape(B, T, h * w, C)


def ast_audio(sd, dm: Dims, spec):
    """(B, S, mel, frames) -> (B, S, 1 + (mel/16)(frames/16), d): patches read mel-major."""
    B, S = spec.shape[:2]
    x = F.conv2d(spec.flatten(0, 1)[:, None], sd["audio_embeddings.first_conv.weight"],
                 sd["audio_embeddings.first_conv.bias"], stride=16)
    x = x.permute(0, 2, 3, 1).reshape(B * S, -1, x.shape[1])
    x = torch.cat([sd["audio_embeddings.cls_token"].expand(B * S, 1, -1), x], 1)
    x = x + sd["audio_embeddings.position_embeddings.weight"]
    for i in range(dm.audio_layers):
        p = f"audio_encoder.layer.{i}."
        h = _ln(sd, p + "layernorm1", x, 1e-12)
        a = _attend(*(_lin(sd, f"{p}attention.linears.{j}", h) for j in range(3)), dm.audio_heads)
        x = x + _lin(sd, p + "attention.linears.3", a)
        h = _ln(sd, p + "layernorm2", x, 1e-12)
        x = x + _lin(sd, p + "ff_layer.linear2", gelu(_lin(sd, p + "ff_layer.linear1", h)))
    x = _ln(sd, "audio_encoder.last_layernorm", x, 1e-12)
    return x.reshape(B, S, x.shape[1], x.shape[2])


def prompt_ids(ids_or_batch, prompt) -> torch.Tensor:
    return torch.tensor(prompt).expand(ids_or_batch.shape[0], -1)


def encode(sd, dm: Dims, ids, video, audio) -> dict:
    """Encoder outputs: text (B, L, d) (with the contrastive prompt on VALOR-L), video tokens,
    audio tokens."""
    prompt = prompt_ids(ids, PROMPT_CONTRA) if dm.prompts else None
    vt = clip_video(sd, dm, video) if dm.kind == "l" else swin_video(sd, dm, video)
    return {"text": bert(sd, dm, ids, prompt), "video": vt, "audio": ast_audio(sd, dm, audio)}


# ----------------------------------------------------------------------------------------------
# alignment (sections 4-6)
# ----------------------------------------------------------------------------------------------
def _fine_weight(sd, m, x):
    return _lin(sd, f"{m}_fine_weight.2", torch.relu(_lin(sd, f"{m}_fine_weight.0", x))).squeeze(-1)


def features(sd, dm: Dims, enc: dict, ids) -> dict:
    """Fine: per-token text, per-frame video, per-slice audio features (B, *, C), normalised, and
    their weight logits (fine only).  Coarse: globals averaged before the head, normalised once."""
    per_frame = enc["video"][:, :, 0] if dm.kind == "l" else enc["video"].mean(2)   # (B, n, dv)
    per_slice = enc["audio"][:, :, 0]                                                # (B, S, d)
    if dm.contra == "fine":
        out = {"t": norm(_lin(sd, "contra_head_t.linear", enc["text"], False)), "mt": (ids != 0).to(DT),
               "v": norm(_lin(sd, "contra_head_v.linear", per_frame, False)),
               "a": norm(_lin(sd, "contra_head_a.linear", per_slice, False))}
        out.update(wt=_fine_weight(sd, "text", out["t"]), wv=_fine_weight(sd, "video", out["v"]),
                   wa=_fine_weight(sd, "audio", out["a"]))
        return out
    t = norm(_lin(sd, "contra_head_t.linear", enc["text"][:, 0], False))
    v = norm(_lin(sd, "contra_head_v.linear", per_frame.mean(1), False))
    a = norm(_lin(sd, "contra_head_a.linear", per_slice.mean(1), False))
    return {"t": t, "v": v, "a": a, "av": norm(_lin(sd, "va_fusion", torch.cat([v, a], -1)))}


def fine_matrix(A, B, mA, mB, wA, wB, padded_max: bool = True):
    """Upstream's fine similarity (section 5): similarities multiplied by the 0/1 masks (padded
    entries take part in both maxima as 0), weights softmaxed over real tokens only.
    padded_max=False: padded entries are left out of the maxima instead (valor-fast's present
    rule, kept as an option)."""
    pA = wA.masked_fill(mA == 0, float("-inf")).softmax(-1)
    pB = wB.masked_fill(mB == 0, float("-inf")).softmax(-1)
    m = mA[:, None, :, None] * mB[None, :, None, :]
    s = torch.einsum("atd,bvd->abtv", A, B) * m
    if not padded_max:
        s = s.masked_fill(m == 0, float("-inf"))
    a2b, b2a = s.max(-1).values, s.max(-2).values
    if not padded_max:   # a padded row's max is -inf and its weight 0: it contributes nothing
        a2b, b2a = a2b.masked_fill(pA[:, None] == 0, 0.0), b2a.masked_fill(pB[None] == 0, 0.0)
    return (torch.einsum("abt,at->ab", a2b, pA) + torch.einsum("abv,bv->ab", b2a, pB)) / 2


def similarities(sd, dm: Dims, f: dict, padded_max: bool = True) -> Dict[str, torch.Tensor]:
    """(B_text, B_clip) score per group tva, tv, ta."""
    if dm.contra == "coarse":
        return {"tva": f["t"] @ f["av"].t(), "tv": f["t"] @ f["v"].t(), "ta": f["t"] @ f["a"].t()}
    ones = lambda x: torch.ones(x.shape[:2], dtype=DT)  # noqa: E731
    va = torch.cat([f["v"], f["a"]], 1)
    fm = lambda z, wz: fine_matrix(f["t"], z, f["mt"], ones(z), f["wt"], wz, padded_max)  # noqa: E731
    return {"tva": fm(va, torch.cat([f["wv"], f["wa"]], 1)), "tv": fm(f["v"], f["wv"]), "ta": fm(f["a"], f["wa"])}


def temperature(sd, dm: Dims) -> torch.Tensor:
    """1 / exp(logit_scale) with CLIP vision (VALOR-L), else contra_temp."""
    return 1.0 / sd["clip_model.logit_scale"].exp() if dm.kind == "l" else sd["contra_temp"]


def info_nce(S, tau):
    Z = S / tau
    rows, cols = -Z.log_softmax(1).diag(), -Z.log_softmax(0).diag()
    return torch.cat([rows, cols]).mean()


def mga_losses(sd, dm: Dims, f: dict, ratio: float = 1.5) -> Dict[str, torch.Tensor]:
    tau = temperature(sd, dm)
    out = {g: info_nce(S, tau) for g, S in similarities(sd, dm, f).items()}
    out["total"] = ratio * sum(out[g] for g in GROUPS) / len(GROUPS)
    return out


# ----------------------------------------------------------------------------------------------
# decoder and captioning (sections 8-9)
# ----------------------------------------------------------------------------------------------
def memory(sd, dm: Dims, video_tokens, audio_tokens) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs: (B, n*x, d) video, (B, S*129, d) audio, with frame/slice and type embeddings."""
    v = video_tokens
    if "hidden_trans_video_multimodal.0.weight" in sd:
        v = _ln(sd, "hidden_trans_video_multimodal.1", _lin(sd, "hidden_trans_video_multimodal.0", v), 1e-12)
    v = v + sd["video_frame_embedding"][:, :v.shape[1]].unsqueeze(-2)
    v = v.reshape(v.shape[0], -1, v.shape[-1]) + sd["video_type_embeddings"]
    a = audio_tokens + sd["audio_frame_embedding"][:, :audio_tokens.shape[1]].unsqueeze(-2)
    a = a.reshape(a.shape[0], -1, a.shape[-1]) + sd["audio_type_embeddings"]
    return v, a


def lm_head(sd, h):
    h = _ln(sd, "cls.layernorm", gelu(_lin(sd, "cls.dense", h)), 1e-12)
    return F.linear(h, sd["cls.decoder.weight"], sd["cls.decoder.bias"])


def decoder_hidden(sd, dm: Dims, ids, video_in, audio_in, group: str):
    mem = {"tva": (video_in, audio_in), "tv": (video_in,), "ta": (audio_in,)}[group]
    prompt = prompt_ids(ids, PROMPT_CAPTION) if dm.prompts else None
    return bert(sd, dm, ids, prompt, torch.cat(mem, 1), causal=True)


def decoder_logits(sd, dm: Dims, ids, video_in, audio_in, group: str):
    """(B, L, V) logits of the causal decoder with the group's memory."""
    return lm_head(sd, decoder_hidden(sd, dm, ids, video_in, audio_in, group))


def caption_losses(sd, dm: Dims, inp, labels, video_in, audio_in) -> Dict[str, torch.Tensor]:
    """Per group: mean over every selected position of the batch (labels != -1) of the CE of the
    LM head at that position against its original id."""
    out = {}
    sel = labels != -1
    for g in GROUPS:
        h = decoder_hidden(sd, dm, inp, video_in, audio_in, g)[sel]
        out[g] = F.cross_entropy(lm_head(sd, h), labels[sel])
    out["total"] = sum(out[g] for g in GROUPS) / len(GROUPS)
    return out


def upstream_masking(ids: torch.Tensor, rng: random.Random, prob: float = 0.6, vocab: int = VOCAB):
    """Upstream's masker, call for call on a Python Random: candidates j >= 1 with id != 0, one
    draw each, the whole row redrawn while nothing is selected; then per selected token (row-major)
    80 % [MASK], 10 % a uniform id in [106, vocab), 10 % kept.  -> (input ids, labels (-1 = not
    selected))."""
    tok = ids.tolist()
    sel = [[0] * len(r) for r in tok]
    for i, row in enumerate(tok):
        while not any(sel[i]):
            for j in range(1, len(row)):
                if row[j] != 0 and rng.random() < prob:
                    sel[i][j] = 1
    labels = [[-1] * len(r) for r in tok]
    for i, row in enumerate(tok):
        for j, t in enumerate(row):
            if sel[i][j]:
                u = rng.random()
                if u < 0.8:
                    row[j] = MASK_ID
                elif u < 0.9:
                    row[j] = rng.choice(range(FIRST_RANDOM_ID, vocab))
                labels[i][j] = t
    return torch.tensor(tok), torch.tensor(labels)


def mask_from_draws(ids: torch.Tensor, draws: torch.Tensor, prob: float = 0.6, vocab: int = VOCAB):
    """Upstream's masking decisions read from given uniforms draws (B, L, 3): selected where
    draws[..., 0] < prob on a candidate; [MASK] / random id 106 + floor(draws[..., 2] (vocab - 106))
    / kept by draws[..., 1] at 0.8 / 0.9.  Every row must select a token (a redraw has no given
    draws)."""
    cand = ids != 0
    cand[:, 0] = False
    sel = (draws[..., 0] < prob) & cand
    if not bool(sel.any(1).all()):
        raise ValueError("these draws leave a row with nothing selected (upstream would redraw it)")
    u = draws[..., 1]
    rnd = FIRST_RANDOM_ID + (draws[..., 2] * (vocab - FIRST_RANDOM_ID)).long()
    inp = torch.where(sel & (u < 0.8), torch.full_like(ids, MASK_ID), ids)
    inp = torch.where(sel & (u >= 0.8) & (u < 0.9), rnd, inp)
    return inp, torch.where(sel, ids, torch.full_like(ids, -1))


def resize_bilinear(pos: torch.Tensor, old_hw, new_hw) -> torch.Tensor:
    """Upstream's position-grid resize (section 10): (h*w, C) -> (h'*w', C), bilinear,
    align_corners False."""
    g = pos.reshape(1, old_hw[0], old_hw[1], -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(new_hw), mode="bilinear", align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(new_hw[0] * new_hw[1], -1)


# ----------------------------------------------------------------------------------------------
# everything for one batch
# ----------------------------------------------------------------------------------------------
def run_all(sd, dm: Dims, ids, video, audio, caption_inp=None, caption_labels=None, decoder_ids=None) -> dict:
    """Every upstream output the parity test compares, for one batch (upstream layouts)."""
    enc = encode(sd, dm, ids, video, audio)
    f = features(sd, dm, enc, ids)
    vin, ain = memory(sd, dm, enc["video"], enc["audio"])
    out = {"enc": enc, "feat": f, "sim": similarities(sd, dm, f), "mga": mga_losses(sd, dm, f),
           "memory": torch.cat([vin, ain], 1)}
    if caption_inp is not None:
        out["mgc"] = caption_losses(sd, dm, caption_inp, caption_labels, vin, ain)
    if decoder_ids is not None:
        out["logits"] = {g: decoder_logits(sd, dm, decoder_ids, vin, ain, g) for g in GROUPS}
    return out


def make_batch(dm: Dims, seed: int, lengths=(9, 6, 4, 8), frames: Optional[int] = None, slices: int = 2,
               missing_audio: Tuple[int, ...] = (2,), pad_to: int = TEXT_LEN) -> dict:
    """Captions of the given real lengths ([CLS] words [SEP]), 0-padded to `pad_to` positions as
    upstream's loader does, frames, and fbank slices already normalised; clips in `missing_audio`
    get upstream's all-zero spectrogram."""
    g = torch.Generator().manual_seed(seed)
    L = max(max(lengths), pad_to)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = 101, 102
        ids[i, 1:n - 1] = torch.randint(FIRST_RANDOM_ID, VOCAB, (n - 2,), generator=g)
    n = frames or (2 if dm.kind == "l" else 3)
    video = torch.randn(len(lengths), n, 3, dm.image, dm.image, generator=g, dtype=DT)
    audio = torch.randn(len(lengths), slices, dm.mel, dm.frames, generator=g, dtype=DT)
    audio[list(missing_audio)] = 0.0
    return {"ids": ids, "video": video, "audio": audio}
