"""Kernel-audit cases of the contrastive kernels (kernels/contrastive.py): every kernel under the
launch configurations its launcher chooses per architecture for VALOR's shapes -- the launchers'
own plans (`coarse_lse_plans`, `coarse_grad_plan`, `fine_fwd_plan`, `fine_bwd_plans`) built on
meta tensors (nothing is allocated), so the audit compiles exactly the arguments a launch passes,
with Triton's argument specialisation (16-divisible integers and pointers get the hint).

Shapes (issue 17): coarse B = 4096 and 65536 (D = 512), square, with sample masks and the
temperature gradient (the MGA call); fine B = 512 and 4096, T = 40 text tokens, 4 frames + 1
audio slot (the fused T-V / T-A / T-AV groups), D = 512, with upstream's text_floor (the
valor_b / valor_l default).

Case names: `contra_<kernel>_b<B>` is a kernel's default launch (the first configuration of its
set, bf16) -- what CI compiles (B changes only integer arguments, so the two batch sizes share
one compilation per arch); `contra_<kernel>/<dtype>/b<B>` is the sweep: every configuration of
every set, bf16 / fp16 and fp32 (fp32 with TF32 products; spills there are reported, not gated).
"""
from typing import Callable, Dict, List, Optional

import torch

from bench import kernel_audit as ka

D, T, MX, MY = 512, 40, 4, 1
COARSE_B = (4096, 65536)
FINE_B = (512, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("coarse_lse", "coarse_lse_merge", "coarse_grad", "fine_fwd", "fine_bwd_text", "fine_bwd_modal")


def _arch(cc: int):
    from valor_fast.kernels import contrastive as kc
    return {80: kc.A100, 90: kc.H100}[cc]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def plan(kernel: str, dtype, B: int, cc: int):
    """The launcher's plan for one kernel at its VALOR shape on architecture cc."""
    from valor_fast.kernels import contrastive as kc
    arch = _arch(cc)
    if kernel.startswith("coarse"):
        a, b = _meta(B, D, dtype=dtype), _meta(B, D, dtype=dtype)
        temp, valid = _meta(1), _meta(B, dtype=torch.bool)
        if kernel == "coarse_grad":
            return kc.coarse_grad_plan(a, b, temp, _meta(1), _meta(B), _meta(B), 0, 2.0, True, valid, valid, arch)[0]
        split, merge = kc.coarse_lse_plans(a, b, temp, 0, valid, arch)[0]
        return merge if kernel == "coarse_lse_merge" else split
    args = kc.prepare_fine_args(_meta(B, T, D, dtype=dtype), _meta(B, T), _meta(B, T, dtype=torch.bool),
                                _meta(B, MX, D, dtype=dtype), _meta(B, MY, D, dtype=dtype), _meta(3, B, MX + MY),
                                _meta(B, MX + MY, dtype=torch.bool), _meta(B, dtype=torch.bool))
    if kernel == "fine_fwd":
        return kc.fine_fwd_plan(*args, arch)[0]
    text_plan, modal_plan = kc.fine_bwd_plans(_meta(3, B, B), *args, arch)[0]
    return text_plan if kernel == "fine_bwd_text" else modal_plan


def _grid_programs(p, meta: dict) -> int:
    g = p.grid(meta)
    n = 1
    for v in g:
        n *= int(v)
    return n


def _launches(kernel: str, dt: str, B: int, which: str) -> Callable[[int], list]:
    """build(cc) -> [(fn, args, kwargs, config)] for `which` of the plan's configurations."""
    def build(cc: int) -> list:
        p = plan(kernel, DTYPES[dt], B, cc)
        n = len(p.configs)
        ranks = {"default": range(0, 1), "rest": range(1, n), "all": range(0, n)}[which]
        out = []
        for r in ranks:
            c = p.configs[r]
            info = dict(dtype=dt, B=B, contrastive_kernel=kernel, launch={k: v for k, v in c.items()}, rank=r, of=n,
                        default=r == 0, programs=_grid_programs(p, c))
            if kernel.startswith("fine"):
                info.update(T=T, slots=f"{MX}+{MY}", D=D)
                if kernel == "fine_fwd" or "R" in c:
                    info["mma_padding_share"] = round(_waste(c), 4)
            else:
                info["D"] = D
            out.append((p.kernel, p.args, dict(p.constexprs, **c), info))
        return out
    return build


def _waste(c: dict) -> float:
    from valor_fast.kernels import contrastive as kc
    return kc.fine_waste(T, MX, MY, **{k: c[k] for k in ("R", "BB", "PX", "PY")})


class _Case:
    """Fallback for a kernel_audit without LaunchCase: the same builds, specialised by Triton's
    own argument binder, audited with the divisibility hints when audit_triton takes them."""

    def __init__(self, name: str, build: Callable[[int], list], is_16bit: bool):
        self.name, self.build, self.is_16bit = name, build, is_16bit

    def run(self, archs) -> List[dict]:
        import inspect
        rows = []
        takes_attrs = "attrs" in inspect.signature(ka.audit_triton).parameters
        for cc in archs:
            for fn, args, kwargs, config in self.build(cc):
                kw = dict(kwargs)
                nw, ns = kw.pop("num_warps"), kw.pop("num_stages")
                sig, cex, attrs = _launch_spec(fn, args, kw, cc)
                # by name: the row's config is written as JSON (ASTSource takes either)
                cex = {(fn.arg_names[k[0]] if isinstance(k, tuple) else k): v for k, v in cex.items()}
                key = (fn.__name__, cc, nw, ns, repr(sorted(sig.items())), repr(sorted(cex.items())),
                       repr(sorted(attrs.items())), self.is_16bit)
                if key not in _MEMO:  # the batch sizes differ only in integers: one compilation
                    if takes_attrs:
                        _MEMO[key] = ka.audit_triton(fn, sig, cex, nw, ns, cc, {}, None, self.is_16bit, attrs=attrs)
                    else:
                        _MEMO[key] = _with_attrs(attrs, ka.audit_triton, fn, sig, cex, nw, ns, cc, {}, None,
                                                 self.is_16bit)
                row = dict(_MEMO[key])
                row["config"] = dict(row.get("config", {}), **config, case=self.name)
                rows.append(row)
        return rows


_MEMO: Dict[tuple, dict] = {}


def _with_attrs(attrs: dict, audit, *args):
    """audit(*args) with `attrs` given to the ASTSource it builds (an audit_triton without an
    attrs argument would compile unhinted: scalar masked loads, 255 registers and spills in
    `_coarse_lse_kernel` where the launch gets 144 and none)."""
    import triton.compiler as tcomp
    orig = tcomp.ASTSource
    tcomp.ASTSource = lambda fn, sig, cex=None, _attrs=None: orig(fn, sig, cex, attrs)
    try:
        return audit(*args)
    finally:
        tcomp.ASTSource = orig


def _launch_spec(fn, args: tuple, kwargs: dict, cc: int):
    spec = getattr(ka, "triton_launch_spec", None)
    if spec is not None:
        return spec(fn, args, kwargs, cc)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, specialization, options)
    return signature, constexprs, attrs


