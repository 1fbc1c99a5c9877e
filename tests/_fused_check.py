"""Shared checks of the fused-op tests (tests/kernels/test_<op>.py, tests/ops/test_fused.py): run
an op and its reference, compare forward and every gradient against float64 with the bound
2x what eager PyTorch in the same dtype gets, plus a floor of a few ulps of the output's scale."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch/triton are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from valor_fast.utils.deps import HAS_TRITON  # noqa: E402

needs_interp = pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU needs triton installed and TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interp)]
DTYPES = [torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


def _run(fn, inputs, upstream):
    """outputs of fn(*inputs) (a tuple), and d(sum_k <out_k, upstream_k>)/d(each input that
    requires grad)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.to(torch.float64) * u.to(torch.float64)).sum() for o, u in zip(outs, upstream))
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, torch.autograd.grad(loss, wrt)


def _err(a, ref):
    return (a.detach().to(torch.float64) - ref.detach()).abs().max().item() if ref.numel() else 0.0


def _check_all(names, got, eager, ref, dtype):
    """Each tensor of `got` within 2x eager's error against float64 (+ a floor)."""
    for name, g, e, r in zip(names, got, eager, ref):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        floor = 2 * torch.finfo(dtype).eps * scale
        bound = 2 * _err(e, r) + floor
        err = _err(g, r)
        assert err <= bound, f"{name} ({dtype}): max err {err:.3g} > bound {bound:.3g} (eager {_err(e, r):.3g})"


def _compare(fn_under_test, ref_fn, make_inputs, names, dtype):
    """make_inputs(dtype) -> inputs.  Float inputs are drawn once, rounded to `dtype`, and every
    path (float64 reference, eager in dtype, the op under test) starts from those same values, so
    the error measured is the computation's, not the input rounding's."""
    master = [t.to(dtype).to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in make_inputs(torch.float64)]
    cast = lambda d: [(_leaf(t, d) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                      for t in master]
    ref_in = cast(torch.float64)
    # upstream gradients: representable in `dtype`, so every path sees the same numbers
    probe = ref_fn(*ref_in)
    probe = probe if isinstance(probe, tuple) else (probe,)
    upstream = [torch.randn(p.shape, dtype=torch.float64).to(dtype).to(torch.float64) for p in probe]
    ref_out, ref_g = _run(ref_fn, ref_in, upstream)
    eager_out, eager_g = _run(ref_fn, cast(dtype), upstream)
    got_out, got_g = _run(fn_under_test, cast(dtype), upstream)
    out_names = [f"out{i}" for i in range(len(ref_out))]
    _check_all(out_names, got_out, eager_out, ref_out, dtype)
    _check_all(["d" + n for n in names], got_g, eager_g, ref_g, dtype)
    return got_out
