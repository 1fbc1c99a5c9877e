"""VLSA pretraining objectives (arXiv 2405.07202), as pure functions and one task module.

  local-patch masked modelling  per modality, masked patches / words are reconstructed from the
                rest: video -> the patch's pixels (normalised per patch, MAE's norm_pix target),
                audio -> the patch's fbank values, text -> the token id (BERT's 80/10/10 swap).
                Squared error / cross-entropy is taken at masked places only, mean over the
                global batch's masked patches (or words).
  global audio matching  binary matching of the clip-level audio state with the video state
                and with the text state (the global tokens' mean; model.args.pool): each clip's
                own pair (match) and one pair with a partner drawn from another clip of the
                gathered batch (no match).
  contrastive   symmetric InfoNCE of the global features, T-V, T-A, V-A (coarse, the fused op).

Clips without audio leave every audio term.  total = mm_weight * (video + audio + text) +
gam_weight * (av + at) + contrastive_weight * (tv + ta + va), weights 1 (docs/family.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..model.patch_embed import patchify_audio, patchify_video
from ..model.vlsa import VLSA
from ..ops.distributed import gather_features, gather_no_grad, rank, world
from .family_common import global_mean, global_rand, rank_rows, zero_like_graph
from .mgc import mask_tokens

def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


KEYS = ("vlsa/mm_video", "vlsa/mm_audio", "vlsa/mm_text", "vlsa/gam_av", "vlsa/gam_at",
        "vlsa/tv", "vlsa/ta", "vlsa/va")


@dataclass
class VLSALossArgs:
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


def random_patch_mask(local: int, n_patches: int, ratio: float,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(local, n_patches) bool, exactly round(ratio * n) (kept within [1, n - 1]) patches masked
    a clip, chosen uniformly (argsort of uniform noise drawn for the global batch)."""
    k = min(max(int(round(ratio * n_patches)), 1), n_patches - 1)
    noise = global_rand(local, n_patches, generator=generator)
    rank_of = noise.argsort(1).argsort(1)
    return rank_of < k


def video_targets(video: torch.Tensor, patch: int, norm_pix: bool = True) -> torch.Tensor:
    """(B, n, 3, H, W) -> (B, n*P, 3*p*p) reconstruction targets, fp32 (or float64)."""
    t = patchify_video(_fp32(video), patch)
    if norm_pix:
        mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True, unbiased=False)
        t = (t - mean) / (var + 1e-6).sqrt()
    return t


