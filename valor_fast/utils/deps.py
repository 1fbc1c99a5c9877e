"""Optional dependencies, probed once at import.

Each `HAS_X` can be forced off for tests with `VALOR_FAST_DISABLE=flash_attn,xformers,...`
(a comma list); a missing one is logged once, with its install hint, when a path needs it.
"""
import importlib.util
import os

from .log import log_once

_DISABLED = {s.strip() for s in os.environ.get("VALOR_FAST_DISABLE", "").split(",") if s.strip()}

INSTALL_HINTS = {
    "triton": "pip install triton",
    "flash_attn": "pip install flash-attn --no-build-isolation",
    "xformers": "pip install xformers",
    "nvidia.dali": "pip install nvidia-dali-cuda130",
    "torch_tb_profiler": "pip install torch-tb-profiler",
    "av": "pip install av",
    "soundfile": "pip install soundfile",
    "pycocoevalcap": "pip install pycocoevalcap",
    "matplotlib": 'pip install -e ".[viz]"  (or: pip install matplotlib)',
}


def _has(mod: str) -> bool:
    if mod.split(".")[0] in _DISABLED or mod in _DISABLED:
        return False
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _has("triton")
HAS_FLASH_ATTN = _has("flash_attn")
HAS_XFORMERS = _has("xformers")
HAS_DALI = _has("nvidia.dali")
HAS_AV = _has("av")
HAS_SOUNDFILE = _has("soundfile")
HAS_COCOEVAL = _has("pycocoevalcap")
HAS_TB_PROFILER = _has("torch_tb_profiler")
HAS_MATPLOTLIB = _has("matplotlib")


def missing(mod: str, what: str) -> None:
    """Log once that `mod` is missing and what falls back."""
    log_once("missing:" + mod, f"{mod} not available: {what} (install: {INSTALL_HINTS.get(mod, 'pip install ' + mod)})")


def summary() -> dict:
    return {
        "triton": HAS_TRITON, "flash_attn": HAS_FLASH_ATTN, "xformers": HAS_XFORMERS,
        "dali": HAS_DALI, "av": HAS_AV, "soundfile": HAS_SOUNDFILE,
        "pycocoevalcap": HAS_COCOEVAL, "torch_tb_profiler": HAS_TB_PROFILER,
        "matplotlib": HAS_MATPLOTLIB,
    }
