"""AdamW's parameter groups: train.vision_lr reaches the vision tower however the model is wrapped."""
import dataclasses

import torch

from valor_fast.config import LossConfig, TrainConfig
from valor_fast.model.args import model_config
from valor_fast.model.valor import build_model
from valor_fast.tasks.pretrain import PretrainTask
from valor_fast.train.optim import build_optimizer

SMALL = dict(image_size=16, patch_size=8, vision_width=32, vision_heads=2, vision_layers=1, text_width=32,
             text_heads=2, text_ffn=64, text_layers=1, audio_width=32, audio_heads=2, audio_layers=1,
             audio_mel_bins=32, audio_frames=32, contra_dim=16, vocab_size=1100, max_positions=16)


def _lrs(opt):
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


def test_vision_lr_applies_to_the_vision_tower_inside_the_task():
    model = build_model(model_config("tiny", **SMALL))
    task = PretrainTask(model, LossConfig())   # what the trainer optimises: names are model.vision.*
    cfg = dataclasses.replace(TrainConfig(), lr=1e-3, vision_lr=5e-3)
    lrs = _lrs(build_optimizer(task, cfg, torch.device("cpu")))
    vision = {id(p) for p in model.vision.parameters()}
    assert vision and all(lrs[i] == 5e-3 for i in vision)
    rest = [id(p) for p in task.parameters() if id(p) not in vision]
    assert rest and all(lrs[i] == 1e-3 for i in rest)
    # vision_lr 0: one learning rate for everything
    lrs = _lrs(build_optimizer(task, dataclasses.replace(cfg, vision_lr=0.0), torch.device("cpu")))
    assert set(lrs.values()) == {1e-3}
