"""Training objectives: MGA / MGC (pretraining, retrieval and caption fine-tuning), QA, SCST.

`build_task(model, cfg)` makes the task `train.task` names from the registry (tasks/base.py);
the built-in tasks register themselves when this package is imported."""
from . import pretrain, qa, scst  # noqa: F401  (registers pretrain, retrieval, caption, qa, scst)
from .base import TASKS, Task, get_task, register_task  # noqa: F401


def build_task(model, cfg) -> Task:
    """The training objective of `cfg.train.task` (the module FSDP / DDP wrap)."""
    return get_task(cfg.train.task).from_config(model, cfg)
