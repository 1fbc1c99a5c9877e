"""Kernel-audit cases of the fused ops (kernels/add_layer_norm.py, bias_gelu.py, lm_head_ce.py):
every kernel under every launch configuration its launcher chooses (the launchers' own plans,
`_fwd_plan` / `_bwd_plan` / `_fwd_chunk_plan` / `_bwd_chunk_plan`) for VALOR's shapes, per
architecture.  Tensors live on the meta device with the dtypes a bf16-autocast step gives the
kernels: 16-bit activations with the fp32 parameters of LayerNorm and the FFN bias.

Shapes: add + LayerNorm at 768 (BERT, AST, ViT-B, the decoder) and 1024 (ViT-L/14), with the
residual (the post-LN blocks) and without (the embedding and LM-head transform LayerNorms);
bias + GELU at 3072 and 4096, exact erf GELU (BERT / AST), tanh, and quick GELU (CLIP); the
LM head + cross-entropy chunk kernels over 30522 = 7 x 4096 + 1850 vocabulary columns (both
chunk widths), with and without label smoothing.  Rows: 8192 (the grid only, and the backward's
rows per program).

Case names: `add_ln_fwd`, `add_ln_bwd`, `bias_gelu_fwd`, `bias_gelu_bwd`, `ce_fwd`, `ce_bwd` are
each kernel's default launch (bf16, first configuration) -- what CI compiles;
`<kernel>/<dtype>/<width>/<variant>` is the sweep over every configuration, bf16 / fp16 / fp32.
"""
from typing import List

import torch

from bench.kernel_audit import LaunchCase, plan_case

ROWS = 8192
PROGRAMS = 132 * 4  # the backward's row groups on an H100 (4 per SM)
VOCAB, CHUNK = 30522, 4096
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ACTS = {"erf": 0, "tanh": 1, "quick": 2}


def _t(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _param_dtype(dt):
    return torch.float32 if dt in (torch.bfloat16, torch.float16) else dt  # autocast keeps params fp32


def add_ln_plan(kernel: str, n: int, dt, has_res: bool, cc: int):
    import valor_fast.kernels.add_layer_norm as k
    x = _t(ROWS, n, dtype=dt)
    w, b = _t(n, dtype=_param_dtype(dt)), _t(n, dtype=_param_dtype(dt))
    stats = _t(ROWS, dtype=torch.float32)
    if kernel == "fwd":
        r, s = (_t(ROWS, n, dtype=dt), _t(ROWS, n, dtype=dt)) if has_res else (x, x)
        return k._fwd_plan(x, r, w, b, _t(ROWS, n, dtype=dt), s, stats, stats, 1e-12, has_res, cc)
    part = _t(PROGRAMS, n, dtype=torch.float32)
    return k._bwd_plan(x, w, x, x, _t(ROWS, n, dtype=dt), stats, stats, part, part, PROGRAMS, True, has_res, cc)


def bias_gelu_plan(kernel: str, n: int, dt, act: int, cc: int):
    import valor_fast.kernels.bias_gelu as k
    x, bias = _t(ROWS, n, dtype=dt), _t(n, dtype=_param_dtype(dt))
    if kernel == "fwd":
        return k._fwd_plan(x, bias, _t(ROWS, n, dtype=dt), act, cc)
    p, rows = 132, k._ROW_QUANTUM * 2  # 8192 rows x 12 column blocks: 132 groups of 64 rows
    return k._bwd_plan(x, bias, x, _t(ROWS, n, dtype=dt), _t(p, n, dtype=torch.float32), p, rows, act, cc)


def ce_plan(kernel: str, n_cols: int, dt, smooth: bool, cc: int):
    import valor_fast.kernels.lm_head_ce as k
    z = _t(ROWS, n_cols, dtype=dt)
    labels = _t(ROWS, dtype=torch.int64)
    row = _t(ROWS, dtype=torch.float32)
    v0 = VOCAB - n_cols if n_cols != CHUNK else 0
    if kernel == "fwd":
        return k._fwd_chunk_plan(z, labels, (row, row, row, row), v0, smooth, cc)
    return k._bwd_chunk_plan(z, labels, row, row, v0, 0.9 if smooth else 1.0, 0.1 / VOCAB if smooth else 0.0, cc)


# (op, kernel) -> (plan function, widths, variants {name: plan argument}, default (width, variant))
OPS = {
    "add_ln": (add_ln_plan, (768, 1024), {"res": True, "nores": False}, (768, "res")),
    "bias_gelu": (bias_gelu_plan, (3072, 4096), ACTS, (3072, "erf")),
    "ce": (ce_plan, (CHUNK, VOCAB - 7 * CHUNK), {"plain": False, "smooth": True}, (CHUNK, "plain")),
}


def cases() -> List[LaunchCase]:
    out, rest = [], []
    for op, (plan, widths, variants, (w0, v0)) in OPS.items():
        for kernel in ("fwd", "bwd"):
            def case(name, width, variant, dt, which, plan=plan, kernel=kernel, variants=variants, op=op):
                arg = variants[variant]
                return plan_case(name, lambda cc: plan(kernel, width, DTYPES[dt], arg, cc),
                                 dict(op=op, dtype=dt, width=width, variant=variant), which, is_16bit=dt != "fp32")
            out.append(case(f"{op}_{kernel}", w0, v0, "bf16", "default"))
            for dt in DTYPES:
                for width in widths:
                    for variant in variants:
                        which = "rest" if (dt, width, variant) == ("bf16", w0, v0) else "all"
                        rest.append(case(f"{op}_{kernel}/{dt}/{width}/{variant}", width, variant, dt, which))
    return out + rest
