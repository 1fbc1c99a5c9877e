"""kernels/bias_gelu.py (bias + GELU, erf / tanh / quick) through the dispatcher with each backend
forced: forward and every gradient against float64 (bound: tests/_fused_check.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch/triton are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from valor_fast.utils.deps import HAS_TRITON  # noqa: E402

import valor_fast.kernels.bias_gelu as k_gelu  # noqa: E402
from valor_fast.ops import fused  # noqa: E402
from _fused_check import BACKENDS, DTYPES, needs_interp, _compare  # noqa: E402

pytestmark = pytest.mark.usefixtures("kernel_device")   # VALOR_FAST_TEST_DEVICE=cuda: on the GPU


# bias + GELU
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(7, 33), (13, 100), (13, 257)])
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
def test_bias_gelu(backend, dtype, rows, width, approximate):
    def make(d):
        return [2 * torch.randn(2, rows, width, dtype=d), torch.randn(width, dtype=d)]

    def under_test(x, b):
        with fused.use_backend(backend):
            y = fused.bias_gelu(x, b, approximate)
        if backend == "triton":
            assert "valor_fast_bias_gelu_fwd" in y.grad_fn.name(), y.grad_fn.name()  # the custom op
        return y

    _compare(under_test, lambda x, b: k_gelu.bias_gelu_ref(x, b, approximate), make,
             ["x", "bias"], dtype)


@needs_interp
def test_quick_gelu_no_bias():
    def make(d):
        return [2 * torch.randn(13, 100, dtype=d)]

    def under_test(x):
        with fused.use_backend("triton"):
            return fused.quick_gelu(x)

    _compare(under_test, lambda x: k_gelu.bias_gelu_ref(x, None, "quick"), make, ["x"], torch.float32)


@needs_interp
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
def test_bias_gelu_extremes(approximate):
    """Saturated tails: finite outputs and gradients, matching float64."""
    x = torch.tensor([[-300.0, -90.0, -60.0, -12.0, -1e-3, 0.0, 1e-3, 12.0, 60.0, 90.0, 300.0]],
                     requires_grad=True)
    with fused.use_backend("triton"):
        y = fused.bias_gelu(x, None, approximate)
    y.backward(torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    y64 = k_gelu.bias_gelu_ref(x64, None, approximate)
    y64.backward(torch.ones_like(y64))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_bias_gelu_errors():
    with pytest.raises(ValueError, match="approximate"):
        fused.bias_gelu(torch.randn(2, 4), None, "sigmoid")
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        with fused.use_backend("triton"), pytest.raises(ValueError, match="bias"):
            fused.bias_gelu(torch.randn(2, 4), torch.randn(5))
