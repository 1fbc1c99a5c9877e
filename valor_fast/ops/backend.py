"""One backend switch for every dispatching op family (attention, contrastive, fused).

Per call, `BackendSwitch.choose(what, **ctx)` picks:
  1. a backend forced in code (`set_backend(name)` / `with use_backend(name):`, for tests and
     benchmarks; None or "auto" = not forced),
  2. else the environment variable (`env_var`, read on every call so it can be flipped),
  3. else the family's `auto_rule(**ctx) -> (backend, reason)`.
A forced backend is strict: if `why_not(backend, **ctx)` has a reason (the family's `check` for
devices / inputs, then the availability probe, whose reasons carry the install hint), the call
raises RuntimeError naming the backend, where it was forced and why, rather than silently running
something else.  Availability is probed once, when the switch is made (`probe() -> {backend:
(usable, why)}`: cheap, import-time facts; a check that needs the device, such as loading the CUDA
C++ library, belongs in `check`, which runs only for the backend being asked about), logged once
on the first choice, and each (what, backend, reason) choice is logged once.  Logging is skipped
while torch.compile traces, so a compiled first call traces nothing but dictionary look-ups.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ..utils.log import log_once

Probe = Callable[[], Dict[str, Tuple[bool, str]]]


class BackendSwitch:
    """op: the family's name in messages and log keys ("attention", "contrastive", "fused").
    env_var: the override read per call (e.g. VALOR_FAST_ATTN).  backends: the names accepted.
    probe: () -> {backend: (usable, why)}, run once, here.  auto_rule: (**ctx) -> (backend, reason).
    check: (backend, **ctx) -> why `backend` cannot take this call, or None (consulted before the
    probe, so input-level reasons come first)."""

    def __init__(self, op: str, env_var: str, backends: Sequence[str], probe: Probe,
                 auto_rule: Callable[..., Tuple[str, str]],
                 check: Optional[Callable[..., Optional[str]]] = None):
        self.op = op
        self.env_var = env_var
        self.backends = tuple(backends)
        # probed now, at import of the family's module: never inside a torch.compile trace
        self._available: Dict[str, Tuple[bool, str]] = dict(probe())
        self._auto_rule = auto_rule
        self._check = check
        self._forced: Optional[str] = None

    # ---- forcing ----------------------------------------------------------------------------
    def validate(self, name: Optional[str], source: str) -> Optional[str]:
        if name is None or name == "auto":
            return None
        if name not in self.backends:
            raise ValueError(f"{source}: {self.op} backend must be one of {self.backends} or 'auto', "
                             f"got {name!r}")
        return name

    def set_backend(self, name: Optional[str]) -> None:
        """Force one backend for every call (None or 'auto' = automatic choice)."""
        self._forced = self.validate(name, "set_backend")

    def forced(self) -> Optional[str]:
        """The backend forced in code, else by the env var, else None (automatic)."""
        if self._forced is not None:
            return self._forced
        return self.validate(os.environ.get(self.env_var, "").strip().lower() or None, self.env_var)

    @contextlib.contextmanager
    def use_backend(self, name: Optional[str]) -> Iterator[None]:
        """`with use_backend("triton"): ...` forces a backend inside the block (restored on exit);
        `use_backend(None)` lifts a code override inside the block (the env var applies)."""
        prev = self._forced
        self._forced = self.validate(name, "use_backend")
        try:
            yield
        finally:
            self._forced = prev

    # ---- availability and choice ------------------------------------------------------------
    def available(self) -> Dict[str, Tuple[bool, str]]:
        """{backend: (usable, why)}, as probed once when the switch was made."""
        return self._available

    def why_not(self, backend: str, **ctx) -> Optional[str]:
        """Why `backend` cannot run this call, or None if it can."""
        if self._check is not None:
            why = self._check(backend, **ctx)
            if why is not None:
                return why
        ok, why = self.available().get(backend, (False, "unknown backend"))
        return None if ok else why

    def choose(self, what: Optional[str] = None, **ctx) -> str:
        """The backend for one call; `what` names the op in logs and errors."""
        self._log_probe()
        forced = self.forced()
        if forced is not None:
            why = self.why_not(forced, **ctx)
            if why is not None:
                where = "set_backend / use_backend" if self._forced is not None else self.env_var
                raise RuntimeError(f"{self._label(what)}: backend {forced!r} forced ({where}) but "
                                   f"unusable: {why}")
            self.log(what, forced, "forced")
            return forced
        backend, reason = self._auto_rule(**ctx)
        self.log(what, backend, "auto: " + reason)
        return backend

    def _label(self, what: Optional[str]) -> str:
        return self.op if what is None or what == self.op else f"{self.op} {what}"

    def log(self, what: Optional[str], backend: str, reason: str) -> None:
        if not torch.compiler.is_compiling():  # logging does not trace; the eager first call logs
            log_once(f"{self.op}:{what}:{backend}:{reason}", f"{self._label(what)}: {backend} backend ({reason})")

    def _log_probe(self) -> None:
        if not torch.compiler.is_compiling():
            avail = self.available()
            log_once(f"{self.op}:probe", f"{self.op} backends: " + ", ".join(
                f"{n}={'yes' if ok else 'no'} ({why})" for n, (ok, why) in avail.items()))


def interpreting() -> bool:
    """Triton kernels run on the CPU only under TRITON_INTERPRET=1 (read per call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_reason(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on tensors of `device`, or None."""
    if device.type != "cuda" and not interpreting():
        return f"{device.type} tensors: Triton runs on CUDA, or on the CPU only with TRITON_INTERPRET=1"
    return None
