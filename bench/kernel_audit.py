#!/usr/bin/env python
"""Ahead-of-time kernel audit: every kernel compiled for sm_80 (A100) and sm_90a (H100) without a GPU,
with its registers, spills, shared memory against the limit, tensor-core instructions in the SASS
and the occupancy bound those imply.

    python bench/kernel_audit.py                 # audit, print a table, append rows
    python bench/kernel_audit.py --check         # ... and exit 1 on any finding below
    python bench/kernel_audit.py --only csrc --no-write --json

Findings (`--check`): a compile error; shared memory (static + dynamic) above the per-block
opt-in limit (163 KB sm_80, 227 KB sm_90); any spill in a 16-bit path; a kernel that multiplies
matrices without tensor-core instructions (HMMA on sm_80, HMMA or HGMMA on sm_90a).  fp32 paths
may spill (reported, not failed).

A case is something that produces rows: `CsrcCase` builds csrc/ with nvcc (`-Xptxas -v`) and reads
the library's own kernel table (vf_kernel_info: threads, dynamic shared memory) next to
`cuobjdump --dump-resource-usage` and `cuobjdump -sass`; `TritonCase` compiles one @triton.jit
function with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))` and reads the
cubin the same way (ptxas is rerun with -v on Triton's PTX for the spill counts).  The generic
pieces (parsers, SASS scan, occupancy model, checks) are plain functions for reuse.  Triton
kernels must be real JITFunctions: this script forces TRITON_INTERPRET=0 before importing triton.

Rows go to bench/results/kernel_audit.jsonl with the versions, commit and command; `device` says
"none (ahead-of-time)" because nothing here runs a kernel: these are compile-time facts, not speed.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels, not the CPU interpreter's stand-ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results", "kernel_audit.jsonl")

# ---------------------------------------------------------------------------------------------
# architecture limits (CUDA C Programming Guide, "Technical Specifications per Compute Capability")
# ---------------------------------------------------------------------------------------------
ARCHS = {
    80: dict(sass="sm_80", gpu="A100", regs_per_sm=65536, schedulers=4, reg_alloc_unit=256, max_regs=255,
             max_threads_sm=2048, max_warps_sm=64, max_blocks_sm=32, smem_sm=167936, smem_block=166912,
             smem_reserved=1024, smem_unit=128, tensor_core=("HMMA",)),
    90: dict(sass="sm_90a", gpu="H100", regs_per_sm=65536, schedulers=4, reg_alloc_unit=256, max_regs=255,
             max_threads_sm=2048, max_warps_sm=64, max_blocks_sm=32, smem_sm=233472, smem_block=232448,
             smem_reserved=1024, smem_unit=128, tensor_core=("HMMA", "HGMMA")),
}
_SASS_TO_CC = {"sm_80": 80, "sm_90": 90, "sm_90a": 90}
# opcodes always reported in instr_kinds (besides the most frequent ones)
KEY_OPS = ("HMMA", "HGMMA", "IMMA", "LDSM", "LDGSTS", "UTMALDG", "FFMA", "MUFU", "LDL", "STL", "BAR")


# ---------------------------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------------------------
def find_tool(name: str) -> Optional[str]:
    """cuobjdump / nvdisasm / ptxas: Triton's wheel first (what compiles its kernels), else PATH."""
    try:
        import triton.backends.nvidia as tn
        p = os.path.join(os.path.dirname(tn.__file__), "bin", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    except ImportError:
        pass
    return shutil.which(name)


def tool_version(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return None
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else None


def _run(cmd: List[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout


# ---------------------------------------------------------------------------------------------
# parsers (generic)
# ---------------------------------------------------------------------------------------------
Key = Tuple[str, int]  # (kernel symbol, compute capability 80 / 90)


def parse_ptxas_log(text: str) -> Dict[Key, dict]:
    """`ptxas -v` output -> {(kernel, cc): registers, spill_stores, spill_loads, stack_bytes, barriers}."""
    out: Dict[Key, dict] = {}
    cur: Optional[Key] = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = (m.group(1), _SASS_TO_CC.get(m.group(2), 0))
            out[cur] = {}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[cur].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            out[cur]["barriers"] = int(b.group(1)) if b else None
    return out


def parse_resource_usage(text: str) -> Dict[Key, dict]:
    """`cuobjdump --dump-resource-usage` -> {(kernel, cc): REG, STACK, SHARED, LOCAL} (ints)."""
    out: Dict[Key, dict] = {}
    cc = 0
    fn = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            cc = _SASS_TO_CC.get(m.group(1), 0)
            continue
        m = re.match(r"\s*Function ([^\s:]+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            out[(fn, cc)] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            fn = None
    return out


def parse_sass(text: str) -> Dict[Key, Counter]:
    """`cuobjdump -sass` (or nvdisasm) -> {(kernel, cc): Counter of opcode bases (HMMA, LDSM, ...)}."""
    out: Dict[Key, Counter] = {}
    cc = 0
    cur: Optional[Counter] = None
    for line in text.splitlines():
        m = re.match(r"\s*(?:arch = |code for |\.target\s+)(sm_\w+)", line)
        if m:
            cc = _SASS_TO_CC.get(m.group(1), cc)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = out.setdefault((m.group(1), cc), Counter())
            continue
        if cur is None:
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if m:
            toks = m.group(1).split()
            if toks and toks[0].startswith("@"):
                toks = toks[1:]
            if toks:
                cur[toks[0].split(".")[0]] += 1
    return out


# ---------------------------------------------------------------------------------------------
# occupancy bound and checks (generic)
# ---------------------------------------------------------------------------------------------
def occupancy(cc: int, registers: int, smem_bytes: int, threads: int) -> dict:
    """Resident blocks / warps per SM from registers, shared memory (static + dynamic, plus the
    1 KB the runtime reserves per block) and threads -- the occupancy calculator's model."""
    a = ARCHS[cc]
    warps = -(-threads // 32)
    lim = {"threads": a["max_threads_sm"] // (warps * 32), "blocks": a["max_blocks_sm"]}
    if registers > a["max_regs"]:
        lim["registers"] = 0
    elif registers > 0:
        per_warp = -(-registers * 32 // a["reg_alloc_unit"]) * a["reg_alloc_unit"]
        warps_sm = (a["regs_per_sm"] // a["schedulers"] // per_warp) * a["schedulers"]
        lim["registers"] = warps_sm // warps
    per_block = -(-(smem_bytes + a["smem_reserved"]) // a["smem_unit"]) * a["smem_unit"]
    lim["shared_memory"] = a["smem_sm"] // per_block if smem_bytes <= a["smem_block"] else 0
    blocks = min(lim.values())
    limiter = min(lim, key=lambda k: (lim[k], k != "registers"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": round(blocks * warps / a["max_warps_sm"], 3), "occupancy_limiter": limiter}


def findings(row: dict) -> List[str]:
    """The --check thresholds for one row (empty: clean)."""
    out = []
    if row.get("compile_error"):
        return [f"compile error: {row['compile_error']}"]
    if row["shared_bytes"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared_bytes']} B > {row['shared_limit']} B limit")
    if row.get("is_16bit") and row.get("spill_bytes", 0) > 0:
        out.append(f"{row['spill_bytes']} bytes of spills in a 16-bit path")
    if row.get("mma_kernel") and not row.get("has_tensor_core_instr"):
        ops = "/".join(ARCHS[_SASS_TO_CC[row["arch"]]]["tensor_core"])
        out.append(f"multiplies matrices but its SASS has no {ops}")
    return out


def make_row(kernel: str, source: str, cc: int, config: dict, threads: int, dynamic_smem: int,
             res: dict, ptx: Optional[dict], ops: Counter, mma_kernel: bool, is_16bit: bool) -> dict:
    """One audit row from the parsed pieces (res: resource usage; ptx: ptxas -v entry or None)."""
    a = ARCHS[cc]
    regs = (ptx or {}).get("registers", res.get("REG", 0))
    spills = (ptx or {}).get("spill_stores", 0) + (ptx or {}).get("spill_loads", 0)
    static = res.get("SHARED", 0)
    tc = sorted(op for op in a["tensor_core"] if ops.get(op))
    top = dict(ops.most_common(16))
    top.update({k: ops[k] for k in KEY_OPS if ops.get(k)})
    row = dict(kernel=kernel, source=source, arch=a["sass"], gpu=a["gpu"], config=config, threads=threads,
               registers=regs, spill_bytes=spills, spill_stores=(ptx or {}).get("spill_stores"),
               spill_loads=(ptx or {}).get("spill_loads"), stack_bytes=res.get("STACK"), local_bytes=res.get("LOCAL"),
               shared_static=static, shared_dynamic=dynamic_smem, shared_bytes=static + dynamic_smem,
               shared_limit=a["smem_block"], has_tensor_core_instr=bool(tc), tensor_core_instr=tc,
               instr_total=sum(ops.values()), instr_kinds=top, mma_kernel=mma_kernel, is_16bit=is_16bit)
    row.update(occupancy(cc, regs, static + dynamic_smem, threads))
    row["findings"] = findings(row)
    return row


# ---------------------------------------------------------------------------------------------
# csrc
# ---------------------------------------------------------------------------------------------
_DTYPE = {0: "fp32", 1: "fp16", 2: "bf16", -1: None}
# what each csrc kernel's tile suffix means (csrc/contrastive.cu, "Tile configurations")
CSRC_TILES = {
    "coarse_lse": "128x64 z tile, 4 warps (32x64 each), 3-stage cp.async, online (max, sum)",
    "coarse_lse_merge": "one thread per row: merge of the column splits",
    "coarse_grad": "64 rows x 64 cols of z (8 warps 2x4), dA 64x512 (8 warps of 64x64), P hi/lo",
    "fine_fwd_c64": "128 token rows (AT texts) x 64 slot cols (BB clips), 8 warps 4x2",
    "fine_fwd_c128": "128 token rows x 128 slot cols (S > 64), 8 warps 4x2",
    "fine_bwd_text_r64": "one text (<= 64 tokens) x 64 slot cols, d_text 64x512, d_sim hi/lo",
    "fine_bwd_text_r128": "one text (<= 128 tokens) x 128 slot cols, d_text 128x128",
    "fine_bwd_modal_c64": "64 slot rows x 128 token cols (<= 8 texts), d_modal 64x512",
    "fine_bwd_modal_c128": "128 slot rows x 128 token cols, d_modal 128x128",
}


def csrc_kernel_table(lib_path: str) -> List[dict]:
    """The library's own table: name, threads, dynamic shared memory, dtype, multiplies matrices."""
    lib = ctypes.CDLL(lib_path)  # static cudart: loads without a driver
    lib.vf_kernel_count.restype = ctypes.c_int
    lib.vf_kernel_info.restype = ctypes.c_int
    out = []
    for i in range(lib.vf_kernel_count()):
        name, th, sm, dt, mma = ctypes.c_char_p(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        rc = lib.vf_kernel_info(i, ctypes.byref(name), ctypes.byref(th), ctypes.byref(sm), ctypes.byref(dt),
                                ctypes.byref(mma))
        if rc != 0:
            raise RuntimeError(f"vf_kernel_info({i}) returned {rc}")
        out.append(dict(name=name.value.decode(), threads=th.value, smem=sm.value, dtype=_DTYPE[dt.value],
                        mma=bool(mma.value)))
    return out


def _csrc_config(name: str, dtype: Optional[str], threads: int) -> dict:
    base = name[len("vfk_"):]
    for dt in ("_f32", "_f16", "_bf16"):
        base = base.replace(dt, "")
    return dict(dtype=dtype, tile=CSRC_TILES.get(base, base), threads=threads)


def audit_csrc(lib_path: str, ptxas_log: str, archs: Iterable[int] = (80, 90)) -> List[dict]:
    """Rows for every csrc kernel in an nvcc-built library (with its `-Xptxas -v` log)."""
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (Triton's wheel or the CUDA toolkit)")
    res = parse_resource_usage(_run([cuobjdump, "--dump-resource-usage", lib_path]))
    sass = parse_sass(_run([cuobjdump, "-sass", lib_path]))
    ptx = parse_ptxas_log(ptxas_log)
    rows = []
    for k in csrc_kernel_table(lib_path):
        for cc in archs:
            key = (k["name"], cc)
            if key not in res or key not in sass:
                rows.append(dict(kernel=k["name"], source="csrc", arch=ARCHS[cc]["sass"],
                                 compile_error=f"no {ARCHS[cc]['sass']} code for {k['name']} in the library"))
                rows[-1]["findings"] = findings(rows[-1])
                continue
            rows.append(make_row(k["name"], "csrc", cc, _csrc_config(k["name"], k["dtype"], k["threads"]),
                                 k["threads"], k["smem"], res[key], ptx.get(key), sass[key], k["mma"],
                                 k["dtype"] in ("fp16", "bf16")))
    return rows


def build_csrc(out_dir: str, archs=(80, 90)) -> Tuple[str, str]:
    """nvcc build of csrc/ with the ptxas report; -> (library path, log text)."""
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    import build as csrc_build  # csrc/build.py
    log = os.path.join(out_dir, "ptxas.log")
    lib = csrc_build.build(out_dir, ",".join(ARCHS[c]["sass"] for c in archs), verbose=False, ptxas_log=log)
    with open(log) as f:
        return lib, f.read()


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
def audit_triton(fn, signature: Dict[str, str], constexprs: Dict[str, object], num_warps: int, num_stages: int,
                 arch: int, config: Optional[dict] = None, mma_kernel: Optional[bool] = None,
                 is_16bit: Optional[bool] = None, attrs: Optional[dict] = None) -> dict:
    """Compile one @triton.jit kernel for sm_80 / sm_90a (no GPU needed) and audit its cubin.

    signature: {arg: "*bf16" | "i32" | "fp32" | "constexpr" ...}; constexprs: {name or (index,): value};
    attrs: Triton's per-argument specialisation ({(index,): [["tt.divisibility", 16]]}), as a launch
    derives it (`triton_launch_spec`); without it no argument is assumed 16-divisible.
    mma_kernel defaults to "the TTIR has a tt.dot"; is_16bit to "a pointer argument is 16-bit"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise TypeError(f"{getattr(fn, '__name__', fn)!r} is not a JITFunction (TRITON_INTERPRET=1 replaces "
                        "kernels with interpreter stand-ins: run the audit with TRITON_INTERPRET=0)")
    names = list(signature)
    cfg = dict(config or {}, num_warps=num_warps, num_stages=num_stages,
               constexprs={(names[k[0]] if isinstance(k, tuple) else k): v for k, v in constexprs.items()})
    name = fn.__name__
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # noqa: BLE001  (any compiler failure is a finding, with its message)
        row = dict(kernel=name, source="triton", arch=ARCHS[arch]["sass"], config=cfg,
                   compile_error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}")
        row["findings"] = findings(row)
        return row
    name = k.metadata.name
    cuobjdump = find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, name + ".cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        ptx_path = os.path.join(tmp, name + ".ptx")
        with open(ptx_path, "w") as f:
            f.write(k.asm["ptx"])
        res = parse_resource_usage(_run([cuobjdump, "--dump-resource-usage", cubin]))
        sass = parse_sass(_run([cuobjdump, "-sass", cubin]))
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
        res_log = subprocess.run([ptxas, f"-arch={ARCHS[arch]['sass']}", "-v", ptx_path, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=600)
        ptx = parse_ptxas_log(res_log.stdout + res_log.stderr)
    key = (name, arch)
    if mma_kernel is None:
        mma_kernel = "tt.dot" in k.asm.get("ttir", "")
    if is_16bit is None:
        is_16bit = any(str(t).lstrip("*") in ("fp16", "bf16") for t in signature.values() if str(t).startswith("*"))
    return make_row(name, "triton", arch, cfg, num_warps * 32, int(k.metadata.shared),
                    res.get(key, {}), ptx.get(key), sass.get(key, Counter()), bool(mma_kernel), bool(is_16bit))


def triton_launch_spec(fn, args: tuple, kwargs: dict, arch: int = 90) -> Tuple[Dict[str, str], dict, dict]:
    """(signature, constexprs, attrs) of `fn[grid](*args, **kwargs)` exactly as a launch derives them
    (Triton's own argument binder): integer arguments equal to 1 become constexprs, pointers and
    integers divisible by 16 get the divisibility hint that lets the compiler vectorise.  Tensors
    may be small CPU stand-ins with the real dtypes (only their dtype and alignment are read);
    integer arguments must be the real values (strides, lengths).  kwargs: the constexprs, and
    num_warps / num_stages which are options, not arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, specialization, options)
    return signature, constexprs, attrs


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
@dataclass
class CsrcCase:
    """Every kernel of csrc/ (one nvcc build for both archs)."""
    name: str = "csrc"
    lib: Optional[str] = None        # a prebuilt library + its ptxas log: skip the build
    ptxas_log: Optional[str] = None

    def run(self, archs) -> List[dict]:
        if self.lib:
            with open(self.ptxas_log) as f:
                return audit_csrc(self.lib, f.read(), archs)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                lib, log = build_csrc(tmp, archs)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                log_path = os.path.join(tmp, "ptxas.log")
                tail = open(log_path).read()[-800:] if os.path.exists(log_path) else str(e)
                row = dict(kernel="csrc/*.cu", source="csrc", arch=",".join(ARCHS[c]["sass"] for c in archs),
                           compile_error=tail.strip())
                row["findings"] = findings(row)
                return [row]
            return audit_csrc(lib, log, archs)


@dataclass
class TritonCase:
    """One Triton kernel under one launch configuration (built lazily: imports happen in run)."""
    name: str
    make: Callable[[], Tuple[object, Dict[str, str], Dict[str, object]]]  # -> (fn, signature, constexprs)
    num_warps: int = 4
    num_stages: int = 2
    config: dict = field(default_factory=dict)

    def run(self, archs) -> List[dict]:
        fn, sig, cex = self.make()
        return [audit_triton(fn, sig, cex, self.num_warps, self.num_stages, cc, dict(self.config, case=self.name))
                for cc in archs]


@dataclass
class LaunchCase:
    """One kernel at one shape under the launch configurations its launcher chooses per
    architecture.  build(cc) -> [(fn, args, kwargs, config)]: the launcher's own arguments (see
    `triton_launch_spec`) with the constexprs and num_warps / num_stages of one configuration in
    kwargs; config (a dict) is recorded in the row.  Identical compilations (the same kernel,
    specialisation and options for one arch, e.g. two shapes whose arguments specialise alike)
    are audited once per process and their row reused under each case's name."""
    name: str
    build: Callable[[int], list]
    mma_kernel: Optional[bool] = None
    is_16bit: Optional[bool] = None

    def run(self, archs) -> List[dict]:
        rows = []
        for cc in archs:
            for fn, args, kwargs, config in self.build(cc):
                kw = dict(kwargs)
                nw, ns = kw.pop("num_warps", 4), kw.pop("num_stages", 2)
                sig, cex, attrs = triton_launch_spec(fn, args, kw, cc)
                key = (fn.__name__, cc, nw, ns, repr(sorted(sig.items())), repr(sorted(cex.items(), key=str)),
                       repr(sorted(attrs.items())), self.mma_kernel, self.is_16bit)
                if key not in _LAUNCH_MEMO:
                    _LAUNCH_MEMO[key] = audit_triton(fn, sig, cex, nw, ns, cc, {}, self.mma_kernel, self.is_16bit,
                                                     attrs)
                row = dict(_LAUNCH_MEMO[key])
                row["config"] = dict(row.get("config", {}), **config, case=self.name)
                rows.append(row)
        return rows


_LAUNCH_MEMO: Dict[tuple, dict] = {}


def plan_case(name: str, make_launch: Callable[[int], object], info: dict, configs: str = "all",
              is_16bit: Optional[bool] = None) -> LaunchCase:
    """A LaunchCase over a launcher's plan: make_launch(cc) -> a kernels._launch.Launch (the
    kernel, its arguments and the configurations the launcher would autotune over on cc).
    configs: "all" of them, "default" (the first: what runs untuned) or "rest" (all but the
    first, when a "default" case covers it).  info goes into each row's config with the
    configuration (`launch`), its rank in the set and the set's size."""
    if configs not in ("all", "default", "rest"):
        raise ValueError(f"plan_case: configs must be all | default | rest, got {configs!r}")

    def build(cc: int) -> list:
        launch = make_launch(cc)
        first = 1 if configs == "rest" else 0
        last = 1 if configs == "default" else len(launch.configs)
        return [(launch.kernel, launch.args, dict(launch.constexprs, **c.kwargs()),
                 dict(info, launch=str(c), rank=r, of=len(launch.configs), default=r == 0))
                for r, c in enumerate(launch.configs) if first <= r < last]
    return LaunchCase(name, build, is_16bit=is_16bit)


def _bias_gelu_fwd():
    from valor_fast.kernels import bias_gelu as bg
    sig = {"X": "*bf16", "B": "*bf16", "Y": "*bf16", "stride_x": "i32", "stride_y": "i32", "M": "i32", "N": "i32",
           "HAS_B": "constexpr", "ACT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    return bg._bias_gelu_fwd_kernel, sig, {"HAS_B": True, "ACT": 0, "BLOCK_M": 8, "BLOCK_N": 256}


# The Triton kernels' cases live beside this file, one module per kernel family
# (bench/audit_<family>.py, each with `cases() -> List[TritonCase]` built from the launch
# configurations its launcher chooses per architecture and shape); the csrc build is one case.
FAMILIES = ("attention", "fused", "contrastive")


def family_modules() -> list:
    """bench/audit_<family>.py for each family present."""
    import importlib
    mods = []
    for fam in FAMILIES:
        try:
            mods.append(importlib.import_module(f"bench.audit_{fam}"))
        except ModuleNotFoundError as e:
            if e.name != f"bench.audit_{fam}":
                raise
    return mods


def all_cases() -> list:
    cases = [CsrcCase()]
    for mod in family_modules():
        cases += mod.cases()
    return cases


def ci_case_names() -> list:
    """What CI audits: per family its CI_CASES, else the case names without a "/" (the first
    configuration of each autotuned set at its VALOR shape)."""
    names = []
    for mod in family_modules():
        chosen = getattr(mod, "CI_CASES", None)
        names += list(chosen) if chosen is not None else [c.name for c in mod.cases() if "/" not in c.name]
    return names


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def env_row() -> dict:
    from bench.common import env_info
    info = env_info()
    info["device"] = "none (ahead-of-time: nvcc / ptxas / cuobjdump; no kernel was run)"
    info["nvcc"] = tool_version(shutil.which("nvcc"))
    info["cuobjdump"] = tool_version(find_tool("cuobjdump"))
    return info


def table(rows: List[dict]) -> str:
    lines = [f"{'kernel':34s} {'arch':7s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} {'TC':>5s} "
             f"{'blk/SM':>6s} {'occ':>5s}  findings"]
    for r in rows:
        if r.get("compile_error"):
            lines.append(f"{r['kernel']:34s} {r['arch']:7s} COMPILE ERROR: {r['compile_error'][:80]}")
            continue
        tc = "+".join(r["tensor_core_instr"]) or ("-" if not r["mma_kernel"] else "NONE")
        lines.append(f"{r['kernel']:34s} {r['arch']:7s} {r['registers']:4d} {r['spill_bytes']:5d} "
                     f"{r['shared_bytes'] / 1024:7.1f} {tc:>5s} {r['blocks_per_sm']:6d} {r['occupancy']:5.2f}  "
                     + ("; ".join(r["findings"]) or "ok"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 on any finding (compile error, smem, spills, no TC)")
    p.add_argument("--only", default=None, help="comma list of case names or prefixes (an entry that is a case's "
                   "exact name selects that case alone): csrc, attn_fwd, attn_, bias_gelu_fwd/...")
    p.add_argument("--arch", default="80,90", help="compute capabilities (default 80,90 = sm_80, sm_90a)")
    p.add_argument("--csrc-lib", default=None, help="audit this prebuilt library (needs --ptxas-log) instead")
    p.add_argument("--ptxas-log", default=None, help="the ptxas -v log of --csrc-lib")
    p.add_argument("--out", default=RESULTS, help="results file (default %(default)s)")
    p.add_argument("--no-write", action="store_true", help="do not append rows")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of a table")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        p.error(f"--arch: unknown compute capability {bad}; known {sorted(ARCHS)}")
    if args.csrc_lib and not args.ptxas_log:
        p.error("--csrc-lib needs --ptxas-log (the library's ptxas -v output)")
    cases = all_cases()
    if args.csrc_lib:
        cases[0] = CsrcCase(lib=args.csrc_lib, ptxas_log=args.ptxas_log)
    if args.only:
        want = [w.strip() for w in args.only.split(",") if w.strip()]
        names = {c.name for c in cases}
        cases = [c for c in cases if any(c.name == w if w in names else c.name.startswith(w) for w in want)]
        if not cases:
            p.error(f"--only {args.only}: no case matches; cases: {', '.join(c.name for c in all_cases())}")
    env = env_row()
    rows = []
    for c in cases:
        for r in c.run(archs):
            r["case"] = c.name
            rows.append(r)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True, default=str))
    else:
        print(table(rows))
    if not args.no_write:
        from bench.common import append_result
        for r in rows:
            append_result(args.out, dict(r, **env))
    n_bad = sum(1 for r in rows if r["findings"])
    print(f"[kernel_audit] {len(rows)} rows, {n_bad} with findings" + ("" if args.no_write else f" -> {args.out}"),
          file=sys.stderr)
    return 1 if (args.check and n_bad) else 0


if __name__ == "__main__":
    sys.exit(main())
