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

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..config import VLSALossConfig
from ..model.flops import vlsa_flops_per_sample
from ..model.patch_embed import patchify_audio, patchify_video
from ..model.vlsa import VLSA
from ..ops.distributed import gather_features, rank, world
from .base import Task, register_task
from .family_common import check_family_data, global_mean, global_rand, rank_rows
from .mgc import mask_tokens

def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


KEYS = ("vlsa/mm_video", "vlsa/mm_audio", "vlsa/mm_text", "vlsa/gam_av", "vlsa/gam_at",
        "vlsa/tv", "vlsa/ta", "vlsa/va")


VLSALossArgs = VLSALossConfig
"""The objective's settings: the `vlsa` section of the run's Config (valor_fast/config.py)."""


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


def masked_patch_loss(tokens: torch.Tensor, head: torch.nn.Module, target: torch.Tensor, mask: torch.Tensor,
                      positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the per-patch mean squared error at masked patches only: the head runs
    on the masked token states (K, C) alone.  tokens (B, N, C), target (B, N, P), mask (B, N);
    positions (K,): the flat indices of the masked patches in (B * N), made on the host
    (`patch_positions`; else here, a value read)."""
    if mask.shape != tokens.shape[:2] or target.shape[:2] != mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} disagree")
    pos = patch_positions(mask) if positions is None else positions.to(tokens.device)
    pred = _fp32(head(tokens.reshape(-1, tokens.shape[-1]).index_select(0, pos)))          # (K, P)
    err = (pred - _fp32(target.reshape(-1, target.shape[-1]).index_select(0, pos))).pow(2).mean(-1)   # (K,)
    return err.sum(), err.new_tensor(float(pos.shape[0]))


def patch_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (K,) of the True entries of a (B, N) mask, row-major (host side)."""
    return mask.flatten().nonzero().squeeze(1)


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
    clips with audio only (the op's `valid` mask: no host sync; 0 when fewer than two have it)."""
    valid = None if has_audio is None else has_audio.bool()
    return {"tv": ops.contrastive_loss(ft, fv, temperature),
            "ta": ops.contrastive_loss(ft, fa, temperature, valid=valid),
            "va": ops.contrastive_loss(fv, fa, temperature, valid=valid)}


KEY_ORDER = ("loss",) + KEYS
PLAN_KEYS = ("mm_text_input", "mm_text_positions", "mm_text_labels", "mm_video_positions", "mm_audio_positions")


@register_task("vlsa_pretrain")
class VLSATask(Task):
    """The VLSA objective as the data-parallel root module: forward(batch) -> {"loss", *KEYS}
    (the same keys every step).  `prepare` draws the patch masks, the word-masking uniforms and
    the matching partners on the host, for the global batch, keeping this rank's rows, and plans
    the masked places (PLAN_KEYS: flat positions, so the step has no data-dependent shape).
    `text_len`: the width of the word-masking draws (data.max_text_len): batches padded to any
    length up to it draw the same uniforms for the same words."""

    family = "vlsa"
    evaluation = "retrieval"    # T<->V, T<->A, V<->A: eval/family.py

    def __init__(self, model: VLSA, cfg: Optional[VLSALossConfig] = None, text_len: int = 40):
        super().__init__(model)
        self.cfg = cfg or VLSALossConfig()
        self.text_len = text_len

    @classmethod
    def from_config(cls, model: VLSA, cfg) -> "VLSATask":
        check_family_data(cfg)
        return cls(model, cfg.vlsa, text_len=cfg.data.max_text_len)

    def loss_keys(self) -> Tuple[str, ...]:
        return KEY_ORDER

    def flops_per_sample(self, cfg) -> float:
        c = self.cfg
        return vlsa_flops_per_sample(self.model.args, frames=cfg.data.frames_train, text_len=cfg.data.max_text_len,
                                     audio_slices=cfg.data.audio_slices, video_mask_ratio=c.video_mask_ratio,
                                     audio_mask_ratio=c.audio_mask_ratio, text_mask_prob=c.text_mask_prob)

    def prepare(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        c = self.cfg
        B, n = batch["video"].shape[:2]
        S = batch["audio"].shape[1]
        ids, mask = batch["text_ids"], batch["text_mask"]
        if ids.shape[1] > self.text_len:
            raise ValueError(f"text_ids have {ids.shape[1]} tokens, more than data.max_text_len={self.text_len}")
        out = dict(batch)
        out["vlsa_video_mask"] = random_patch_mask(B, n * self.model.video_embed.per_frame, c.video_mask_ratio, generator)
        out["vlsa_audio_mask"] = random_patch_mask(B, S * self.model.audio_embed.per_slice, c.audio_mask_ratio, generator)
        out["vlsa_text_draws"] = global_rand(B, self.text_len, 3, generator=generator)
        N = B * world()
        if N < 2:
            raise ValueError("global audio matching needs at least two clips in the global batch")
        out["vlsa_partners"] = rank_rows(torch.randint(1, N, (N, 2), generator=generator), B)
        inp, sel = mask_tokens(ids, mask, c.text_mask_prob, self.model.args.vocab_size, draws=out["vlsa_text_draws"])
        out["mm_text_input"], out["mm_text_positions"] = inp, patch_positions(sel)
        out["mm_text_labels"] = ids.flatten()[out["mm_text_positions"]]
        am = out["vlsa_audio_mask"]
        if batch.get("has_audio") is not None:
            am = am & batch["has_audio"].bool()[:, None]      # clips without audio reconstruct no audio
        out["mm_video_positions"], out["mm_audio_positions"] = patch_positions(out["vlsa_video_mask"]), patch_positions(am)
        return out

    def _masked_modelling(self, batch, hv, ht, ha_tok):
        m, c = self.model, self.cfg
        tv = video_targets(batch["video"], m.args.patch_size, c.norm_pix)
        ta = patchify_audio(_fp32(batch["audio"]), m.args.audio_patch)
        out = {"vlsa/mm_video": global_mean(*masked_patch_loss(hv, m.video_head, tv, batch["vlsa_video_mask"],
                                                               batch["mm_video_positions"])),
               "vlsa/mm_audio": global_mean(*masked_patch_loss(ha_tok, m.audio_head, ta, batch["vlsa_audio_mask"],
                                                               batch["mm_audio_positions"]))}
        pos = batch["mm_text_positions"].to(ht.device)
        nll = m.text_mlm_loss(ht.reshape(-1, ht.shape[-1]).index_select(0, pos), batch["mm_text_labels"].to(ht.device))
        out["vlsa/mm_text"] = global_mean(nll.sum(), nll.new_tensor(float(pos.shape[0])))
        return out

    def forward(self, batch: dict) -> Dict[str, torch.Tensor]:
        m, c = self.model, self.cfg
        if any(k not in batch for k in ("vlsa_video_mask",) + PLAN_KEYS):
            raise ValueError("VLSATask needs the draws and plan of VLSATask.prepare(batch, generator) in the batch")
        ids, mask, has_audio = batch["text_ids"], batch["text_mask"], batch.get("has_audio")
        gv, hv = m.encode_video(batch["video"], batch["vlsa_video_mask"])
        gt, ht = m.encode_text(batch["mm_text_input"], mask)
        ga, ha_tok = m.encode_audio(batch["audio"], batch["vlsa_audio_mask"])
        out = self._masked_modelling(batch, hv, ht, ha_tok)
        pv, pt, pa = m.pooled(gv, hv), m.pooled(gt, ht, mask), m.pooled(ga, ha_tok)
        ha_all = None if has_audio is None else gather_features(has_audio.to(ids.device).bool())
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
