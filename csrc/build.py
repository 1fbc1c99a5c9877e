#!/usr/bin/env python
"""Build csrc/*.cu into libvalor_fast_cuda.so with nvcc (plain C ABI, no torch headers).

    python csrc/build.py --out DIR [--arch sm_80,sm_90a] [--nvcc PATH] [--ptxas-log FILE]
    python csrc/build.py --out DIR --emulate      # the CPU emulation build (tests only)

Called by setup.py (`--out <build_lib>/valor_fast/_lib`) when nvcc is on PATH, and by
tests/csrc/test_csrc_build.py.  One nvcc invocation per source with every arch as a -gencode; PTX for
the lowest plain arch is embedded too, so newer GPUs can JIT it.  Loaded at run time by
valor_fast/ops/_cuda.py (or from $VALOR_FAST_CUDA_LIB).

--ptxas-log writes ptxas's per-kernel report (registers, spill stores / loads, stack) for every
arch to FILE; bench/kernel_audit.py reads it.  --emulate compiles the same sources with the host
C++ compiler into libvalor_fast_cuda_emu.so (csrc/emulate/vf_emulate.h): the kernels run on the
CPU with emulated PTX, for tests/csrc/test_csrc_contrastive.py.  Only the C ABI is exported (the kernels'
host stubs stay hidden).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_NAME = "libvalor_fast_cuda.so"
EMU_LIB_NAME = "libvalor_fast_cuda_emu.so"
DEFAULT_ARCHS = "sm_80,sm_90a"


def gencode_flags(archs):
    flags = []
    plain = []
    for a in archs:
        a = a.strip()
        if not a.startswith("sm_"):
            raise SystemExit(f"build.py: arch must look like sm_80 / sm_90a, got {a!r}")
        num = a[3:]
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if num.isdigit():
            plain.append(int(num))
    if plain:  # PTX of the lowest portable arch for forward compatibility
        lo = min(plain)
        flags += ["-gencode", f"arch=compute_{lo},code=compute_{lo}"]
    return flags


def _sources():
    return sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".cu"))


def build(out_dir, archs=DEFAULT_ARCHS, nvcc=None, verbose=True, ptxas_log=None):
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    archs = [a for a in (archs.split(",") if isinstance(archs, str) else archs) if a.strip()]
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, LIB_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = os.path.join(tmp, LIB_NAME)
        cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
               "--expt-relaxed-constexpr", "-diag-suppress", "177",
               "-Xptxas", "-O3" + (",-v" if ptxas_log else ""),
               # static cudart: no libcudart.so.<nvcc major> needed next to torch's own runtime
               "-cudart", "static", *gencode_flags(archs), "-o", tmp_out, *_sources()]
        if verbose:
            print("[valor-fast csrc]", " ".join(cmd), file=sys.stderr)
        res = subprocess.run(cmd, capture_output=ptxas_log is not None, text=True)
        if ptxas_log is not None:
            _write_atomic(ptxas_log, res.stdout + res.stderr)
            if res.returncode != 0:
                sys.stderr.write(res.stderr)
        if res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, cmd)
        shutil.move(tmp_out, out)  # atomic-ish: a failed build never leaves a half-written .so
    return out


def build_emulated(out_dir, cxx=None, verbose=True):
    """The CPU emulation library (tests only): host C++ compiler, -DVF_EMULATE, CUDA headers only."""
    cxx = cxx or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no host C++ compiler (c++ / g++ / $CXX) on PATH")
    incs = _cuda_includes(shutil.which("nvcc"))
    if not incs:
        raise RuntimeError("CUDA headers (cuda_runtime.h) not found: nvcc --dryrun reported no include dir")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, EMU_LIB_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = os.path.join(tmp, EMU_LIB_NAME)
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wno-attributes",
               "-DVF_EMULATE", *incs, "-x", "c++", *_sources(), "-o", tmp_out, "-Wl,--no-undefined"]
        if verbose:
            print("[valor-fast csrc]", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        shutil.move(tmp_out, out)
    return out


def _cuda_includes(nvcc):
    """-I flags of the toolkit `nvcc` belongs to (asked from nvcc itself: it may be a wrapper script)."""
    if nvcc is None:
        return []
    res = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    incs = []
    for line in (res.stdout + res.stderr).splitlines():
        if "INCLUDES=" in line:
            for tok in line.split("INCLUDES=", 1)[1].replace('"', " ").split():
                if tok.startswith("-I") and os.path.isfile(os.path.join(tok[2:], "cuda_runtime.h")):
                    incs.append(tok)
    return incs


def _write_atomic(path, text):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for " + LIB_NAME)
    p.add_argument("--arch", default=os.environ.get("VALOR_FAST_CUDA_ARCH", DEFAULT_ARCHS),
                   help="comma list of sm_XX targets (default %(default)s)")
    p.add_argument("--nvcc", default=None, help="nvcc binary (default: from PATH)")
    p.add_argument("--ptxas-log", default=None, help="write ptxas -v output (per-kernel resources) here")
    p.add_argument("--emulate", action="store_true", help="build the CPU emulation library instead")
    args = p.parse_args(argv)
    try:
        if args.emulate:
            path = build_emulated(args.out)
        else:
            path = build(args.out, args.arch, args.nvcc, ptxas_log=args.ptxas_log)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"[valor-fast csrc] build failed: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
