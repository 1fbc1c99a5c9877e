"""Fused ops (add + LayerNorm, bias + GELU, LM head + cross-entropy): forward and every gradient
against a float64 reference, through the dispatcher with each backend forced.  The Triton kernels
run on the CPU through the interpreter.  Error bound: 2x what eager PyTorch in the same dtype gets
against float64, plus a floor of a few ulps of the output's scale."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch/triton are imported

import pytest  # noqa: E402
import torch  # noqa: E402

import valor_fast.kernels.add_layer_norm as k_aln  # noqa: E402
import valor_fast.kernels.bias_gelu as k_gelu  # noqa: E402
import valor_fast.kernels.lm_head_ce as k_lm  # noqa: E402
from valor_fast.ops import fused  # noqa: E402
from valor_fast.utils.deps import HAS_TRITON  # noqa: E402
from valor_fast.utils.log import _ONCE  # noqa: E402

pytestmark = pytest.mark.usefixtures("kernel_device")   # VALOR_FAST_TEST_DEVICE=cuda: on the GPU

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


# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# LM head + cross-entropy
# ----------------------------------------------------------------------------------------------
N, V, C, CHUNK = 11, 1037, 24, 256  # 5 chunks, the last one 13 columns wide


def _lm_make(with_bias):
    labels = torch.randint(0, V, (N,))
    labels[2] = -100  # an ignored row
    labels[0] = V - 1  # a target in the ragged last chunk
    labels[1] = 0

    def make(d):
        h = torch.randn(N, C, dtype=d)
        w = torch.randn(V, C, dtype=d) / C ** 0.5 * 2
        b = torch.randn(V, dtype=d) if with_bias else None
        return [h, w, b, labels]
    return make


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing,reduction,with_bias",
                         [(0.0, "mean", True), (0.1, "none", True), (0.1, "mean", False)])
def test_lm_head_ce(backend, dtype, label_smoothing, reduction, with_bias, monkeypatch):
    shapes = []
    orig = k_lm._chunk_logits

    def spy(hidden, weight, bias, v0, v1):
        z = orig(hidden, weight, bias, v0, v1)
        shapes.append(tuple(z.shape))
        return z

    monkeypatch.setattr(k_lm, "_chunk_logits", spy)

    def under_test(h, w, b, labels):
        with fused.use_backend(backend):
            return fused.lm_head_cross_entropy(h, w, b, labels, label_smoothing, reduction,
                                               chunk_size=CHUNK)

    def ref(h, w, b, labels):
        return k_lm.lm_head_ce_ref(h, w, b, labels, label_smoothing, reduction).to(
            torch.float64 if h.dtype == torch.float64 else torch.float32)

    names = ["hidden", "weight", "bias"] if with_bias else ["hidden", "weight"]
    out = _compare(under_test, ref, _lm_make(with_bias), names, dtype)[0]
    assert out.dtype == torch.float32
    if reduction == "none":
        assert out[2].item() == 0.0  # ignored row
    # chunking: the fwd and the bwd each walk ceil(V / CHUNK) chunks, none wider than CHUNK
    one_pass = [(N, CHUNK)] * (V // CHUNK) + [(N, V % CHUNK)]
    assert shapes == one_pass * 2, shapes


def test_lm_head_ce_errors():
    h, w, labels = torch.randn(3, 8), torch.randn(20, 8), torch.tensor([1, 2, 20])
    with pytest.raises(ValueError, match="labels out of"):
        fused.lm_head_cross_entropy(h, w, None, labels)
    with pytest.raises(ValueError, match="weight must be"):
        fused.lm_head_cross_entropy(h, torch.randn(20, 7), None, labels)
    with pytest.raises(ValueError, match="reduction"):
        fused.lm_head_cross_entropy(h, w, None, torch.tensor([1, 2, 3]), reduction="max")


# ----------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_ce_bf16_autocast_fp32_weight(backend):
    """Issue #17's first single-GPU crash: under bf16 autocast without FSDP the decoder's hidden
    state is bf16 and the tied embedding an fp32 master.  The op casts like F.linear under
    autocast (every operand to bf16) and the fp32 weight / bias receive fp32 gradients; error
    vs float64 (on the bf16-rounded operands autocast computes with) within 2x eager autocast."""
    bf = torch.bfloat16
    h0 = torch.randn(N, C).to(bf)
    w0, b0 = torch.randn(V, C) / C ** 0.5 * 2, torch.randn(V)
    labels = _lm_make(True)(torch.float32)[3]
    up = torch.randn(())

    def run(fn, h, w, b, autocast):
        h, w, b = (t.detach().clone().requires_grad_() for t in (h, w, b))
        with torch.autocast(h.device.type, dtype=bf, enabled=autocast):
            loss = fn(h, w, b)
        (loss.double() * up).backward()  # backward outside autocast, as the trainer runs it
        return loss.detach(), h.grad, w.grad, b.grad

    def ours(h, w, b):
        with fused.use_backend(backend):
            return fused.lm_head_cross_entropy(h, w, b, labels, chunk_size=CHUNK)

    ref = lambda h, w, b: k_lm.lm_head_ce_ref(h, w, b, labels)  # noqa: E731
    ref64 = run(ref, h0.double(), w0.to(bf).double(), b0.to(bf).double(), False)
    eager = run(ref, h0, w0, b0, True)
    got = run(ours, h0, w0, b0, True)
    assert got[0].dtype == torch.float32
    assert (got[1].dtype, got[2].dtype, got[3].dtype) == (bf, torch.float32, torch.float32)
    _check_all(["loss", "dhidden", "dweight", "dbias"], got, eager, ref64, bf)
    with pytest.raises(TypeError, match="weight dtype"):  # without autocast a mismatch is an error
        fused.lm_head_cross_entropy(h0, w0, b0, labels)


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
