"""The model families on one engine: build and count a run's model by its `model.family`.

    valor  VALOR (model/valor.py): ModelConfig
    coavt  CoAVT (model/coavt.py): CoAVTArgs
    vlsa   VLSA  (model/vlsa.py):  VLSAArgs

Every family's model defines `transformer_blocks()` (the ModuleLists train/parallelize.py wraps
for activation checkpointing, compile and FSDP).  Sizes live in model/args.py."""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from . import coavt, valor, vlsa
from .args import ModelArgs, family_of


def build_model(cfg: ModelArgs) -> nn.Module:
    """The model of `cfg` (random init; VALOR also loads its model.init_* weights)."""
    fam = family_of(cfg)
    if fam == "coavt":
        return coavt.build_coavt(cfg)
    if fam == "vlsa":
        return vlsa.build_vlsa(cfg)
    return valor.build_model(cfg)


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Parameters by component ("total" first) of any family's model."""
    if isinstance(model, coavt.CoAVT):
        return coavt.count_parameters(model)
    if isinstance(model, vlsa.VLSA):
        return vlsa.count_parameters(model)
    return valor.count_parameters(model)
