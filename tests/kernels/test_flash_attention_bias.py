"""Attention with an additive bias (Swin's relative position bias + shifted-window mask): every
backend available on the CPU (math, sdpa, triton under TRITON_INTERPRET=1) against a float64
reference, forward and dq / dk / dv / dbias, for the three bias layouts:
  (H, L, L)        one bias for every batch item,
  (nB, H, L, L)    item b uses bias[b % nB] (Swin: clips x windows, window index fastest),
  (B, H, L, L)     one bias per item.
Window-sized odd L (49 = 7x7, 37) and odd window counts.  Error bound: 2x what eager PyTorch in
the same dtype is off by, plus a small floor (as tests/kernels/test_flash_attention.py).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch / triton are imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from valor_fast.kernels.flash_attention import (  # noqa: E402
    _flash_attention_op, attention_ref, flash_attention, flash_attention_bwd, flash_attention_fwd)

pytestmark = pytest.mark.usefixtures("kernel_device")   # VALOR_FAST_TEST_DEVICE=cuda: on the GPU

A = importlib.import_module("valor_fast.ops.attention")

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}


def _bias(kind, B, H, L, nb=3, dtype=torch.float32):
    shape = {"shared": (H, L, L), "windows": (nb, H, L, L), "per_item": (B, H, L, L)}[kind]
    b = torch.randn(shape, dtype=dtype)
    # a Swin-like mask part: some pairs get -100 (another region of a shifted window)
    b = b + torch.where(torch.rand(shape) < 0.2, -100.0, 0.0).to(dtype)
    idx = torch.arange(L)
    b[..., idx, idx] = torch.randn(b[..., idx, idx].shape, dtype=dtype)  # every token sees itself
    return b.requires_grad_()


def _run(fn, q, k, v, bias, do, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    out = fn(*leaves[:3], bias=leaves[3], **kw)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _ref64(q, k, v, bias, do, **kw):
    return _run(lambda a, b, c, bias, **k: attention_ref(a, b, c, bias=bias, **k),
                q.double(), k.double(), v.double(), bias.double(), do.double(), **kw)


def _eager(q, k, v, bias, do, **kw):
    return _run(lambda a, b, c, bias, **k: attention_ref(a, b, c, bias=bias, **k), q, k, v, bias, do, **kw)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(got, ref, eager, dtype, what):
    for name, g, r, e in zip(("out", "dq", "dk", "dv", "dbias"), got, ref, eager):
        assert g.shape == r.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite"
        err, base = _err(g, r), _err(e, r)
        bound = 2.0 * base + FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{what} {name}: max error {err:.3e} > bound {bound:.3e} (eager {base:.3e})"


def _via(backend):
    def fn(q, k, v, bias, **kw):
        with A.use_backend(backend):
            return A.attention(q, k, v, bias=bias, **kw)
    return fn


@pytest.mark.parametrize("backend", ["math", "sdpa", "triton"])
@pytest.mark.parametrize("kind,B,L", [("shared", 3, 49), ("windows", 6, 37), ("per_item", 3, 49),
                                      ("windows", 9, 49)])
def test_bias_backends_fp32(backend, kind, B, L):
    H, D = 2, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    bias = _bias(kind, B, H, L, nb=3)
    do = torch.randn(B, H, L, D)
    ref, eager = _ref64(q, k, v, bias, do), _eager(q, k, v, bias, do)
    _check(_run(_via(backend), q, k, v, bias, do), ref, eager, torch.float32, f"{backend} {kind} B={B} L={L}")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_bias_with_padding_and_causal(backend):
    B, H, L, D = 4, 2, 33, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    bias = _bias("windows", B, H, L, nb=2)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1, -7:] = False
    do = torch.randn(B, H, L, D)
    for causal in (False, True):
        kw = dict(key_padding_mask=kpm, causal=causal)
        ref, eager = _ref64(q, k, v, bias, do, **kw), _eager(q, k, v, bias, do, **kw)
        _check(_run(_via(backend), q, k, v, bias, do, **kw), ref, eager, torch.float32,
               f"{backend} kpm causal={causal}")


def test_triton_bias_bf16():
    # bf16 q/k/v with an fp32 bias (the Swin path under autocast: the table stays fp32)
    B, H, L, D = 6, 2, 49, 32
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3))
    bias = _bias("windows", B, H, L, nb=3)
    do = torch.randn(B, H, L, D, dtype=torch.bfloat16)
    ref = _ref64(q, k, v, bias, do)
    # eager bf16: scores in bf16 with the bias rounded to bf16, as eager attention would run
    eager = _run(lambda a, b, c, bias: attention_ref(a, b, c, bias=bias), q, k, v, bias, do)
    got = _run(lambda a, b, c, bias: flash_attention(a, b, c, bias=bias), q, k, v, bias, do)
    assert got[4].dtype == torch.float32  # dbias in the bias' dtype
    _check(got, ref, eager, torch.bfloat16, "triton bf16")


def test_dbias_atomic_and_deterministic_agree():
    B, H, L, D = 8, 1, 35, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    bias = torch.randn(4, H, L, L)
    out, lse = flash_attention_fwd(q, k, v, None, False, D ** -0.5, bias)
    do = torch.randn_like(out)
    g_atomic = flash_attention_bwd(do, q, k, v, out, lse, None, False, D ** -0.5, bias, True, deterministic=False)
    g_det = flash_attention_bwd(do, q, k, v, out, lse, None, False, D ** -0.5, bias, True, deterministic=True)
    for a, b in zip(g_atomic, g_det):
        assert _err(a, b) < 1e-5
    # per-item dS summed by hand gives the shared-slice gradient
    per_item = flash_attention_bwd(do, q, k, v, out, lse, None, False, D ** -0.5,
                                   A.expand_bias(bias, B).contiguous(), True)[3]
    assert _err(per_item.view(2, 4, H, L, L).sum(0), g_det[3]) < 1e-5
    # no dbias requested: none computed
    assert flash_attention_bwd(do, q, k, v, out, lse, None, False, D ** -0.5, bias, False)[3] is None


def test_bias_without_grad_and_inf_entries():
    # a frozen bias (no dbias) with -inf entries: masked like a key-padding mask
    B, H, L, D = 3, 2, 21, 16
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    bias = torch.zeros(H, L, L)
    bias[:, :, 15:] = float("-inf")
    out = flash_attention(q, k, v, bias=bias)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[:, 15:] = False
    ref = attention_ref(q.double(), k.double(), v.double(), kpm)
    assert _err(out, ref) < 1e-5
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_attention_ref_bias_is_the_same_math():
    """The one reference (kernels/flash_attention.attention_ref) against the formula written out."""
    B, H, L, D = 6, 2, 25, 16
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(3, H, L, L, dtype=torch.float64)
    s = q @ k.transpose(-1, -2) * D ** -0.5 + bias.repeat(2, 1, 1, 1)  # item b: bias[b % 3]
    assert _err(attention_ref(q, k, v, bias=bias), torch.softmax(s, -1) @ v) < 1e-12


def test_bias_errors():
    q = torch.randn(6, 2, 7, 16)
    for bad in (torch.zeros(2, 7, 8), torch.zeros(7, 7), torch.zeros(4, 2, 7, 7), torch.zeros(6, 3, 7, 7),
                torch.zeros(1, 6, 2, 7, 7)):
        for backend in ("math", "sdpa", "triton"):
            with A.use_backend(backend), pytest.raises(ValueError, match="bias"):
                A.attention(q, q, q, bias=bad)
        with pytest.raises(ValueError, match="bias"):
            flash_attention(q, q, q, bias=bad)
    with pytest.raises(TypeError, match="bias must be floating point"):
        A.attention(q, q, q, bias=torch.zeros(2, 7, 7, dtype=torch.long))
    with A.use_backend("flash_attn"), pytest.raises(RuntimeError, match="flash_attn.*bias"):
        A.attention(q, q, q, bias=torch.zeros(2, 7, 7))


def test_bias_dispatch_choice():
    q = torch.randn(2, 2, 7, 16)
    bias = torch.zeros(2, 7, 7)
    assert A.choose_backend(q, bias=bias) == "sdpa"  # CPU: auto is SDPA
    assert A.unsupported_reason("flash_attn", q, None, False, bias) is not None
    assert A.unsupported_reason("triton", q, None, False, bias) is None  # TRITON_INTERPRET=1 here


def test_custom_op_with_bias_opcheck_and_compile(monkeypatch):
    B, H, L, D = 4, 2, 19, 16
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, H, L, L, requires_grad=True)
    torch.library.opcheck(_flash_attention_op, (q, k, v, None, False, 0.25, bias),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    monkeypatch.delenv("VALOR_FAST_ATTN", raising=False)
    torch._dynamo.reset()

    def f(q, k, v, bias):
        return (flash_attention(q, k, v, bias=bias) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(q, k, v, bias).backward()
    got = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    f(q, k, v, bias).backward()
    for g, t in zip(got, (q, k, v, bias)):
        assert _err(g, t.grad) < 1e-5


def test_triton_bias_every_cuda_config(monkeypatch):
    """Each sm_80 / sm_90 configuration of the bias path (Swin: 32-key tiles, 64- and 128-row
    query tiles, the dS tiles stored / atomically added) run under the interpreter: one pass per
    rank, every kernel pinned to its configuration of that rank."""
    import valor_fast.kernels.flash_attention as fa
    real = fa.attention_configs
    B, H, L, D = 4, 1, 70, 32  # 4 items over 2 bias slices: the atomic dbias path
    sets = {kn: list(dict.fromkeys(real(L, L, D, torch.bfloat16, False, True, 80, kn) +
                                   real(L, L, D, torch.bfloat16, False, True, 90, kn)))
            for kn in fa.ATTN_KERNELS}
    for i in range(max(len(s) for s in sets.values())):
        pinned = {kn: s[i % len(s)] for kn, s in sets.items()}
        asked = []
        monkeypatch.setattr(fa, "attention_configs",
                            lambda *a, _p=pinned, _s=asked, **kw: _s.append(a[-1]) or (_p[kw.get("kernel", a[-1])],))
        q, k, v = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3))
        bias = _bias("windows", B, H, L, nb=2)
        do = torch.randn(B, H, L, D, dtype=torch.bfloat16)
        ref = _ref64(q, k, v, bias, do)
        eager = _run(lambda a, b, c, bias: attention_ref(a, b, c, bias=bias), q, k, v, bias, do)
        got = _run(lambda a, b, c, bias: flash_attention(a, b, c, bias=bias), q, k, v, bias, do)
        _check(got, ref, eager, torch.bfloat16, f"triton bf16 pinned {pinned}")
        assert set(asked) == set(fa.ATTN_KERNELS), asked
