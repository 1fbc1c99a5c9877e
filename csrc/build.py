#!/usr/bin/env python
"""Build csrc/*.cu into libvalor_fast_cuda.so with nvcc (plain C ABI, no torch headers).

    python csrc/build.py --out DIR [--arch sm_80,sm_90a] [--nvcc PATH] [-j N]

Called by setup.py (`--out <build_lib>/valor_fast/_lib`) when nvcc is on PATH, and by
tests/test_csrc_build.py.  One nvcc invocation per source with every arch as a -gencode; PTX for
the lowest plain arch is embedded too, so newer GPUs can JIT it.  Loaded at run time by
valor_fast/ops/_cuda.py (or from $VALOR_FAST_CUDA_LIB).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_NAME = "libvalor_fast_cuda.so"
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


def build(out_dir, archs=DEFAULT_ARCHS, nvcc=None, verbose=True):
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    archs = [a for a in (archs.split(",") if isinstance(archs, str) else archs) if a.strip()]
    sources = sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".cu"))
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, LIB_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = os.path.join(tmp, LIB_NAME)
        cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
               "-Xptxas", "-O3",
               # static cudart: no libcudart.so.<nvcc major> needed next to torch's own runtime
               "-cudart", "static", *gencode_flags(archs), "-o", tmp_out, *sources]
        if verbose:
            print("[valor-fast csrc]", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        shutil.move(tmp_out, out)  # atomic-ish: a failed build never leaves a half-written .so
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for " + LIB_NAME)
    p.add_argument("--arch", default=os.environ.get("VALOR_FAST_CUDA_ARCH", DEFAULT_ARCHS),
                   help="comma list of sm_XX targets (default %(default)s)")
    p.add_argument("--nvcc", default=None, help="nvcc binary (default: from PATH)")
    args = p.parse_args(argv)
    try:
        path = build(args.out, args.arch, args.nvcc)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"[valor-fast csrc] build failed: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