def masked_patch_loss(tokens: torch.Tensor, head: torch.nn.Module, target: torch.Tensor,
                      mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the per-patch mean squared error at masked patches only: the head runs
    on the masked token states (K, C) alone.  tokens (B, N, C), target (B, N, P), mask (B, N)."""
    if mask.shape != tokens.shape[:2] or target.shape[:2] != mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} disagree")
    pred = _fp32(head(tokens[mask]))                        # (K, P)
    err = (pred - _fp32(target[mask])).pow(2).mean(-1)      # (K,)
    return err.sum(), mask.sum()


def gam_loss(model: VLSA, partner: str, audio_glob: torch.Tensor, other_glob: torch.Tensor,
             rows: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the matching head on this rank's clips `rows` of the gathered
    batch: (audio r, partner r) match, (audio r, partner neg[r]) do not.  audio_glob /
    other_glob (N, C) gathered clip-level states; valid (R,) bool: clips that have audio."""
    a = audio_glob[rows]
    logits = torch.cat([model.gam_logits(partner, a, other_glob[rows]),
                        model.gam_logits(partner, a, other_glob[neg])])
    labels = torch.cat([torch.ones_like(rows), torch.zeros_like(rows)]).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    keep = valid.repeat(2)
    return global_mean((bce * keep).sum(), keep.sum())


def contrastive_losses(ft: torch.Tensor, fv: torch.Tensor, fa: torch.Tensor, temperature: torch.Tensor,
                       has_audio: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """T-V, T-A, V-A InfoNCE over gathered (N, D) global features; the audio pairs score the
    clips with audio only (0 when fewer than two have it)."""
    out = {"tv": ops.contrastive_loss(ft, fv, temperature)}
    if has_audio is not None and not bool(has_audio.all()):
        idx = has_audio.nonzero().squeeze(1)
        if idx.numel() < 2:
            out["ta"] = out["va"] = zero_like_graph(fa)
            return out
        ft, fv, fa = ft[idx], fv[idx], fa[idx]
    out["ta"] = ops.contrastive_loss(ft, fa, temperature)
    out["va"] = ops.contrastive_loss(fv, fa, temperature)
    return out


class VLSATask(torch.nn.Module):
    """The VLSA objective as the data-parallel root module: forward(batch) -> {"loss", *KEYS}
    (the same keys every step).  `prepare` draws the patch masks, the word-masking uniforms and
    the matching partners on the host, for the global batch, keeping this rank's rows."""

    def __init__(self, model: VLSA, cfg: Optional[VLSALossArgs] = None):
        super().__init__()
        self.model = model
        self.cfg = cfg or VLSALossArgs()

    def prepare(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        a, c = self.model.args, self.cfg
        B, n = batch["video"].shape[:2]
        S = batch["audio"].shape[1]
        L = batch["text_ids"].shape[1]
        if L > a.max_text_len:
            raise ValueError(f"text_ids have {L} tokens, more than the model's max_text_len {a.max_text_len}")
        nv = n * self.model.video_embed.per_frame
        na = S * self.model.audio_embed.per_slice
        out = dict(batch)
        out["vlsa_video_mask"] = random_patch_mask(B, nv, c.video_mask_ratio, generator)
        out["vlsa_audio_mask"] = random_patch_mask(B, na, c.audio_mask_ratio, generator)
        out["vlsa_text_draws"] = global_rand(B, a.max_text_len, 3, generator=generator)
        N = B * world()
        if N < 2:
            raise ValueError("global audio matching needs at least two clips in the global batch")
        out["vlsa_partners"] = rank_rows(torch.randint(1, N, (N, 2), generator=generator), B)
        return out

    def _masked_modelling(self, batch, hv, ht, ha_tok, sel, has_audio):
        m, c = self.model, self.cfg
        vm, am = batch["vlsa_video_mask"], batch["vlsa_audio_mask"]
        if has_audio is not None:
            am = am & has_audio[:, None]
        tv = video_targets(batch["video"], m.args.patch_size, c.norm_pix)
        ta = patchify_audio(_fp32(batch["audio"]), m.args.audio_patch)
        out = {"vlsa/mm_video": global_mean(*masked_patch_loss(hv, m.video_head, tv, vm)),
               "vlsa/mm_audio": global_mean(*masked_patch_loss(ha_tok, m.audio_head, ta, am))}
        nll = m.text_mlm_loss(ht[sel], batch["text_ids"][sel])
        out["vlsa/mm_text"] = global_mean(nll.sum(), sel.sum())
        return out

    def forward(self, batch: dict) -> Dict[str, torch.Tensor]:
        m, c = self.model, self.cfg
        if "vlsa_video_mask" not in batch:
            raise ValueError("VLSATask needs the draws of VLSATask.prepare(batch, generator) in the batch")
        ids, mask, has_audio = batch["text_ids"], batch["text_mask"], batch.get("has_audio")
        inp, sel = mask_tokens(ids, mask, c.text_mask_prob, m.args.vocab_size, draws=batch["vlsa_text_draws"])
        gv, hv = m.encode_video(batch["video"], batch["vlsa_video_mask"])
        gt, ht = m.encode_text(inp, mask)
        ga, ha_tok = m.encode_audio(batch["audio"], batch["vlsa_audio_mask"])
        out = self._masked_modelling(batch, hv, ht, ha_tok, sel, has_audio)
        ha_all = None if has_audio is None else gather_no_grad(has_audio.to(ids.device))
        pv, pt, pa = m.pooled(gv, hv), m.pooled(gt, ht, mask), m.pooled(ga, ha_tok)
        con = contrastive_losses(*(gather_features(m.global_feature(k, x)) for k, x in
                                   (("text", pt), ("video", pv), ("audio", pa))), m.temp(), ha_all)
        out.update({f"vlsa/{k}": v for k, v in con.items()})
        B = ids.shape[0]
        rows = torch.arange(B, device=ids.device) + rank() * B
        N = B * world()
        part = batch["vlsa_partners"].to(ids.device)
        pa_all, pv_all, pt_all = (gather_features(x) for x in (pa, pv, pt))
        valid = torch.ones(B, dtype=torch.bool, device=ids.device) if has_audio is None else has_audio.bool()
        out["vlsa/gam_av"] = gam_loss(m, "video", pa_all, pv_all, rows, (rows + part[:, 0]) % N, valid)
        out["vlsa/gam_at"] = gam_loss(m, "text", pa_all, pt_all, rows, (rows + part[:, 1]) % N, valid)
        out["loss"] = (c.mm_weight * (out["vlsa/mm_video"] + out["vlsa/mm_audio"] + out["vlsa/mm_text"])
                       + c.gam_weight * (out["vlsa/gam_av"] + out["vlsa/gam_at"])
                       + c.contrastive_weight * (out["vlsa/tv"] + out["vlsa/ta"] + out["vlsa/va"]))
        return out
