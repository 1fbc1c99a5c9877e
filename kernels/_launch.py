"""Launch configurations and autotuning shared by the Triton kernels.

Every kernel's launcher is split in two: a *plan* (a pure function of the inputs and the target
architecture: which kernel, its grid, its arguments and the small set of launch configurations
worth trying for this shape) and the launch itself.  The kernel audit (bench/kernel_audit.py via
bench/audit_<family>.py) builds the same plans for VALOR's shapes and compiles every configuration
of every set for sm_80 and sm_90a, so what it checks is what the launchers run.

Autotuning: `Launch.run` wraps the kernel in `triton.autotune` over the plan's configurations,
keyed by the plan's shape arguments (one tuner per distinct configuration set, cached).  The first
configuration of a set is its default, and the only one used
  - under TRITON_INTERPRET=1 (the CPU interpreter: a search there would time numpy, not a GPU;
    the interpreter plans of every kernel hold one configuration anyway), and
  - when torch's deterministic algorithms are enabled (the choice between configurations is a
    timing, so it could differ between runs, and so would the summation order of the results).

Architecture: `launch_arch(device)` is the compute capability of a CUDA device as an integer (80 =
A100, 90 = H100); for any other device (the interpreter) it is `INTERPRETER_ARCH`, None by
default, which selects each kernel's small interpreter tiles.  Setting it to 80 or 90 makes the
interpreter run the CUDA plans of that architecture (their default configuration; tests pin a
single configuration to run the others).
"""
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple

import torch

from ._compat import triton

# the architecture whose plans run on non-CUDA devices (TRITON_INTERPRET=1); None: interpreter tiles
INTERPRETER_ARCH: Optional[int] = None


@dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration: constexpr tile sizes (`meta`) plus num_warps / num_stages."""
    meta: Tuple[Tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    def kwargs(self) -> Dict[str, int]:
        """The constexprs and options as keyword arguments of a plain (untuned) launch."""
        return dict(self.meta, num_warps=self.num_warps, num_stages=self.num_stages)

    def triton(self):
        return triton.Config(dict(self.meta), num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self) -> str:
        tiles = " ".join(f"{k}={v}" for k, v in self.meta)
        return f"{tiles} w{self.num_warps} s{self.num_stages}".strip()


def config(num_warps: int = 4, num_stages: int = 2, **meta: int) -> LaunchConfig:
    """LaunchConfig(meta=sorted(meta)) with the given options."""
    return LaunchConfig(tuple(sorted(meta.items())), num_warps, num_stages)


def unique(configs) -> Tuple[LaunchConfig, ...]:
    """Drop repeats, keeping the first occurrence (the default stays first)."""
    out = []
    for c in configs:
        if c not in out:
            out.append(c)
    return tuple(out)


@lru_cache(maxsize=None)
def _cuda_cc(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def launch_arch(device: torch.device) -> Optional[int]:
    """Compute capability (80, 86, 89, 90, 100 ...) of a CUDA device; INTERPRETER_ARCH otherwise."""
    if device.type == "cuda":
        return _cuda_cc(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_ARCH


def hopper(cc: Optional[int]) -> bool:
    """sm_90 and later: warpgroup MMA (wgmma), 228 KB shared memory per SM."""
    return cc is not None and cc >= 90


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TUNERS: Dict[tuple, object] = {}


@dataclass
class Launch:
    """A planned launch: `kernel[grid](*args, **constexprs)` under one of `configs`.

    grid: a function of the chosen configuration's meta-parameters (a dict) -> grid tuple.
    key: argument names the tuner keys on (tensor dtypes are added by Triton).
    reset_to_zero / restore_value: arguments a timing run would corrupt (accumulated into /
    updated in place), zeroed / restored around each timing run as triton.autotune does."""
    kernel: object
    grid: Callable[[dict], tuple]
    args: tuple
    constexprs: dict
    configs: Tuple[LaunchConfig, ...]
    key: Tuple[str, ...]
    reset_to_zero: Tuple[str, ...] = ()
    restore_value: Tuple[str, ...] = ()
    label: str = field(default="")

    def candidates(self) -> Tuple[LaunchConfig, ...]:
        """The configurations the tuner may choose from here (one under the interpreter or
        deterministic algorithms: the default)."""
        if not self.configs:
            raise ValueError(f"{self.label or self.kernel}: a launch plan needs at least one configuration")
        if interpreting() or torch.are_deterministic_algorithms_enabled():
            return self.configs[:1]
        return self.configs

    def run(self):
        cands = self.candidates()
        tk = (self.kernel, cands, self.key, self.reset_to_zero, self.restore_value)
        tuner = _TUNERS.get(tk)
        if tuner is None:
            tuner = triton.autotune([c.triton() for c in cands], key=list(self.key),
                                    reset_to_zero=list(self.reset_to_zero) or None,
                                    restore_value=list(self.restore_value) or None)(self.kernel)
            _TUNERS[tk] = tuner
        return tuner[self.grid](*self.args, **self.constexprs)


__all__ = ["INTERPRETER_ARCH", "Launch", "LaunchConfig", "config", "hopper", "interpreting", "launch_arch",
           "unique"]
