"""valor_fast.ops.fused: backend choice, the custom ops under opcheck and torch.compile, and the
launch configurations the launchers choose per architecture (each CUDA configuration's tiles run
here under the interpreter against float64; bench/audit_fused.py compiles them)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch/triton are imported

import pytest  # noqa: E402
import torch  # noqa: E402

import valor_fast.kernels.add_layer_norm as k_aln  # noqa: E402
import valor_fast.kernels.bias_gelu as k_gelu  # noqa: E402
import valor_fast.kernels.lm_head_ce as k_lm  # noqa: E402
from valor_fast.ops import fused  # noqa: E402
from valor_fast.utils.log import _ONCE  # noqa: E402
from _fused_check import needs_interp, _compare  # noqa: E402

pytestmark = pytest.mark.usefixtures("kernel_device")   # VALOR_FAST_TEST_DEVICE=cuda: on the GPU


# dispatch
# ----------------------------------------------------------------------------------------------
def test_dispatch_choice(monkeypatch):
    monkeypatch.delenv("VALOR_FAST_FUSED", raising=False)
    assert fused.get_forced_backend() is None
    x = torch.randn(3, 8, requires_grad=True)
    y = fused.bias_gelu(x, None)  # auto on CPU: the eager reference
    assert "valor_fast_bias_gelu_fwd" not in y.grad_fn.name()
    assert any(k.startswith("fused:bias_gelu:torch:auto") for k in _ONCE)  # logged once
    monkeypatch.setenv("VALOR_FAST_FUSED", "torch")
    assert fused.get_forced_backend() == "torch"
    with fused.use_backend("triton"):
        assert fused.get_forced_backend() == "triton"  # code beats the env var
        with fused.use_backend(None):
            assert fused.get_forced_backend() == "torch"
    assert fused.get_forced_backend() == "torch"
    monkeypatch.setenv("VALOR_FAST_FUSED", "cuda")
    with pytest.raises(ValueError, match="VALOR_FAST_FUSED"):
        fused.bias_gelu(x, None)
    with pytest.raises(ValueError, match="use_backend"):
        with fused.use_backend("cudnn"):
            pass
    monkeypatch.setenv("VALOR_FAST_FUSED", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # only the dispatcher's check reads it here
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused.bias_gelu(x, None)


# ----------------------------------------------------------------------------------------------
# custom ops: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
def _opcheck_cases():
    x = torch.randn(5, 33, requires_grad=True)
    r = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    h = torch.randn(6, 8, requires_grad=True)
    wv = torch.randn(40, 8, requires_grad=True)
    bv = torch.randn(40, requires_grad=True)
    lab = torch.tensor([0, 39, -100, 5, 17, 22])
    return [
        ("add_layer_norm_fwd", torch.ops.valor_fast.add_layer_norm_fwd, (x, r, w, b, 1e-5)),
        ("add_layer_norm_fwd/no-res", torch.ops.valor_fast.add_layer_norm_fwd, (x, None, w, None, 1e-5)),
        ("bias_gelu_fwd", torch.ops.valor_fast.bias_gelu_fwd, (x, b, "none")),
        ("lm_head_ce_fwd", torch.ops.valor_fast.lm_head_ce_fwd, (h, wv, bv, lab, 0.1, -100, 16, True)),
    ]


@needs_interp
@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    name, op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@needs_interp
def test_torch_compile_fullgraph():
    """All three ops in one fullgraph-compiled function (aot_eager: traces the fake impls and the
    registered autograd, no C++ codegen), forward and backward, against eager Triton."""
    def f(x, r, w, b, w1, b1, wv, bv, labels):
        out, s = fused.add_layer_norm(x, r, w, b, 1e-5)
        hmid = fused.bias_gelu(out @ w1, b1)  # (M, 4C)
        hmid = hmid[:, :8] + fused.quick_gelu(s[:, :8])
        return fused.lm_head_cross_entropy(hmid, wv, bv, labels, 0.1, "mean", chunk_size=16) + s.mean()

    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this torch build / Python")
    args = [torch.randn(6, 12), torch.randn(6, 12), torch.randn(12), torch.randn(12),
            torch.randn(12, 48), torch.randn(48), torch.randn(40, 8), torch.randn(40)]
    labels = torch.tensor([0, 39, -100, 5, 17, 22])
    eager_in = [a.clone().requires_grad_() for a in args]
    comp_in = [a.clone().requires_grad_() for a in args]
    with fused.use_backend("triton"):
        lc = torch.compile(f, fullgraph=True, backend="aot_eager")(*comp_in, labels)
        le = f(*eager_in, labels)
        lc.backward()
        le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@needs_interp
def test_torch_compile_inductor():
    """Inductor (C++ codegen for the surrounding ops on CPU) around the opaque custom ops."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this torch build / Python")
    import shutil
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler; none on PATH")

    def f(x, r, w, b):
        out, s = fused.add_layer_norm(x * 2, r, w, None)
        return fused.bias_gelu(out, b).sum() + s.square().sum()

    args = [torch.randn(4, 16), torch.randn(4, 16), torch.randn(16), torch.randn(16)]
    comp_in = [a.clone().requires_grad_() for a in args]
    eager_in = [a.clone().requires_grad_() for a in args]
    with fused.use_backend("triton"):
        lc = torch.compile(f, fullgraph=True)(*comp_in)
        le = f(*eager_in)
        lc.backward()
        le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# launch configurations: pure functions shared by the launchers and the kernel audit
