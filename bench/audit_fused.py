"""Kernel-audit cases of the fused ops (kernels/add_layer_norm.py, bias_gelu.py, lm_head_ce.py):
the launch configurations their launchers choose on CUDA for VALOR's shapes."""
from typing import List

from bench.kernel_audit import TritonCase


def _bias_gelu_fwd():
    from valor_fast.kernels import bias_gelu as bg
    sig = {"X": "*bf16", "B": "*bf16", "Y": "*bf16", "stride_x": "i32", "stride_y": "i32", "M": "i32", "N": "i32",
           "HAS_B": "constexpr", "ACT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    return bg._bias_gelu_fwd_kernel, sig, {"HAS_B": True, "ACT": 0, "BLOCK_M": 8, "BLOCK_N": 256}


def cases() -> List[TritonCase]:
    return [TritonCase("bias_gelu_fwd_bf16_3072", _bias_gelu_fwd, num_warps=4, num_stages=2,
                       config=dict(dtype="bf16", shape="(rows, 3072)", BLOCK_M=8, BLOCK_N=256))]
