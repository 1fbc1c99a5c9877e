"""Pretraining objective: 1.5 x mean(MGA groups) + 1.0 x mean(MGC groups) by default."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ..config import LossConfig
from ..model.valor import VALOR
from .base import Task, register_task
from .mga import mga_loss, parse_groups
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


@register_task("pretrain")
class PretrainTask(Task):
    """The pretraining objective (MGA + MGC on loss.groups) as the FSDP / DDP root."""

    evaluation = "caption"

    def __init__(self, model: VALOR, cfg: LossConfig):
        super().__init__(model)
        self.cfg = cfg
        self.groups = parse_groups(cfg.groups)

    @classmethod
    def from_config(cls, model: VALOR, cfg) -> "PretrainTask":
        return cls(model, cfg.loss)

    def loss_keys(self) -> Tuple[str, ...]:
        keys = ["loss"]
        if self.cfg.mga_weight:
            keys += [f"mga/{g}" for g in self.groups]
        if self.cfg.mgc_weight:
            keys += [f"mgc/{g}" for g in self.groups]
        return tuple(keys)

    def forward(self, batch: dict, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        return pretrain_step_losses(self.model, batch, self.cfg, generator)


@register_task("retrieval")
class RetrievalTask(PretrainTask):
    """Retrieval fine-tuning: the pretraining objective with MGA only (configs/finetune_retrieval.yaml)."""

    evaluation = "retrieval"

    @classmethod
    def from_config(cls, model: VALOR, cfg) -> "RetrievalTask":
        if not cfg.loss.mga_weight:
            raise ValueError("train.task=retrieval needs loss.mga_weight > 0 (configs/finetune_retrieval.yaml)")
        return cls(model, cfg.loss)


@register_task("caption")
class CaptionTask(PretrainTask):
    """Caption fine-tuning: the pretraining objective with MGC (configs/finetune_caption.yaml)."""

    evaluation = "caption"

    @classmethod
    def from_config(cls, model: VALOR, cfg) -> "CaptionTask":
        if not cfg.loss.mgc_weight:
            raise ValueError("train.task=caption needs loss.mgc_weight > 0 (configs/finetune_caption.yaml)")
        return cls(model, cfg.loss)
