"""kernels/add_layer_norm.py (residual add + LayerNorm) through the dispatcher with each backend
forced: forward and every gradient against float64 (bound: tests/_fused_check.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch/triton are imported

import pytest  # noqa: E402
import torch  # noqa: E402

import valor_fast.kernels.add_layer_norm as k_aln  # noqa: E402
from valor_fast.ops import fused  # noqa: E402
from _fused_check import BACKENDS, DTYPES, needs_interp, _compare  # noqa: E402

pytestmark = pytest.mark.usefixtures("kernel_device")   # VALOR_FAST_TEST_DEVICE=cuda: on the GPU


# add + LayerNorm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(7, 33), (13, 100), (13, 257)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm(backend, dtype, rows, width, with_residual):
    eps = 1e-5

    def make(d):
        x = torch.randn(rows, width, dtype=d)
        r = torch.randn(rows, width, dtype=d) if with_residual else None
        w = 1 + 0.5 * torch.randn(width, dtype=d)
        b = 0.5 * torch.randn(width, dtype=d)
        return [x, r, w, b]

    def under_test(x, r, w, b):
        with fused.use_backend(backend):
            out, s = fused.add_layer_norm(x, r, w, b, eps)
        if backend == "triton":
            assert "valor_fast_add_layer_norm_fwd" in out.grad_fn.name(), out.grad_fn.name()  # the custom op
        return out, s

    ref = lambda x, r, w, b: k_aln.add_layer_norm_ref(x, r, w, b, eps)
    names = ["x", "residual", "weight", "bias"] if with_residual else ["x", "weight", "bias"]
    # both outputs get an upstream gradient: post-LN BERT uses new_residual too
    _compare(under_test, ref, make, names, dtype)


@needs_interp
@pytest.mark.parametrize("width", [5000, 8192])
def test_add_layer_norm_wide_rows(width):
    """Wide rows (block up to 8192, masked tail) without weight/bias."""
    def make(d):
        return [3 + torch.randn(3, width, dtype=d), torch.randn(3, width, dtype=d), None, None]

    def under_test(x, r, w, b):
        with fused.use_backend("triton"):
            return fused.add_layer_norm(x, r, w, b, 1e-6)

    _compare(under_test, lambda x, r, w, b: k_aln.add_layer_norm_ref(x, r, w, b, 1e-6), make,
             ["x", "residual"], torch.float32)


@needs_interp
def test_add_layer_norm_fp32_residual_bf16_x():
    """Residual stream kept in fp32 with bf16 activations: new_residual and dresidual are fp32."""
    x = torch.randn(13, 100, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(13, 100, dtype=torch.float32, requires_grad=True)
    w = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    with fused.use_backend("triton"):
        out, s = fused.add_layer_norm(x, r, w, b, 1e-5)
    assert out.dtype == torch.bfloat16 and s.dtype == torch.float32
    (out.float().square().sum() + s.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32
    ref_out, ref_s = k_aln.add_layer_norm_ref(x.detach().double(), r.detach().double(),
                                              w.detach().double(), b.detach().double(), 1e-5)
    assert torch.allclose(s.double(), ref_s, atol=1e-2)
    assert torch.allclose(out.double(), ref_out, atol=0.1)
    assert torch.allclose(x.grad.float(), r.grad, atol=0.1, rtol=0.02)


@needs_interp
def test_add_layer_norm_errors():
    x = torch.randn(4, 16)
    with fused.use_backend("triton"):
        with pytest.raises(ValueError, match="bias"):
            fused.add_layer_norm(x, None, torch.ones(16), torch.zeros(15))
        with pytest.raises(ValueError, match="residual shape"):
            fused.add_layer_norm(x, torch.randn(4, 8), None, None)
        with pytest.raises(ValueError, match="8192"):
            fused.add_layer_norm(torch.randn(1, 8193), None, None, None)
    # auto on CPU: torch, which has no width limit
    out, _ = fused.add_layer_norm(torch.randn(1, 8193), None, None, None)
    assert out.shape == (1, 8193)
