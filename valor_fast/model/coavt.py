"""CoAVT (arXiv 2401.12264): a joint audio-visual encoder, a BERT text encoder and a query
encoder of learnable queries between them.  Architecture only; the losses live in
valor_fast.tasks.coavt.  What the paper fixes and what we chose where it is silent (or where
its full text was not readable here): docs/family.md.

    video (B, n, 3, H, W) --VideoPatchEmbed--> vision layers (modality-specific) --+
    audio (B, S, T, mel)  --AudioPatchEmbed--> audio layers  (modality-specific) --+--> joint
    layer(s), one set of attention/MLP weights run over three streams with their own LayerNorms:
    audio alone "a", video alone "v", and the concatenation [a; v] "av" (where audio and video
    tokens attend to each other, so audio-visual synchrony is encoded).
    queries (Nq, C) --self-attention (over [queries; text] for matching) + cross-attention to a
    stream's tokens--> query outputs: the AV-T / A-T / V-T contrastive features, the matching
    head's input, and the memory the text decoder (the BERT layers run causally) attends to.

Every attention goes through `ops.attention` (layers.Attention), every add+LayerNorm and
bias+GELU through ops.fused, like the VALOR blocks.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import fused as fops
from .args import COAVT_SIZES, CoAVTArgs, coavt_args  # noqa: F401  (the args live in model/args.py)
from .layers import Attention, PreNormBlock, _gelu_linear, _ln, init_weights
from .patch_embed import AudioPatchEmbed, VideoPatchEmbed
from .text import BertText
from .valor import WeightMLP

STREAMS = ("a", "v", "av")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # features and logits in fp32 at least (bf16 under autocast); float64 stays float64 (tests)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """A stand-alone LayerNorm through the fused op (the eager one when "eager" is forced)."""
    return _ln(x, ln)[0] if fops.fused_enabled() else ln(x)


class JointBlock(nn.Module):
    """A pre-norm block whose attention and MLP weights are shared by the streams and whose two
    LayerNorms are per stream (the audio, video and audio+video token statistics differ)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, streams=STREAMS, eps: float = 1e-6):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.ln1 = nn.ModuleDict({s: nn.LayerNorm(dim, eps=eps) for s in streams})
        self.ln2 = nn.ModuleDict({s: nn.LayerNorm(dim, eps=eps) for s in streams})

    def forward(self, x: torch.Tensor, stream: str, key_padding_mask: Optional[torch.Tensor] = None):
        ln1, ln2 = self.ln1[stream], self.ln2[stream]
        if not fops.fused_enabled():
            x = x + self.attn(ln1(x), key_padding_mask=key_padding_mask)
            return x + self.fc2(F.gelu(self.fc1(ln2(x))))
        h, _ = _ln(x, ln1)
        h, x = _ln(self.attn(h, key_padding_mask=key_padding_mask), ln2, x)
        return x + self.fc2(_gelu_linear(h, self.fc1, "gelu"))


class JointAVEncoder(nn.Module):
    """Modality-specific vision and audio layers, then the shared joint layer(s) over the three
    streams.  Tokens carry a learned position (within a frame / slice), a time (frame / slice)
    embedding and a modality embedding."""

    def __init__(self, a: CoAVTArgs):
        super().__init__()
        C = a.width
        self.video_embed = VideoPatchEmbed(a.image_size, a.patch_size, C, a.max_frames)
        self.audio_embed = AudioPatchEmbed(a.audio_mel_bins, a.audio_frames, a.audio_patch, C, a.max_slices)
        self.modality = nn.Embedding(2, C)   # 0 = audio, 1 = video
        self.vision_blocks = nn.ModuleList([PreNormBlock(C, a.heads, a.mlp_ratio) for _ in range(a.vision_layers)])
        self.audio_blocks = nn.ModuleList([PreNormBlock(C, a.heads, a.mlp_ratio) for _ in range(a.audio_layers)])
        self.joint_blocks = nn.ModuleList([JointBlock(C, a.heads, a.mlp_ratio) for _ in range(a.joint_layers)])
        self.norm = nn.ModuleDict({s: nn.LayerNorm(C, eps=1e-6) for s in STREAMS})

    def forward(self, video: torch.Tensor, audio: torch.Tensor,
                has_audio: Optional[torch.Tensor] = None) -> Dict[str, Optional[torch.Tensor]]:
        """-> {"a": (B, La, C), "v": (B, Lv, C), "av": (B, La + Lv, C), "av_mask": (B, La + Lv)
        bool, or None without has_audio}.  Clips without audio (has_audio False) have their audio
        keys masked in the "av" stream; their "a" stream is computed (on the zero fbank) and must
        be left out of audio losses by the caller.  Pass has_audio=None when every clip has audio
        (known on the host: CoAVTTask.prepare) to keep the joint attention unmasked."""
        a = self.audio_embed(audio) + self.modality.weight[0]
        v = self.video_embed(video) + self.modality.weight[1]
        for blk in self.audio_blocks:
            a = blk(a)
        for blk in self.vision_blocks:
            v = blk(v)
        av_mask = None
        if has_audio is not None:   # no value read here (no host sync): the caller decides on the host
            av_mask = torch.cat([has_audio.to(v.device, torch.bool)[:, None].expand(-1, a.shape[1]),
                                 torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)], 1)
        out = {"a": a, "v": v, "av": torch.cat([a, v], 1)}
        for s in STREAMS:
            x = out[s]
            for blk in self.joint_blocks:
                x = blk(x, s, av_mask if s == "av" else None)
            out[s] = _norm(x, self.norm[s])
        out["av_mask"] = av_mask
        return out


