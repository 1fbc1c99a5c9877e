"""csrc/ builds with nvcc for sm_80 and sm_90a, exports the C ABI the ctypes loader binds, passes the
ahead-of-time kernel audit (bench/kernel_audit.py: no spills in 16-bit paths, shared memory within
the limit, tensor-core instructions in every matrix kernel), and the loader reports (rather than
raises) when it cannot be used.  Running the kernels: tests/csrc/test_csrc_contrastive.py (emulated on
the CPU; the real library on a GPU).  One nvcc build (with the ptxas report) serves every test here."""
import ctypes
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "csrc", "build.py")
AUDIT = os.path.join(ROOT, "bench", "kernel_audit.py")
SYMBOLS = ("vf_version", "vf_probe", "vf_error_string", "vf_coarse_lse", "vf_coarse_grad", "vf_fine_fwd",
           "vf_fine_bwd", "vf_kernel_count", "vf_kernel_info")

sys.path.insert(0, ROOT)
from bench import kernel_audit as ka  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH: the CUDA C++ backend cannot be built here "
                    "(install the CUDA toolkit; the Triton and torch backends do not need it)")
    out = tmp_path_factory.mktemp("csrc_build")
    log = out / "ptxas.log"
    res = subprocess.run([sys.executable, BUILD, "--out", str(out), "--arch", "sm_80,sm_90a", "--ptxas-log", str(log)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"csrc build failed:\n{res.stdout}\n{res.stderr}"
    lib = out / "libvalor_fast_cuda.so"
    assert lib.exists()
    return str(lib), log.read_text()


@pytest.fixture(scope="module")
def audit_rows(built):
    if ka.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (ships with Triton's wheel and the CUDA toolkit)")
    return ka.audit_csrc(*built)


def test_builds_for_sm80_and_sm90a(built):
    cuobjdump = ka.find_tool("cuobjdump")
    if cuobjdump is not None:
        listing = subprocess.run([cuobjdump, "--list-elf", built[0]], capture_output=True, text=True).stdout
    else:  # no cuobjdump: the embedded cubins still carry their arch names
        with open(built[0], "rb") as f:
            listing = f.read().decode("latin-1")
    assert "sm_80" in listing and "sm_90a" in listing, "sm_80 / sm_90a cubins missing"


def test_exports_c_abi(built):
    lib = ctypes.CDLL(built[0])  # static cudart: loads without a driver, nothing CUDA runs here
    for name in SYMBOLS:
        assert hasattr(lib, name), f"{name} not exported"
    assert not hasattr(lib, "vfk_coarse_grad_bf16"), "kernel host stubs should stay hidden"
    lib.vf_version.restype = ctypes.c_int
    assert lib.vf_version() == 1
    lib.vf_error_string.restype = ctypes.c_char_p
    assert lib.vf_error_string(0)  # cudaGetErrorString(cudaSuccess)


def test_kernel_table_matches_the_cubins(built, audit_rows):
    table = ka.csrc_kernel_table(built[0])
    names = [k["name"] for k in table]
    assert len(names) == len(set(names)) == 25, names
    assert not [r for r in audit_rows if r.get("compile_error")], "a tabled kernel has no code for an arch"
    per_arch = Counter(r["arch"] for r in audit_rows)
    assert per_arch == {"sm_80": 25, "sm_90a": 25}


def test_audit_csrc_thresholds(audit_rows):
    """The CI gate of issue 17 for csrc: no finding on either architecture."""
    bad = [(r["kernel"], r["arch"], r["findings"]) for r in audit_rows if r["findings"]]
    assert not bad, bad
    mma = [r for r in audit_rows if r["mma_kernel"]]
    assert len(mma) == 48
    for r in mma:
        assert r["instr_kinds"].get("HMMA", 0) >= 8, (r["kernel"], r["arch"], r["instr_kinds"])
        if r["is_16bit"]:
            assert r["instr_kinds"].get("LDSM", 0) > 0, f"{r['kernel']}: 16-bit operands should come from ldmatrix"
    for r in audit_rows:  # every csrc kernel stays out of local memory, fp32 included
        assert r["spill_bytes"] == 0 and r["local_bytes"] == 0, (r["kernel"], r["arch"])


def test_audit_findings_can_fail():
    """Each threshold trips on a row that breaks it (so a clean audit means something)."""
    base = dict(kernel="k", arch="sm_80", shared_bytes=1000, shared_limit=166912, is_16bit=True, spill_bytes=0,
                mma_kernel=True, has_tensor_core_instr=True)
    assert ka.findings(base) == []
    assert ka.findings(dict(base, shared_bytes=170000))
    assert ka.findings(dict(base, spill_bytes=8))
    assert ka.findings(dict(base, spill_bytes=8, is_16bit=False)) == []  # fp32 spills: reported only
    assert "HMMA" in ka.findings(dict(base, has_tensor_core_instr=False))[0]
    assert "HGMMA" in ka.findings(dict(base, arch="sm_90a", has_tensor_core_instr=False))[0]
    assert ka.findings(dict(kernel="k", arch="sm_80", compile_error="boom"))[0].startswith("compile error")


def test_occupancy_model():
    # 208 registers x 256 threads: 6656 registers per warp, 2 warps per scheduler -> one block
    assert ka.occupancy(80, 208, 70000, 256)["blocks_per_sm"] == 1
    # 64 registers: 8 warps per scheduler -> 32 warps (50%); 32 registers: all 64 warps
    o = ka.occupancy(90, 64, 0, 128)
    assert (o["blocks_per_sm"], o["occupancy"], o["occupancy_limiter"]) == (8, 0.5, "registers")
    o = ka.occupancy(90, 32, 0, 128)
    assert (o["blocks_per_sm"], o["occupancy"]) == (16, 1.0)
    # shared memory bound: 3 x (48 KB + 1 KB reserved) fit in A100's 164 KB, 4 in H100's 228 KB
    assert ka.occupancy(80, 32, 48 * 1024, 128)["blocks_per_sm"] == 3
    assert ka.occupancy(90, 32, 48 * 1024, 128)["blocks_per_sm"] == 4
    assert ka.occupancy(80, 32, 48 * 1024, 128)["occupancy_limiter"] == "shared_memory"
    assert ka.occupancy(80, 32, 200 * 1024, 128)["blocks_per_sm"] == 0  # over the per-block limit


def test_audit_triton_helper_compiles_for_both_archs():
    """audit_triton on one of our kernels (bias+GELU forward): triton.compile for sm_80 / sm_90a,
    registers and spills from the cubin and ptxas, no GPU.  A subprocess: the audit needs
    TRITON_INTERPRET=0, the test session runs under the interpreter."""
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, AUDIT, "--only", "bias_gelu_fwd", "--check", "--no-write", "--json"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["arch"] for r in rows) == ["sm_80", "sm_90a"]
    for r in rows:
        assert r["kernel"] == "_bias_gelu_fwd_kernel" and r["source"] == "triton"
        assert r["registers"] > 0 and r["threads"] == 128 and r["spill_stores"] is not None
        assert r["instr_total"] > 0 and not r["mma_kernel"] and r["findings"] == []


def test_loader_reports_unavailable_reason(monkeypatch):
    from valor_fast.ops import _cuda
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: availability is exercised by tests/kernels/test_contrastive.py")
    monkeypatch.setattr(_cuda, "_state", {"lib": None, "why": None, "tried": False})
    assert not _cuda.available()
    assert "cuda" in _cuda.why_unavailable().lower()
