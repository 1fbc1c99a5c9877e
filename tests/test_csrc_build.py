"""csrc/ builds with nvcc for sm_80 and sm_90a, exports the C ABI the ctypes loader binds, and the
loader reports (rather than raises) when it cannot be used.  Running the kernels needs a GPU:
tests/test_contrastive.py covers the CUDA backend numerically where one exists."""
import ctypes
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "csrc", "build.py")
SYMBOLS = ("vf_version", "vf_probe", "vf_error_string", "vf_coarse_lse", "vf_coarse_grad", "vf_fine_fwd",
           "vf_fine_bwd")


@pytest.fixture(scope="module")
def built_lib(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH: the CUDA C++ backend cannot be built here "
                    "(install the CUDA toolkit; the Triton and torch backends do not need it)")
    out = tmp_path_factory.mktemp("csrc_build")
    res = subprocess.run([sys.executable, BUILD, "--out", str(out), "--arch", "sm_80,sm_90a"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"csrc build failed:\n{res.stdout}\n{res.stderr}"
    lib = out / "libvalor_fast_cuda.so"
    assert lib.exists()
    return str(lib)


def test_builds_for_sm80_and_sm90a(built_lib):
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is not None:
        listing = subprocess.run([cuobjdump, "--list-elf", built_lib], capture_output=True, text=True).stdout
    else:  # no cuobjdump: the embedded cubins still carry their arch names
        with open(built_lib, "rb") as f:
            listing = f.read().decode("latin-1")
    assert "sm_80" in listing and "sm_90a" in listing, "sm_80 / sm_90a cubins missing"


def test_exports_c_abi(built_lib):
    lib = ctypes.CDLL(built_lib)  # static cudart: loads without a driver, nothing CUDA runs here
    for name in SYMBOLS:
        assert hasattr(lib, name), f"{name} not exported"
    lib.vf_version.restype = ctypes.c_int
    assert lib.vf_version() == 1
    lib.vf_error_string.restype = ctypes.c_char_p
    assert lib.vf_error_string(0)  # cudaGetErrorString(cudaSuccess)


def test_loader_reports_unavailable_reason(monkeypatch):
    from valor_fast.ops import _cuda
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: availability is exercised by tests/test_contrastive.py")
    monkeypatch.setattr(_cuda, "_state", {"lib": None, "why": None, "tried": False})
    assert not _cuda.available()
    assert "cuda" in _cuda.why_unavailable().lower()
