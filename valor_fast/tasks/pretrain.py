"""Pretraining objective: 1.5 x mean(MGA groups) + 1.0 x mean(MGC groups) upstream (the embedded
default weighs the MGA groups: loss.mga_group_weights)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ..config import LossConfig
from ..model.valor import VALOR
from .base import Task, masked_mean, register_task, sample_generators
from .mga import mga_group_losses, parse_groups
from .mgc import audio_presence, mask_plan, masking_draws, mgc_group_losses, plan_of


def mgc_groups_of(cfg: LossConfig) -> str:
    """The groups MGC captions: those of loss.groups also in loss.mgc_groups ('' = all), in
    loss.groups' order."""
    want = {g.strip() for g in cfg.mgc_groups.split(",") if g.strip()}
    if not want:
        return cfg.groups
    return ",".join(g.strip() for g in cfg.groups.split(",") if g.strip() in want)


def mga_weights_of(cfg: LossConfig) -> Tuple[float, ...]:
    """The relative weight of each group of loss.groups, in its order, from loss.mga_group_weights
    ('' or a group it does not list: 1)."""
    given = dict((g.strip(), float(w)) for g, w in (kv.split(":") for kv in cfg.mga_group_weights.split(",") if kv.strip()))
    return tuple(given.get(g, 1.0) for g in parse_groups(cfg.groups))


def move_batch(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def pretrain_step_losses(model: VALOR, batch: dict, cfg: LossConfig,
                         generator: Optional[torch.Generator] = None,
                         mark: Optional[Callable[[str], None]] = None) -> Dict[str, torch.Tensor]:
    """The step's loss terms and their weighted total ("loss"): the same keys every step, a
    group with no eligible sample a masked 0 left out of its objective's mean over groups.  The
    MGC mask plan comes from the batch (`PretrainTask.prepare`), else it is drawn here from
    batch["mask_rand"] or `generator`.  `mark(phase)`, if given, is called as each forward phase
    ends (encoders, mga, decoder): bench/train_step.py times the phases with it."""
    mark = mark or (lambda _phase: None)
    ids, mask = batch["text_ids"], batch["text_mask"]
    has_audio = audio_presence(batch, cfg)
    vt = model.encode_video(batch["video"])          # (B, n, Lv, dv)
    at = model.encode_audio(batch["audio"])          # (B, S, La, da)
    th = model.encode_text(ids, mask)                # (B, L, dt)
    t, v, a = model.text_features(th, mask), model.video_features(vt), model.audio_features(at)
    mark("encoders")
    losses: Dict[str, torch.Tensor] = {}
    total = 0.0
    if cfg.mga_weight:
        mga, present = mga_group_losses(model, t, v, a, cfg.mga_mode, cfg.groups, has_audio,
                                        padding=cfg.fine_padding, text_len=cfg.fine_text_len)
        losses.update({f"mga/{k}": x for k, x in mga.items()})
        total = total + cfg.mga_weight * masked_mean(mga.values(), present.values(), mga_weights_of(cfg))
    mark("mga")
    if cfg.mgc_weight:
        memory, n_video = model.memory(vt, at)
        capt = mgc_groups_of(cfg)
        plan = plan_of(batch) or mask_plan(ids, mask, capt, cfg.mask_prob, model.cfg.vocab_size, has_audio,
                                           generator, batch.get("mask_rand"), random_from=cfg.mask_random_from)
        means, present = mgc_group_losses(model, plan, mask, memory, n_video, capt, has_audio,
                                          cfg.label_smoothing, grouped=cfg.grouped_decoder)
        groups = parse_groups(capt)
        losses.update({f"mgc/{g}": means[gi] for gi, g in enumerate(groups)})
        total = total + cfg.mgc_weight * masked_mean(means, present)
    mark("decoder_mgc")
    losses["loss"] = total
    return losses


@register_task("pretrain")
class PretrainTask(Task):
    """The pretraining objective (MGA on loss.groups, MGC on loss.mgc_groups) as the FSDP / DDP
    root."""

    evaluation = "caption"

    def __init__(self, model: VALOR, cfg: LossConfig):
        super().__init__(model)
        self.cfg = cfg
        self.groups = parse_groups(cfg.groups)
        self.mgc_groups = parse_groups(mgc_groups_of(cfg))

    @classmethod
    def from_config(cls, model: VALOR, cfg) -> "PretrainTask":
        return cls(model, cfg.loss)

    def loss_keys(self) -> Tuple[str, ...]:
        keys = ["loss"]
        if self.cfg.mga_weight:
            keys += [f"mga/{g}" for g in self.groups]
        if self.cfg.mgc_weight:
            keys += [f"mgc/{g}" for g in self.mgc_groups]
        return tuple(keys)

    def flop_groups(self) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        g, c = tuple(self.groups), tuple(self.mgc_groups)
        return (g if self.cfg.mga_weight else ()), (c if self.cfg.mgc_weight else ())

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """The MGC mask plan, on the host: every sample's masking draws come from its own
        generator (`sample_generators`), so they fit its real token length and do not depend on
        how the global batch is split over ranks."""
        if not self.cfg.mgc_weight:
            return batch
        draws = masking_draws(batch["text_mask"], sample_generators(generator, batch["index"]))
        batch = dict(batch)
        batch.update(mask_plan(batch["text_ids"], batch["text_mask"], self.mgc_groups, self.cfg.mask_prob,
                               self.model.cfg.vocab_size, audio_presence(batch, self.cfg), draws=draws,
                               random_from=self.cfg.mask_random_from))
        return batch

    def forward(self, batch: dict, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        return pretrain_step_losses(self.model, batch, self.cfg, generator)


@register_task("retrieval")
class RetrievalTask(PretrainTask):
    """Retrieval fine-tuning: the pretraining objective with MGA only (recipe finetune_retrieval)."""

    evaluation = "retrieval"

    @classmethod
    def from_config(cls, model: VALOR, cfg) -> "RetrievalTask":
        if not cfg.loss.mga_weight:
            raise ValueError("train.task=retrieval needs loss.mga_weight > 0 (recipe finetune_retrieval)")
        return cls(model, cfg.loss)


@register_task("caption")
class CaptionTask(PretrainTask):
    """Caption fine-tuning: the pretraining objective with MGC (recipe finetune_caption)."""

    evaluation = "caption"

    @classmethod
    def from_config(cls, model: VALOR, cfg) -> "CaptionTask":
        if not cfg.loss.mgc_weight:
            raise ValueError("train.task=caption needs loss.mgc_weight > 0 (recipe finetune_caption)")
        return cls(model, cfg.loss)