# (bench/audit_fused.py compiles every configuration for sm_80 / sm_90a); the tile shapes of
# each CUDA configuration are run here under the interpreter against float64
# ----------------------------------------------------------------------------------------------
def test_fused_configs_rules():
    from valor_fast.kernels._launch import LaunchConfig
    for fn, widths in ((k_aln.add_layer_norm_configs, (768, 1024, 8192)),
                       (k_gelu.bias_gelu_configs, (3072, 4096, 33)),
                       (k_lm.ce_configs, (4096, 1850, 13))):
        for n in widths:
            for kernel in ("fwd", "bwd"):
                for dtype in (torch.bfloat16, torch.float32):
                    assert len(fn(n, dtype, None, kernel)) == 1, "one configuration under the interpreter"
                    for cc in (80, 90):
                        cfgs = fn(n, dtype, cc, kernel)
                        assert 1 <= len(cfgs) <= 4 and len(set(cfgs)) == len(cfgs)
                        assert all(isinstance(c, LaunchConfig) and c.num_warps <= 16 for c in cfgs)
        with pytest.raises(ValueError, match="kernel must be"):
            fn(768, torch.bfloat16, 90, "both")
    assert all(dict(c.meta)["BLOCK"] <= 2048 for c in k_lm.ce_configs(1850, torch.bfloat16, 90))
    # the defaults are today's launches: 4 warps at 768 / 1024-wide rows, 16 x 256 GELU tiles
    assert k_aln.add_layer_norm_configs(768, torch.bfloat16, 90)[0].num_warps == 4
    assert dict(k_gelu.bias_gelu_configs(3072, torch.bfloat16, 90)[0].meta) == {"BLOCK_M": 16, "BLOCK_N": 256}


def _pin_rank(monkeypatch, module, name, cc, rank):
    """module.name (a configs function) -> the one configuration of that rank (or the set's last)
    of the real function's set for architecture cc, whatever width / kernel it is asked about."""
    real = getattr(module, name)
    asked = set()

    def pinned(n, dtype, _cc=None, kernel="fwd"):
        asked.add(kernel)
        cfgs = real(n, dtype, cc, kernel)
        return (cfgs[min(rank, len(cfgs) - 1)],)
    monkeypatch.setattr(module, name, pinned)
    return asked


@needs_interp
@pytest.mark.parametrize("cc", [80, 90])
def test_fused_every_cuda_config(monkeypatch, cc):
    """bias + GELU tiles (8/16/32 x 256/512 over a ragged 700-wide row) and the CE column blocks
    (1024-4096 over 4096- and 904-wide chunks), each rank of each set pinned in turn.  (add +
    LayerNorm's configurations differ only in warps and stages, which the interpreter ignores.)"""
    for rank in range(3):
        asked = _pin_rank(monkeypatch, k_gelu, "bias_gelu_configs", cc, rank)

        def gelu(x, b):
            with fused.use_backend("triton"):
                return fused.bias_gelu(x, b, "none")
        _compare(gelu, lambda x, b: k_gelu.bias_gelu_ref(x, b, "none"),
                 lambda d: [2 * torch.randn(37, 700, dtype=d), torch.randn(700, dtype=d)], ["x", "bias"],
                 torch.float32)
        assert asked == {"fwd", "bwd"}, "the launchers take their configurations from bias_gelu_configs"
        monkeypatch.undo()
    labels = torch.randint(0, 5000, (5,))
    labels[0] = 4999  # a target in the ragged last chunk
    for rank in range(3):
        asked = _pin_rank(monkeypatch, k_lm, "ce_configs", cc, rank)

        def ce(h, w, b, y):
            with fused.use_backend("triton"):
                return fused.lm_head_cross_entropy(h, w, b, y, 0.1, "mean", chunk_size=4096)
        _compare(ce, lambda h, w, b, y: k_lm.lm_head_ce_ref(h, w, b, y, 0.1, "mean").float(),
                 lambda d: [torch.randn(5, 16, dtype=d), torch.randn(5000, 16, dtype=d) / 2,
                            torch.randn(5000, dtype=d), labels], ["hidden", "weight", "bias"], torch.float32)
        assert asked == {"fwd", "bwd"}, "the launchers take their configurations from ce_configs"
        monkeypatch.undo()
