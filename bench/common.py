"""Shared benchmark harness: timing, environment record, JSON-lines results.

    from bench.common import do_bench, env_info, append_result

Kept generic and importable without a GPU (the CUDA queries happen only when one is present).
"""
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Callable, Optional, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def do_bench(fn: Callable[[], object], warmup: int = 25, rep: int = 100,
             grad_to_none: Optional[Sequence] = None) -> float:
    """Median milliseconds of fn() by `triton.testing.do_bench` (CUDA events, L2 flushed between
    calls).  warmup / rep are in milliseconds, as in triton."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.check_output(["git", *args], cwd=_ROOT, stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def env_info() -> dict:
    """Device, library versions, git commit and the command line, for every results row."""
    import torch
    info = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "host": platform.node(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0),
                    device_capability="%d.%d" % (props.major, props.minor),
                    device_mem_gb=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count)
    else:
        info["device"] = "cpu"
    return info


def append_result(path: str, row: dict) -> None:
    """Append `row` as one JSON line to `path` (folders created as needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