class QueryLayer(nn.Module):
    """Post-LN BERT layer over [queries; text]: self-attention over the whole sequence, then (if
    `cross`) cross-attention from the query positions only to the audiovisual tokens, then the
    FFN.  With no text the sequence is the queries alone."""

    def __init__(self, dim: int, heads: int, ffn: int, cross: bool, eps: float = 1e-12):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ln_attn = nn.LayerNorm(dim, eps=eps)
        self.cross = Attention(dim, heads) if cross else None
        self.ln_cross = nn.LayerNorm(dim, eps=eps) if cross else None
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.ln_ffn = nn.LayerNorm(dim, eps=eps)

    def _add_ln(self, x, residual, ln):
        return _ln(x, ln, residual)[0] if fops.fused_enabled() else ln(x + residual)

    def forward(self, x: torch.Tensor, n_query: int, memory: torch.Tensor,
                memory_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor]):
        x = self._add_ln(self.attn(x, key_padding_mask=key_padding_mask), x, self.ln_attn)
        if self.cross is not None:
            q = x[:, :n_query]
            q = self._add_ln(self.cross(q, kv=memory, key_padding_mask=memory_mask), q, self.ln_cross)
            x = torch.cat([q, x[:, n_query:]], 1) if x.shape[1] > n_query else q
        if fops.fused_enabled():
            return _ln(self.fc2(_gelu_linear(x, self.fc1, "gelu")), self.ln_ffn, x)[0]
        return self.ln_ffn(x + self.fc2(F.gelu(self.fc1(x))))


class QueryEncoder(nn.Module):
    def __init__(self, a: CoAVTArgs):
        super().__init__()
        C = a.width
        self.queries = nn.Parameter(torch.zeros(a.query_count, C))
        self.ln_in = nn.LayerNorm(C, eps=1e-12)
        ffn = int(C * a.mlp_ratio)
        every = max(1, a.query_cross_every)
        self.layers = nn.ModuleList([QueryLayer(C, a.heads, ffn, cross=(i % every == 0))
                                     for i in range(a.query_layers)])
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None,
                text: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """memory (B, Lm, C) -> (B, Nq, C) query outputs; with text hidden states (B, L, C)
        the queries and the text attend to each other (matching) -> (B, Nq + L, C)."""
        B, Nq = memory.shape[0], self.queries.shape[0]
        x = self.ln_in(self.queries).to(memory.dtype).expand(B, Nq, -1)
        kpm = None
        if text is not None:
            x = torch.cat([x, text.to(x.dtype)], 1)
            if text_mask is not None:
                kpm = torch.cat([torch.ones(B, Nq, dtype=torch.bool, device=x.device), text_mask], 1)
        for layer in self.layers:
            x = layer(x, Nq, memory, memory_mask, kpm)
        return x


