"""Tasks as plugins: the `Task` interface the trainer drives, and the name -> class registry.

A task is the training objective as the module FSDP / DDP wrap (one `forward` covers every
parameter access: FSDP2 unshards root-level weights in the root's forward only, and DDP syncs
the gradients of what ran inside forward).  The trainer calls, per micro-batch:

    batch = task.prepare(host_batch, generator)   # host side, before the batch moves
    losses = task(device_batch)                   # {key: scalar tensor}, keys == task.loss_keys()

A new task (CoAVT, VLSA, ...) subclasses `Task` and registers under its `train.task` name:

    @register_task("coavt")
    class CoAVTTask(Task):
        evaluation = "caption"
        @classmethod
        def from_config(cls, model, cfg): ...
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Type

import torch

from ..config import register_choices

EVALUATIONS = ("retrieval", "caption", "qa")
TASKS: Dict[str, Type["Task"]] = {}


class Task(torch.nn.Module):
    """The interface (see the module docstring).

    evaluation: what eval/ measures for the task - "retrieval" (retrieval only), "caption"
    (retrieval + captioning) or "qa" (answer accuracy); how, eval/dispatch.py decides by
    model.family."""

    name: str = ""
    evaluation: str = "caption"
    family: str = "valor"
    """The model family (model.family) the task trains; build_task refuses any other."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def from_config(cls, model: torch.nn.Module, cfg) -> "Task":
        """The task for `cfg` (the run's Config); raises ValueError naming a setting that does
        not fit the task."""
        raise NotImplementedError

    def loss_keys(self) -> Tuple[str, ...]:
        """The keys `forward` returns, the same every step ("loss" first)."""
        raise NotImplementedError

    def flop_groups(self) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """(groups aligned by MGA, groups decoded by MGC) for the model FLOP count behind MFU
        (valor_fast.model.flops).  Default: none counted (a task with its own model counts its
        own)."""
        return (), ()

    def flops_per_sample(self, cfg) -> float:
        """Model FLOPs (forward + backward) of one training sample, for the MFU the trainer
        logs.  Default: VALOR's count (model.flops.training_flops_per_sample) over
        `flop_groups`; a task with its own model (CoAVT, VLSA) counts its own."""
        from ..model.flops import training_flops_per_sample
        mga_groups, mgc_groups = self.flop_groups()
        return training_flops_per_sample(cfg.model, frames=cfg.data.frames_train, text_len=cfg.data.max_text_len,
                                         audio_slices=cfg.data.audio_slices, mga_groups=mga_groups,
                                         mgc_groups=mgc_groups, mask_prob=cfg.loss.mask_prob)

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """Host-side work on a collated CPU batch before it moves to the device: the task's
        random draws (from `generator`), tokenisation, validation.  Default: none."""
        return batch


def register_task(name: str):
    """Class decorator: make `cls` the task of train.task=`name` (a name taken twice is an
    error, so a plugin cannot silently replace a built-in task)."""
    def deco(cls: Type[Task]) -> Type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}): {cls!r} is not a Task subclass")
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is already registered ({TASKS[name].__qualname__})")
        if cls.evaluation not in EVALUATIONS:
            raise ValueError(f"task {name!r}: evaluation must be one of {EVALUATIONS}, got {cls.evaluation!r}")
        cls.name = name
        TASKS[name] = cls
        return cls
    return deco


register_choices("task", lambda: tuple(TASKS))   # train.task's rule in config.RULES


def get_task(name: str) -> Type[Task]:
    if name not in TASKS:
        raise ValueError(f"train.task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


def sample_generators(generator: torch.Generator, index: torch.Tensor) -> List[torch.Generator]:
    """One generator per sample of a batch for a task's draws: seeded by one draw from the
    step's `generator` (a function of (seed, step, micro-batch), the same on every rank) and the
    sample's dataset index.  A sample's draws therefore depend on neither its row, the rank that
    holds it, nor the other samples: splitting the global batch over ranks changes nothing."""
    base = int(torch.randint(0, 2**62, (), generator=generator))
    return [torch.Generator().manual_seed((base ^ (int(i) * _GOLDEN)) & _MASK63) for i in index.tolist()]


def masked_mean(losses, present, weights=None) -> torch.Tensor:
    """Mean of the present terms (on the device, no host sync); 0 when none is present.
    `losses`, `present`: (G,) tensors or sequences of scalars; `weights` (G floats, > 0): the
    weighted mean sum(w x) / sum(w) over the present terms instead."""
    x = losses if torch.is_tensor(losses) else torch.stack(list(losses))
    p = present if torch.is_tensor(present) else torch.stack(list(present))
    if weights is None:
        return torch.where(p, x, torch.zeros_like(x)).sum() / p.sum().clamp(min=1).to(x.dtype)
    w = torch.where(p, torch.tensor(list(weights), dtype=x.dtype, device=x.device), torch.zeros_like(x))
    return (w * torch.where(p, x, torch.zeros_like(x))).sum() / w.sum().clamp(min=1e-12)


_GOLDEN, _MASK63 = 0x9E3779B97F4A7C15, (1 << 63) - 1
