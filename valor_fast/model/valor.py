"""VALOR: text (BERT), vision (CLIP ViT per frame, or Video Swin over the clip), audio (AST) encoders and the multimodal
decoder (the same BERT layers, causal, + one cross-attention per layer over video and audio
tokens concatenated).  Architecture only: losses live in valor_fast.tasks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import TASK_PROMPT_IDS, ModelConfig, swin_size_of, temperature_param_of
from .audio import AST
from .layers import init_weights
from .text import BertText
from .swin import VideoSwin, swin_arch
from .vision import ClipViT


class WeightMLP(nn.Module):
    """Token-weight head of the fine similarity: Linear(C, C) -> ReLU -> Linear(C, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))).squeeze(-1)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Features leave the heads in float32 at least (bf16 / fp16 under autocast -> float32; a
    float64 model stays float64, so parity checks run in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _to_text(width: int, text_width: int) -> nn.Module:
    if width == text_width:
        return nn.Identity()
    return nn.Sequential(nn.Linear(width, text_width), nn.LayerNorm(text_width, eps=1e-12))


@dataclass
class Features:
    """Contrastive-space features of one modality: tokens (B, N, C) L2-normalised, weights
    (B, N) pre-softmax, mask (B, N) bool, and the global feature (B, C) L2-normalised."""
    tokens: torch.Tensor
    weight: torch.Tensor
    mask: Optional[torch.Tensor]
    pooled: torch.Tensor


class VALOR(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        tw, C = cfg.text_width, cfg.contra_dim
        self.text = BertText(cfg.vocab_size, tw, cfg.text_layers, cfg.text_heads, cfg.text_ffn,
                             max_pos=cfg.max_positions, prompts=cfg.task_prompts)
        if cfg.vision == "clip":
            self.vision = ClipViT(cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                                  cfg.vision_heads, pos_std=cfg.vision_pos_std)
            vw = cfg.vision_width
        elif cfg.vision == "swin":
            self.vision = VideoSwin(**swin_arch(swin_size_of(cfg), cfg.swin_drop_path))
            vw = self.vision.out_dim  # (B: 1024) the encoder's, whatever vision_width says
        else:
            raise ValueError(f"model.vision must be clip or swin, got {cfg.vision!r}")
        self.vision_dim = vw
        self.audio = AST(cfg.audio_mel_bins, cfg.audio_frames, cfg.audio_width, cfg.audio_layers, cfg.audio_heads)
        # contrastive heads (bias-free) and fine-similarity token weights
        self.text_proj = nn.Linear(tw, C, bias=False)
        self.vision_proj = nn.Linear(vw, C, bias=False)
        self.audio_proj = nn.Linear(cfg.audio_width, C, bias=False)
        self.text_weight = WeightMLP(C)
        self.vision_weight = WeightMLP(C)
        self.audio_weight = WeightMLP(C)
        # coarse AV = normalise(W [v; a] + b): a learned fusion of the global V and A features
        # (upstream's va_fusion, with its bias)
        self.av_fusion = nn.Linear(2 * C, C)
        # decoder inputs: project to the text width, add frame/clip and modality embeddings
        self.video_to_text = _to_text(vw, tw)
        self.audio_to_text = _to_text(cfg.audio_width, tw)
        self.frame_embed = nn.Embedding(cfg.max_frames, tw)
        self.clip_embed = nn.Embedding(cfg.max_frames, tw)
        self.type_embed = nn.Embedding(2, tw)  # 0 = video, 1 = audio
        # shape (1,), not a scalar: FSDP2 shards parameters along dim 0.  One of the two, by
        # model.temperature_param: the temperature itself, or CLIP's log inverse temperature
        self.temperature_param = temperature_param_of(cfg)
        if self.temperature_param == "logit_scale":
            self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / float(cfg.temperature))]))
        else:
            self.temperature = nn.Parameter(torch.tensor([float(cfg.temperature)]))
        init_weights(self)
        if cfg.vision == "swin":  # Swin's own init of the position-bias tables (trunc normal 0.02)
            for m in self.vision.modules():
                if hasattr(m, "relative_position_bias_table"):
                    nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        with torch.no_grad():  # start the fusion as v + a
            self.av_fusion.weight.copy_(torch.cat([torch.eye(C), torch.eye(C)], dim=1))
            self.av_fusion.bias.zero_()

    # ---------------- encoders ----------------
    def task_prompt(self, kind: str, n: int, device) -> Optional[torch.Tensor]:
        """(n, P) ids of the fixed task prompt `kind` (contra, caption) when model.task_prompts,
        else None."""
        if not self.cfg.task_prompts:
            return None
        return torch.tensor(TASK_PROMPT_IDS[kind], device=device).expand(n, -1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, d) text states.  With model.task_prompts the contrastive prompt ('project
        language in common space') follows the text unless `prompt` (B, P) is given."""
        if prompt is None:
            prompt = self.task_prompt("contra", ids.shape[0], ids.device)
        return self.text.encode(ids, mask, prompt)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.vision(video)

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        return self.audio(audio)

    # ---------------- contrastive features ----------------
    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        # (B, n, L, C) -> (B, n, C): the CLS of each frame / slice, or the mean of its tokens
        if self.cfg.pool == "cls":
            return tokens[:, :, 0]
        if self.cfg.pool == "mean":
            return tokens.mean(2)
        raise ValueError(f"model.pool must be cls or mean, got {self.cfg.pool!r}")

    def text_features(self, hidden: torch.Tensor, mask: torch.Tensor) -> Features:
        tok = F.normalize(_acc(self.text_proj(hidden)), dim=-1)   # (B, L, C)
        if self.cfg.pool == "mean":
            m = mask.to(tok.dtype)[..., None]
            pooled = F.normalize((tok * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
        else:
            pooled = tok[:, 0]
        return Features(tok, self.text_weight(tok), mask, pooled)

    def video_features(self, tokens: torch.Tensor) -> Features:
        # one feature per frame, no temporal pooling; Swin has no CLS: VALOR takes the spatial
        # mean of each frame's tokens (B, T, h*w, 1024) -> (B, T, 1024)
        per_frame = tokens.mean(2) if self.cfg.vision == "swin" else self._pool(tokens)
        return self._clip_features(_acc(self.vision_proj(per_frame)), self.vision_weight)  # (B, n, C)

    def audio_features(self, tokens: torch.Tensor) -> Features:
        return self._clip_features(_acc(self.audio_proj(self._pool(tokens))), self.audio_weight)  # (B, S, C)

    @staticmethod
    def _clip_features(proj: torch.Tensor, weight: nn.Module) -> Features:
        """Per-frame (per-slice) projections (B, n, C) -> normalised tokens and their weights, and
        the coarse global: upstream averages the frames *before* the (bias-free, so linear) head
        and normalises once, norm(W mean_k f_k) = norm(mean_k W f_k) (model/modeling.py:384-405)."""
        f = F.normalize(proj, dim=-1)
        return Features(f, weight(f), None, F.normalize(proj.mean(1), dim=-1))

    def av_pooled(self, v: Features, a: Features) -> torch.Tensor:
        return F.normalize(self.av_fusion(torch.cat([v.pooled, a.pooled], dim=-1)), dim=-1)

    def temp(self) -> torch.Tensor:
        # clamp keeps logits finite if the learnt temperature drifts towards 0
        t = self.temperature if self.temperature_param == "contra_temp" else torch.exp(-self.logit_scale)
        return t.clamp(min=1e-3, max=1.0).squeeze(0)

    def transformer_blocks(self):
        """The per-block ModuleLists activation checkpointing, compile and FSDP wrap (every
        family's model defines this): BERT layers, vision blocks, AST blocks."""
        return [self.text.layers, self.vision.blocks, self.audio.blocks]

    # ---------------- decoder ----------------
    def memory(self, video_tokens: torch.Tensor, audio_tokens: torch.Tensor):
        """Decoder memory = cat(video tokens, audio tokens): (B, n*Lv + S*La, text_width),
        returned with the split point."""
        B, n, Lv, _ = video_tokens.shape
        _, S, La, _ = audio_tokens.shape
        v = self.video_to_text(video_tokens) + self.frame_embed.weight[:n, None] + self.type_embed.weight[0]
        a = self.audio_to_text(audio_tokens) + self.clip_embed.weight[:S, None] + self.type_embed.weight[1]
        return torch.cat([v.reshape(B, n * Lv, -1), a.reshape(B, S * La, -1)], dim=1), n * Lv

    def decode(self, ids, mask, memory, memory_mask, memory_repeat: int = 1, caches=None, offset=0,
               prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal decoder pass (BertText.decode).  With model.task_prompts the caption prompt
        ('describe the video with natural language') goes with every first / uncached call unless
        `prompt` (N, P) is given (QA's question prompt)."""
        if prompt is None and not (caches is not None and "k" in caches[0]):
            prompt = self.task_prompt("caption", ids.shape[0], ids.device)
        return self.text.decode(ids, mask, memory, memory_mask, memory_repeat=memory_repeat, caches=caches,
                                offset=offset, prompt=prompt)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text.logits(hidden)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-row LM cross-entropy (N,) at hidden rows (N, C), fused: no (N, V) logits."""
        return self.text.lm_loss(hidden, labels, label_smoothing)


def build_model(cfg: ModelConfig) -> VALOR:
    model = VALOR(cfg)
    if cfg.init_text:
        from .convert import load_hf_bert
        load_hf_bert(model, cfg.init_text)
    if cfg.init_vision:
        if cfg.vision != "swin":
            raise ValueError("model.init_vision loads Video Swin weights: it needs model.vision=swin "
                             "(CLIP towers load through `valor-fast convert` / train.init)")
        from .convert_swin import load_swin
        load_swin(model, cfg.init_vision)
    return model


def count_parameters(model: nn.Module) -> Dict[str, int]:
    out = {"total": sum(p.numel() for p in model.parameters())}
    for name in ("text", "vision", "audio"):
        out[name] = sum(p.numel() for p in getattr(model, name).parameters())
    cross = sum(p.numel() for l in model.text.layers for p in list(l.cross.parameters()) + list(l.ln_cross.parameters()))
    out["decoder_cross_attention"] = cross
    out["heads_and_embeddings"] = out["total"] - out["text"] - out["vision"] - out["audio"]
    return out
