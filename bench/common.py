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


def time_ms(fn: Callable[[], object], device, warmup: int = 3, iters: int = 10) -> list:
    """Per-call wall milliseconds of fn() (CUDA: events around each call; CPU: perf_counter).
    For whole training steps, where do_bench's L2 flush and ms-budget loop do not fit."""
    import time

    import torch
    cuda = getattr(device, "type", str(device)) == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure_peaks(device, dtype=None) -> dict:
    """The device's measured ceilings, taken in the same run as the numbers they normalise:
    dense matmul TFLOP/s (CUDA: bf16 8192^3; CPU: fp32 2048^3) and copy bandwidth GB/s
    (read + write of a 1 GiB (CUDA) / 256 MiB (CPU) buffer)."""
    import statistics

    import torch
    cuda = getattr(device, "type", str(device)) == "cuda"
    if cuda:
        dtype = dtype or torch.bfloat16
        n, nbytes = 8192, 1 << 30
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        mm_ms = do_bench(lambda: a @ b)
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        cp_ms = do_bench(lambda: dst.copy_(src))
    else:
        dtype = dtype or torch.float32
        n, nbytes = 2048, 1 << 28
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        mm_ms = statistics.median(time_ms(lambda: a @ b, device, 2, 5))
        src = torch.empty(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        cp_ms = statistics.median(time_ms(lambda: dst.copy_(src), device, 2, 5))
    return {"matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n,
            "matmul_tflops": 2 * n ** 3 / (mm_ms * 1e-3) / 1e12,
            "copy_gbps": 2 * nbytes / (cp_ms * 1e-3) / 1e9}