class CoAVT(nn.Module):
    def __init__(self, args: CoAVTArgs):
        super().__init__()
        self.args = a = args
        C, D = a.width, a.contra_dim
        self.av = JointAVEncoder(a)
        self.text = BertText(a.vocab_size, C, a.text_layers, a.heads, int(C * a.mlp_ratio),
                             max_pos=a.max_positions)
        self.query = QueryEncoder(a)
        self.text_proj = nn.Linear(C, D, bias=False)
        self.query_proj = nn.Linear(C, D, bias=False)
        self.query_weight = WeightMLP(D)       # per-query weights of the query-side similarity term
        self.match_head = nn.Linear(C, 2)
        self.temperature = nn.Parameter(torch.tensor([float(a.temperature)]))  # (1,): FSDP2 shards dim 0
        init_weights(self)   # BERT-style normal(0.02) for Linear / Conv / Embedding, LN to (1, 0)

    # ---------------- encoders ----------------
    def encode_av(self, video, audio, has_audio=None) -> Dict[str, Optional[torch.Tensor]]:
        return self.av(video, audio, has_audio)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text.encode(ids, mask)

    def text_feature(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, C) -> (B, D): the [CLS] state (args.pool=cls) or the mean over the real tokens
        (mean; `mask` (B, L) True = real, None = all), projected and L2-normalised."""
        if self.args.pool == "cls":
            x = hidden[:, 0]
        elif self.args.pool == "mean":
            w = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device) if mask is None \
                else mask.to(hidden.dtype)
            x = (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        else:
            raise ValueError(f"CoAVT pool must be 'cls' or 'mean', got {self.args.pool!r}")
        return F.normalize(_fp32(self.text_proj(x)), dim=-1)

    def queries(self, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Query outputs over one stream's tokens: (B, Lm, C) -> (B, Nq, C)."""
        return self.query(memory, memory_mask)

    def query_features(self, q_hidden: torch.Tensor):
        """(B, Nq, C) -> tokens (B, Nq, D) L2-normalised and their weights (B, Nq) pre-softmax."""
        tok = F.normalize(_fp32(self.query_proj(q_hidden)), dim=-1)
        return tok, self.query_weight(tok)

    def match_logits(self, memory, memory_mask, text_hidden, text_mask) -> torch.Tensor:
        """Matching logits (N, 2) [no-match, match] of N (AV tokens, text) pairs: the queries
        attend to the text and cross-attend to the AV tokens; the head's logits at the query
        positions are averaged (BLIP-2's ITM head)."""
        h = self.query(memory, memory_mask, text_hidden, text_mask)[:, :self.args.query_count]
        return _fp32(self.match_head(h)).mean(1)

    def temp(self) -> torch.Tensor:
        return self.temperature.clamp(min=1e-3, max=1.0).squeeze(0)

    def transformer_blocks(self) -> List[nn.ModuleList]:
        """The per-block ModuleLists activation checkpointing, compile and FSDP wrap."""
        return [self.av.vision_blocks, self.av.audio_blocks, self.av.joint_blocks, self.text.layers,
                self.query.layers]

    # ---------------- language model ----------------
    def decode(self, ids, mask, query_hidden, memory_mask=None, caches=None, offset: int = 0) -> torch.Tensor:
        """Causal text pass cross-attending to the query outputs (B, Nq, C) -> (B, L, C).  The
        signature is VALOR's (`model.decoding` steps either); the queries need no memory_mask."""
        return self.text.decode(ids, mask, query_hidden, memory_mask, caches=caches, offset=offset)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text.logits(hidden)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-row next-token cross-entropy (N,) at hidden rows (N, C), fused and chunked."""
        return self.text.lm_loss(hidden, labels, label_smoothing)

    @torch.no_grad()
    def generate(self, video, audio, has_audio=None, max_len: int = 20, bos: int = 101,
                 eos: int = 102) -> List[List[int]]:
        """Greedy captions from the LM head conditioned on the AV query outputs (KV-cached)."""
        q = self.queries(*self._av(video, audio, has_audio))
        B = q.shape[0]
        caches = [dict() for _ in self.text.layers]
        tok = torch.full((B, 1), bos, dtype=torch.long, device=q.device)
        out = torch.zeros(B, 0, dtype=torch.long, device=q.device)
        done = torch.zeros(B, dtype=torch.bool, device=q.device)
        for t in range(max_len):
            h = self.decode(tok, None, q if t == 0 else None, caches=caches, offset=t)
            tok = self.text.logits(h[:, -1]).argmax(-1, keepdim=True)
            out = torch.cat([out, tok], 1)
            done |= tok[:, 0] == eos
            if bool(done.all()):
                break
        caps = []
        for row in out.tolist():
            caps.append(row[:row.index(eos)] if eos in row else row)
        return caps

    def _av(self, video, audio, has_audio):
        s = self.encode_av(video, audio, has_audio)
        return s["av"], s["av_mask"]


def build_coavt(args: CoAVTArgs) -> CoAVT:
    return CoAVT(args)


def count_parameters(model: CoAVT) -> Dict[str, int]:
    """Parameters by component; `total` counts each tensor once."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    av = model.av
    out = {"total": n(model),
           "vision": n(av.video_embed) + n(av.vision_blocks),
           "audio": n(av.audio_embed) + n(av.audio_blocks),
           "joint": n(av.joint_blocks) + n(av.norm) + n(av.modality),
           "text": n(model.text),
           "query": n(model.query)}
    out["heads"] = out["total"] - sum(out[k] for k in ("vision", "audio", "joint", "text", "query"))
    return out
