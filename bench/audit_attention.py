"""Kernel-audit cases of the attention kernels (kernels/flash_attention.py): every kernel (forward,
backward preprocess, dK/dV, dQ) under every launch configuration its launcher chooses for VALOR's
shapes, per architecture -- the launcher's own plans (`_fwd_plan`, `_bwd_plans`) built from
tensors with the model's layouts, so the audit compiles exactly what a launch would, Triton's
argument specialisation included (strides equal to 1 become constants, 16-divisible ones get the
hint that lets loads vectorise).  Tensors live on the meta device: nothing is allocated.

Shapes (issue 17): BERT text 40 tokens (key padding), AST 129, ViT-B/16 197, ViT-L/14 257 (head
dim 64); decoder self-attention over 40 text tokens, causal with key padding; decoder
cross-attention of 40 queries over 4 x 197 + 129 = 917 memory tokens (key padding); Swin windows
of 4 x 7 x 7 = 196 tokens, head dim 32, with the relative position bias as the model passes it:
(H, N, N) gathered from the table (a permuted view, copied contiguous by the launcher) in regular
windows, (nW, H, N, N) with the shift mask in shifted ones; the bias is fp32 (the table stays fp32
under autocast) and gets a gradient (atomics for shared window slices, plain stores per item).

Case names: `attn_<kernel>[_<variant>]` is a kernel's default launch (the first configuration
of its set, bf16, at its VALOR shape) -- what CI compiles; `attn_<kernel>/<dtype>/<shape>` is the
sweep: every configuration of every set, bf16 / fp16 and fp32 (fp32 with TF32 products, the
tensor-core fp32 path; spills there are reported, not gated).
"""
from typing import List, Optional

import torch

from bench.kernel_audit import LaunchCase, plan_case

H_BASE, H_LARGE, H_SWIN, NW = 12, 16, 4, 16
# name: (H, Lq, Lk, head_dim, causal, key padding, bias layout)
SHAPES = {
    "text": (H_BASE, 40, 40, 64, False, True, None),
    "ast": (H_BASE, 129, 129, 64, False, False, None),
    "vit_b16": (H_BASE, 197, 197, 64, False, False, None),
    "vit_l14": (H_LARGE, 257, 257, 64, False, False, None),
    "dec_self": (H_BASE, 40, 40, 64, True, True, None),
    "dec_cross": (H_BASE, 40, 4 * 197 + 129, 64, False, True, None),
    "swin": (H_SWIN, 196, 196, 32, False, False, "table"),
    "swin_shift": (H_SWIN, 196, 196, 32, False, False, "windows"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
# the default cases: (case name, kernel, shape) -- bf16, first configuration
DEFAULTS = (("attn_fwd", "fwd", "vit_b16"), ("attn_fwd_causal", "fwd", "dec_self"),
            ("attn_fwd_bias", "fwd", "swin_shift"), ("attn_bwd_preprocess", "bwd_preprocess", "vit_b16"),
            ("attn_bwd_dkdv", "bwd_dkdv", "vit_b16"), ("attn_bwd_dkdv_bias", "bwd_dkdv", "swin_shift"),
            ("attn_bwd_dq", "bwd_dq", "vit_b16"), ("attn_bwd_dq_bias", "bwd_dq", "swin_shift"))


def _heads(B: int, H: int, L: int, D: int, dtype) -> torch.Tensor:
    """(B, H, L, D) as the model's attention makes it: a (B, L, H * D) projection split into heads."""
    return torch.empty(B, L, H * D, dtype=dtype, device="meta").view(B, L, H, D).transpose(1, 2)


def _inputs(shape: str, dtype, B: int):
    H, Lq, Lk, D, causal, kpm, layout = SHAPES[shape]
    q, k, v = _heads(B, H, Lq, D, dtype), _heads(B, H, Lk, D, dtype), _heads(B, H, Lk, D, dtype)
    mask = torch.ones(B, Lk, dtype=torch.bool, device="meta") if kpm else None
    bias = None
    if layout == "table":  # relative_position_bias_table[idx].view(N, N, H).permute(2, 0, 1)
        bias = torch.empty(Lq, Lk, H, dtype=torch.float32, device="meta").permute(2, 0, 1)
    elif layout == "windows":  # bias[None] + mask[:, None]: a fresh (nW, H, N, N) tensor
        bias = torch.empty(NW, H, Lq, Lk, dtype=torch.float32, device="meta")
    return q, k, v, mask, causal, bias


def _precision(dtype) -> str:
    return "tf32" if dtype == torch.float32 else "native"


def plans(kernel: str, shape: str, dtype, cc: int, B: Optional[int] = None):
    """The launcher's plan for one kernel at a VALOR shape on architecture cc."""
    import valor_fast.kernels.flash_attention as fa
    B = B or (2 * NW if SHAPES[shape][6] == "windows" else 2)
    q, k, v, mask, causal, bias = _inputs(shape, dtype, B)
    D = q.shape[-1]
    scale = D ** -0.5
    out = torch.empty(q.shape, dtype=dtype, device="meta")
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device="meta")
    if kernel == "fwd":
        return fa._fwd_plan(q, k, v, mask, causal, scale, bias, out, lse, cc, _precision(dtype))
    grads = (torch.empty(q.shape, dtype=dtype, device="meta"), torch.empty(k.shape, dtype=dtype, device="meta"),
             torch.empty(v.shape, dtype=dtype, device="meta"))
    nb = 1 if bias is None or bias.dim() == 3 else bias.shape[0]
    dbias = fa._dbias_buffer(bias, bias is not None, B, nb, False, q)
    pre, dkdv, dq = fa._bwd_plans(out, q, k, v, out, lse, mask, causal, scale, bias, grads, lse, dbias, cc,
                                  _precision(dtype))
    return {"bwd_preprocess": pre, "bwd_dkdv": dkdv, "bwd_dq": dq}[kernel]


def cases() -> List[LaunchCase]:
    def case(name, kernel, shape, dt, which):
        return plan_case(name, lambda cc: plans(kernel, shape, DTYPES[dt], cc),
                         dict(dtype=dt, shape=shape, attn_kernel=kernel), which, is_16bit=dt != "fp32")
    out = [case(name, kernel, shape, "bf16", "default") for name, kernel, shape in DEFAULTS]
    defaults = {(kernel, shape) for _, kernel, shape in DEFAULTS}
    for kernel in KERNELS:
        for dt in DTYPES:
            for shape in SHAPES:
                which = "rest" if dt == "bf16" and (kernel, shape) in defaults else "all"
                out.append(case(f"attn_{kernel}/{dt}/{shape}", kernel, shape, dt, which))
    return out