def _case(name: str, kernel: str, dt: str, B: int, which: str):
    build = _launches(kernel, dt, B, which)
    launch_case = getattr(ka, "LaunchCase", None)
    if launch_case is not None:
        return launch_case(name, build, is_16bit=dt != "fp32")
    return _Case(name, build, dt != "fp32")


def default_cases() -> list:
    """bf16, each kernel's first configuration at each of its VALOR batch sizes (CI)."""
    out = []
    for kernel in KERNELS:
        for B in (COARSE_B if kernel.startswith("coarse") else FINE_B):
            out.append(_case(f"contra_{kernel}_b{B}", kernel, "bf16", B, "default"))
    return out


def cases() -> list:
    out = default_cases()
    for kernel in KERNELS:
        for dt in DTYPES:
            for B in (COARSE_B if kernel.startswith("coarse") else FINE_B)[:1]:
                out.append(_case(f"contra_{kernel}/{dt}/b{B}", kernel, dt, B, "rest" if dt == "bf16" else "all"))
    return out


def summary(rows: List[dict]) -> Dict[str, dict]:
    """{case: the row fields of the README table} for printing."""
    return {r["config"]["case"] + "@" + r["arch"]: {k: r.get(k) for k in
            ("registers", "spill_bytes", "shared_bytes", "tensor_core_instr", "blocks_per_sm", "occupancy",
             "occupancy_limiter", "findings")} for r in rows if "config" in r}


def readme_table(rows: List[dict], wanted: Optional[List[str]] = None) -> str:
    lines = ["| kernel | arch | config | regs | spill B | smem KB | tensor cores | blocks/SM (limiter) |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if r.get("compile_error"):
            lines.append(f"| {r['kernel']} | {r['arch']} | | COMPILE ERROR | | | | |")
            continue
        c = r["config"]
        if wanted and c.get("case") not in wanted:
            continue
        launch = c.get("launch", {})
        cfg = " ".join(f"{k}={v}" for k, v in launch.items() if k not in ("num_stages",)) + f" st={launch.get('num_stages')}"
        tc = "+".join(r["tensor_core_instr"]) or ("-" if not r["mma_kernel"] else "NONE")
        lines.append(f"| {c.get('case')} | {r['arch']} | {cfg} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared_bytes'] / 1024:.1f} | {tc} | {r['blocks_per_sm']} ({r['occupancy_limiter']}) |")
    return "\n".join(lines)
