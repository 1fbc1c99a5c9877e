"""Is it safe to resume a run with this config?  Compares the run's saved config.yaml with the
new config (both as the nested dicts `config.to_dict` gives) and sorts the differences:

* unsafe -- the fields that define the model's parameters or the objective: every field of
  `model` (model.audio_mel_bins shapes the audio patch embedding) and `loss`, and `train.task`.
  A resume with one of these changed either fails deep inside the load or, worse, silently
  trains another model from the checkpoint's weights.  Exceptions that only pick how the
  weights are initialised (overwritten by the checkpoint on a resume): model.init_text,
  model.init_vision, model.temperature (a learnable parameter's initial value).
* allowed -- everything else (steps, lr, logging, eval, data loading...), reported so the log
  shows what changed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..utils.log import get_logger

log = get_logger(__name__)

UNSAFE_SECTIONS = ("model", "loss")
UNSAFE_FIELDS = ("train.task",)
SAFE_IN_UNSAFE = ("model.init_text", "model.init_vision", "model.temperature")
_ABSENT = "<absent>"

Change = Tuple[str, Any, Any]


def _flat(cfg: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for sec, fields_ in (cfg or {}).items():
        if isinstance(fields_, dict):
            out.update({f"{sec}.{k}": v for k, v in fields_.items()})
        else:
            out[sec] = fields_
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def is_unsafe(key: str) -> bool:
    if key in SAFE_IN_UNSAFE:
        return False
    return key.split(".", 1)[0] in UNSAFE_SECTIONS or key in UNSAFE_FIELDS


@dataclass
class ConfigDiff:
    unsafe: List[Change] = field(default_factory=list)
    allowed: List[Change] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unsafe)

    @staticmethod
    def _fmt(changes: List[Change]) -> str:
        return "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes)

    def message(self, run_dir: str = "") -> str:
        """One line for the refusal."""
        where = f" of {run_dir}" if run_dir else ""
        return (f"refusing to resume: the config differs from the run's config.yaml{where} in fields that change "
                f"the model or its loss: {self._fmt(self.unsafe)}. Resume with the run's values, start a new run "
                f"(another --train.run_name), or start a new run from its weights with --train.init")

    def notes(self) -> str:
        return self._fmt(self.allowed)


def resume_config_diff(saved: Dict[str, Any], new: Dict[str, Any], allow: Sequence[str] = (),
                       defaults: Optional[Dict[str, Any]] = None) -> ConfigDiff:
    """Differences between the saved config and the new one.  `allow`: keys (or `section.*`)
    the caller explicitly accepts changing (an opt-in flag).  `defaults` (a nested dict of the
    defaults): a field the saved config lacks (written before the field existed) counts as its
    default, so adding a field never blocks resuming older runs at its default value."""
    s, n, d = _flat(saved), _flat(new), _flat(defaults or {})
    diff = ConfigDiff()
    for key in sorted(set(s) | set(n)):
        old = s.get(key, d.get(key, _ABSENT))
        cur = n.get(key, _ABSENT)
        if _norm(old) == _norm(cur):
            continue
        ok = (key in allow or f"{key.split('.', 1)[0]}.*" in allow or key not in n or not is_unsafe(key))
        (diff.allowed if ok else diff.unsafe).append((key, old, cur))
    return diff


class ResumeRefusedError(RuntimeError):
    """The new config changes the model, its loss or the task of the run being resumed."""


def check_resume_config(saved_path: str, new: Dict[str, Any], size: str, allow_partial: bool = False) -> bool:
    """Compare the run's config.yaml at `saved_path` with `new` (config.to_dict) before a resume.
    Differences in unsafe fields raise ResumeRefusedError listing every one, unless
    `allow_partial` (train.resume_partial): then they are logged and True is returned.  Allowed
    differences are logged.  No readable config.yaml: logged, False (the load still checks every
    tensor's name and shape)."""
    import yaml
    from ..config import Config, model_config, to_dict
    try:
        with open(saved_path) as f:
            saved = yaml.safe_load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as e:
        log.warning("resume: no readable config.yaml at %s (%s): the config cannot be compared; the checkpoint "
                    "load still checks every model tensor's name and shape", saved_path, e)
        return False
    diff = resume_config_diff(saved, new, defaults=to_dict(Config(model=model_config(size))))
    if diff.allowed:
        log.info("resume: settings changed from the run's config.yaml: %s", diff.notes())
    if not diff:
        return False
    where = os.path.dirname(saved_path)
    if not allow_partial:
        raise ResumeRefusedError(diff.message(where) + "; or pass --train.resume_partial true to load the tensors that "
                                                       "fit (every difference is printed)")
    log.warning("train.resume_partial: resuming %s although %s", where, ConfigDiff._fmt(diff.unsafe))
    return True
