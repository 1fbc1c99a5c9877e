"""Pretraining objective: 1.5 x mean(MGA groups) + 1.0 x mean(MGC groups) by default."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..config import LossConfig
from ..model.valor import VALOR
from .mga import mga_loss
from .mgc import mgc_loss


def move_batch(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def pretrain_step_losses(model: VALOR, batch: dict, cfg: LossConfig,
                         generator: Optional[torch.Generator] = None,
                         mark: Optional[Callable[[str], None]] = None) -> Dict[str, torch.Tensor]:
    """The step's loss terms and their weighted total ("loss").  `mark(phase)`, if given, is
    called as each forward phase ends (encoders, mga, decoder): bench/train_step.py times the
    phases with it."""
    mark = mark or (lambda _phase: None)
    ids, mask = batch["text_ids"], batch["text_mask"]
    has_audio = batch.get("has_audio")
    vt = model.encode_video(batch["video"])          # (B, n, Lv, dv)
    at = model.encode_audio(batch["audio"])          # (B, S, La, da)
    th = model.encode_text(ids, mask)                # (B, L, dt)
    t, v, a = model.text_features(th, mask), model.video_features(vt), model.audio_features(at)
    mark("encoders")
    losses: Dict[str, torch.Tensor] = {}
    total = 0.0
    if cfg.mga_weight:
        mga = mga_loss(model, t, v, a, cfg.mga_mode, cfg.groups, has_audio)
        losses.update({f"mga/{k}": x for k, x in mga.items()})
        total = total + cfg.mga_weight * torch.stack(list(mga.values())).mean()
    mark("mga")
    if cfg.mgc_weight:
        memory, n_video = model.memory(vt, at)
        mgc = mgc_loss(model, ids, mask, memory, n_video, cfg.groups, cfg.mask_prob, has_audio,
                       cfg.label_smoothing, generator, batch.get("mask_rand"),
                       grouped=cfg.grouped_decoder)
        losses.update({f"mgc/{k}": x for k, x in mgc.items()})
        total = total + cfg.mgc_weight * torch.stack(list(mgc.values())).mean()
    mark("decoder_mgc")
    losses["loss"] = total
    return losses


class PretrainTask(torch.nn.Module):
    """The pretraining objective as a module, so one `forward` covers every parameter access:
    FSDP2 unshards root-level weights (heads, embeddings) in the root's forward only, and DDP
    syncs gradients of what ran inside forward."""

    def __init__(self, model: VALOR, cfg: LossConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch: dict, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        return pretrain_step_losses(self.model, batch, self.cfg, generator)
