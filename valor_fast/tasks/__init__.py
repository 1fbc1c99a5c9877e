"""Training objectives: MGA / MGC (pretraining, retrieval and caption fine-tuning), QA, SCST;
the CoAVT and VLSA pretraining objectives (coavt_pretrain, vlsa_pretrain).

`build_task(model, cfg)` makes the task `train.task` names from the registry (tasks/base.py);
the built-in tasks register themselves when this package is imported."""
from . import coavt, pretrain, qa, scst, vlsa  # noqa: F401  (registers pretrain, retrieval, caption, qa, scst, coavt_pretrain, vlsa_pretrain)
from .base import TASKS, Task, get_task, register_task  # noqa: F401


def build_task(model, cfg) -> Task:
    """The training objective of `cfg.train.task` (the module FSDP / DDP wrap); the task must
    train the run's model.family."""
    cls = get_task(cfg.train.task)
    if cls.family != cfg.model.family:
        fits = sorted(n for n, c in TASKS.items() if c.family == cfg.model.family)
        raise ValueError(f"train.task={cfg.train.task} trains model.family={cls.family}, but model.family="
                         f"{cfg.model.family}; its tasks: {fits}")
    return cls.from_config(model, cfg)
