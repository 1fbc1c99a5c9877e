"""Flash attention: the Triton kernel (under TRITON_INTERPRET=1 on the CPU), the backend
dispatcher `valor_fast.ops.attention`, and torch.compile tracing of the custom op.

Accuracy rule: against a float64 reference, every result (output and dq/dk/dv) may be off by at
most 2x what eager PyTorch attention in the same dtype is off by, plus a small absolute floor.
Inputs are fresh random tensors each run (conftest seeds from os.urandom); shapes are odd and
small so the interpreter stays fast.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch / triton are imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from valor_fast.kernels.flash_attention import attention_ref, flash_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("kernel_device")   # VALOR_FAST_TEST_DEVICE=cuda: on the GPU

A = importlib.import_module("valor_fast.ops.attention")  # the module (valor_fast.ops.attention is the function)

# Absolute floor, relative to max |reference|.  16-bit: two units in the last place, since two
# roundings to the input dtype are inherent to the kernel's algorithm (that of flash-attention 2:
# the P / dS tiles enter the second matmuls in the input dtype, delta = rowsum(dO * O) uses the
# stored O) and land on other elements than eager's roundings do.  fp32: a few ulps.
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
         torch.float16: 2 * torch.finfo(torch.float16).eps}


def _inputs(B, H, Lq, Lk, D, dtype=torch.float32, pad=None, causal=False):
    """q/k/v leaf tensors and a key-padding mask.  pad: None, 'right' (random valid lengths, at
    least 1) or 'some_empty' (batch 0 has no valid key at all)."""
    q = torch.randn(B, H, Lq, D, dtype=dtype).requires_grad_()
    k = torch.randn(B, H, Lk, D, dtype=dtype).requires_grad_()
    v = torch.randn(B, H, Lk, D, dtype=dtype).requires_grad_()
    kpm = None
    if pad is not None:
        lens = torch.randint(1, Lk + 1, (B,))
        lens[-1] = max(1, Lk - 3)  # at least one batch with real padding
        kpm = torch.arange(Lk)[None, :] < lens[:, None]  # (B, Lk)
        if pad == "some_empty":
            kpm[0] = False
    return q, k, v, kpm


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _run(fn, q, k, v, kpm, causal, do):
    """Output and (dq, dk, dv) of fn on detached copies of q, k, v (same dtype)."""
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(qq, kk, vv, kpm, causal)
    out.backward(do.to(out.dtype))
    return out.detach(), (qq.grad, kk.grad, vv.grad)


def _ref64(q, k, v, kpm, causal, do):
    # float64 leaves, so the reference gradients are not rounded back to the input dtype
    return _run(attention_ref, q.double(), k.double(), v.double(), kpm, causal, do.double())


def _eager(q, k, v, kpm, causal, do):
    return _run(lambda a, b, c, m, cz: attention_ref(a, b, c, m, cz), q, k, v, kpm, causal, do)


def _assert_close(name, got, ref64, eager, dtype):
    err = _max_err(got, ref64)
    base = _max_err(eager, ref64)
    bound = 2.0 * base + FLOOR[dtype] * max(1.0, ref64.abs().max().item())
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err <= bound, f"{name}: max error {err:.3e} vs float64 > bound {bound:.3e} (eager {base:.3e})"


def _check_against_ref(fn, q, k, v, kpm, causal, grads=True):
    dtype = q.dtype
    do = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=dtype)
    if not grads:
        with torch.no_grad():
            got = fn(q, k, v, kpm, causal)
            r = attention_ref(q.double(), k.double(), v.double(), kpm, causal)
            e = attention_ref(q, k, v, kpm, causal)
        _assert_close("out", got, r, e, dtype)
        return
    out, g = _run(fn, q, k, v, kpm, causal, do)
    r_out, r_g = _ref64(q, k, v, kpm, causal, do)
    e_out, e_g = _eager(q, k, v, kpm, causal, do)
    _assert_close("out", out, r_out, e_out, dtype)
    for name, a, r, e in zip(("dq", "dk", "dv"), g, r_g, e_g):
        _assert_close(name, a, r, e, dtype)


def _triton(q, k, v, kpm, causal):
    return flash_attention(q, k, v, kpm, causal)


# ----------------------------------------------------------------------------------------------
# the Triton kernel against the float64 reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,pad", [
    (2, 2, 67, 67, 64, False, "right"),   # odd length, 3 tiles, padding
    (2, 2, 45, 45, 16, True, "right"),    # causal + padding
    (1, 2, 53, 53, 32, True, None),       # causal, no mask, partial diagonal tile
    (2, 2, 7, 37, 32, False, "right"),    # cross attention, Lq < Lk
    (2, 1, 37, 7, 16, False, None),       # cross attention, Lq > Lk
    (1, 1, 21, 19, 80, False, "right"),   # head dim 80 -> padded to 128 lanes
])
def test_triton_fwd_bwd_fp32(B, H, Lq, Lk, D, causal, pad):
    q, k, v, kpm = _inputs(B, H, Lq, Lk, D, pad=pad)
    _check_against_ref(_triton, q, k, v, kpm, causal)


def test_triton_unequal_tiles(monkeypatch):
    # CUDA uses BLOCK_M != BLOCK_N (128x64 forward, 64x64 backward): exercise the causal loop
    # bounds with unequal tiles both ways, plus the launch options the CUDA configs pass
    import valor_fast.kernels.flash_attention as fa
    from valor_fast.kernels._launch import config

    def cfg(Lq, Lk, head_dim, dtype, causal=False, has_bias=False, cc=None, kernel="fwd"):
        tiles = dict(BLOCK_M=32, BLOCK_N=16) if kernel == "fwd" else dict(BLOCK_M=16, BLOCK_N=32)
        if kernel == "bwd_preprocess":
            tiles = dict(BLOCK_M=16)
        return (config(4, 2, **tiles),)

    monkeypatch.setattr(fa, "attention_configs", cfg)
    q, k, v, kpm = _inputs(1, 2, 45, 45, 16, pad="right")
    _check_against_ref(_triton, q, k, v, kpm, True)
    q, k, v, kpm = _inputs(1, 1, 21, 38, 32, pad="right")
    _check_against_ref(_triton, q, k, v, kpm, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_forward(dtype):
    q, k, v, kpm = _inputs(2, 2, 33, 41, 64, dtype=dtype, pad="right")
    _check_against_ref(_triton, q, k, v, kpm, False, grads=False)


def test_triton_bf16_backward_causal():
    q, k, v, kpm = _inputs(1, 2, 29, 29, 32, dtype=torch.bfloat16, pad="right")
    _check_against_ref(_triton, q, k, v, kpm, True)


def test_triton_strided_inputs():
    # HF hands q/k/v over as (B, L, H, Dh) -> transpose(1, 2) views; the kernel takes the strides
    B, L, H, D = 2, 19, 2, 32
    x = torch.randn(3, B, L, H, D)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(0))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v)
    ref = attention_ref(q.double(), k.double(), v.double())
    assert _max_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------------------------
# rows with nothing to attend to: zeros and zero gradients, never NaN, on every backend
# ----------------------------------------------------------------------------------------------
def _cpu_backends():
    return [b for b in A.BACKENDS if A.unsupported_reason(b, torch.empty(1, 1, 1, 16), None, False) is None]


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
def test_fully_masked_rows(backend):
    assert backend in _cpu_backends()
    B, H, L, D = 2, 2, 23, 16
    # batch 0: every key padded; batch 1, causal: left padding, so the first queries see no key
    q, k, v, _ = _inputs(B, H, L, L, D)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[0] = False
    kpm[1, :5] = False
    for causal in (False, True):
        do = torch.randn(B, H, L, D)
        with A.use_backend(backend):
            out, (dq, dk, dv) = _run(lambda a, b, c, m, cz: A.attention(a, b, c, m, cz), q, k, v, kpm, causal, do)
        for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.isfinite(t).all(), f"{backend} causal={causal}: NaN/inf in {name}"
        assert out[0].abs().max() == 0 and dq[0].abs().max() == 0
        assert dk[0].abs().max() == 0 and dv[0].abs().max() == 0
        if causal:
            assert out[1, :, :5].abs().max() == 0 and dq[1, :, :5].abs().max() == 0
            assert dk[1, :, :5].abs().max() == 0 and dv[1, :, :5].abs().max() == 0
        r_out, r_g = _ref64(q, k, v, kpm, causal, do)
        assert _max_err(out, r_out) < 1e-5
        for a, r in zip((dq, dk, dv), r_g):
            assert _max_err(a, r) < 1e-5


# ----------------------------------------------------------------------------------------------
# every available backend agrees (fp32, with grads)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Lq,Lk,causal,pad", [(31, 31, False, "right"), (31, 31, True, "right"),
                                              (7, 37, False, "right"), (17, 17, True, None)])
def test_backends_agree(Lq, Lk, causal, pad):
    backends = _cpu_backends()
    assert {"triton", "sdpa", "math"} <= set(backends)
    q, k, v, kpm = _inputs(2, 2, Lq, Lk, 16, pad=pad)
    for b in backends:
        def fn(a, bb, c, m, cz, _b=b):
            with A.use_backend(_b):
                return A.attention(a, bb, c, m, cz)
        _check_against_ref(fn, q, k, v, kpm, causal)


# ----------------------------------------------------------------------------------------------
# dispatcher: override, env var, auto choice, errors
# ----------------------------------------------------------------------------------------------
def test_dispatch_override_and_env(monkeypatch):
    q = torch.randn(1, 1, 5, 16)
    monkeypatch.delenv("VALOR_FAST_ATTN", raising=False)
    assert A.get_forced_backend() is None
    assert A.choose_backend(q) == "sdpa"  # CPU tensors: auto is SDPA, even under the interpreter
    for b in ("triton", "math", "sdpa"):
        with A.use_backend(b):
            assert A.choose_backend(q) == b
    assert A.choose_backend(q) == "sdpa"  # restored
    monkeypatch.setenv("VALOR_FAST_ATTN", "math")
    assert A.choose_backend(q) == "math"
    with A.use_backend("triton"):  # code beats the env var
        assert A.choose_backend(q) == "triton"
    monkeypatch.setenv("VALOR_FAST_ATTN", "auto")
    assert A.choose_backend(q) == "sdpa"
    # reachable through the function itself, as valor_fast.ops.attention.use_backend
    import valor_fast.ops
    with valor_fast.ops.attention.use_backend("math"):
        assert A.choose_backend(q) == "math"


def test_dispatch_bad_names(monkeypatch):
    with pytest.raises(ValueError, match="'nope'"):
        with A.use_backend("nope"):
            pass
    with pytest.raises(ValueError, match="'cuda_magic'"):
        A.set_backend("cuda_magic")
    monkeypatch.setenv("VALOR_FAST_ATTN", "fast")
    with pytest.raises(ValueError, match="VALOR_FAST_ATTN.*'fast'"):
        A.attention(*(torch.randn(1, 1, 4, 16) for _ in range(3)))


def test_dispatch_forced_unusable(monkeypatch):
    q = torch.randn(1, 1, 4, 16)
    with A.use_backend("flash_attn"):  # CPU tensors (and not installed here)
        with pytest.raises(RuntimeError, match="flash_attn"):
            A.attention(q, q, q)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton on CPU without the interpreter
    with A.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            A.attention(q, q, q)


def test_input_validation():
    q = torch.randn(2, 2, 5, 16)
    k = torch.randn(2, 2, 9, 16)
    with pytest.raises(ValueError, match="k shape"):
        A.attention(q, torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16))
    with pytest.raises(ValueError, match="v shape"):
        A.attention(q, k, torch.randn(2, 2, 8, 16))
    with pytest.raises(ValueError, match="q must be 4-D"):
        A.attention(q[0], k, k)
    with pytest.raises(ValueError, match="causal=True needs Lq == Lk"):
        A.attention(q, k, k, causal=True)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, Lk\)"):
        A.attention(q, k, k, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        A.attention(q, k, k, key_padding_mask=torch.ones(2, 9))
    with pytest.raises(TypeError, match="dtypes differ"):
        A.attention(q, k.double(), k)
    with pytest.raises(ValueError, match="head dim 256"):
        flash_attention(torch.randn(1, 1, 4, 256), torch.randn(1, 1, 4, 256), torch.randn(1, 1, 4, 256))
    with pytest.raises(ValueError, match="bias must be"):  # bias shapes: tests/kernels/test_flash_attention_bias.py
        flash_attention(q, k, k, bias=torch.zeros(2, 9, 5))


def test_reference_bias_broadcast():
    # the reference's bias argument (the Swin path): (H, Lq, Lk) broadcasts over the batch
    q, k, v, kpm = _inputs(2, 2, 6, 6, 16, dtype=torch.float64, pad="right")
    bias = torch.randn(2, 6, 6, dtype=torch.float64)
    got = attention_ref(q, k, v, kpm, bias=bias)
    s = q @ k.transpose(-1, -2) * 16 ** -0.5 + bias
    s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    assert torch.allclose(got, torch.softmax(s, -1) @ v)


# ----------------------------------------------------------------------------------------------
# torch.compile: the custom op traces with fullgraph=True (no graph breaks), fwd and bwd
# ----------------------------------------------------------------------------------------------
def test_custom_op_opcheck():
    from valor_fast.kernels.flash_attention import _flash_attention_op
    q, k, v, kpm = _inputs(1, 2, 9, 11, 16, pad="right")
    torch.library.opcheck(_flash_attention_op, (q, k, v, kpm, False, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_fullgraph(monkeypatch):
    monkeypatch.delenv("VALOR_FAST_ATTN", raising=False)
    torch._dynamo.reset()
    q, k, v, kpm = _inputs(2, 2, 13, 13, 16, pad="right")

    def block(q, k, v, kpm):
        with_kernel = flash_attention(q * 1.0, k, v, kpm, causal=True)
        via_dispatch = A.attention(q, k, v, key_padding_mask=kpm)
        return (with_kernel + via_dispatch).sum()

    # aot_eager: Dynamo capture + AOTAutograd (fake impl, autograd registration) without a C++
    # compiler; fullgraph=True fails on any graph break
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with A.use_backend("triton"):
        loss = compiled(q, k, v, kpm)
        loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    with A.use_backend("triton"):
        block(q, k, v, kpm).backward()
    for g, t in zip(grads, (q, k, v)):
        assert _max_err(g, t.grad) < 1e-5


# ----------------------------------------------------------------------------------------------
# launch configurations: one pure function per kernel, shared by the launcher and the kernel
# audit (bench/audit_attention.py compiles every configuration for sm_80 / sm_90a); each
# configuration's tiles are run here under the interpreter against float64
# ----------------------------------------------------------------------------------------------
_VALOR = {"text": (40, 40, 64, False, False), "ast": (129, 129, 64, False, False),
          "vit_b16": (197, 197, 64, False, False), "vit_l14": (257, 257, 64, False, False),
          "dec_self": (40, 40, 64, True, False), "dec_cross": (40, 917, 64, False, False),
          "swin": (196, 196, 32, False, True)}


def test_attention_configs_rules():
    import valor_fast.kernels.flash_attention as fa
    from valor_fast.kernels._launch import LaunchConfig
    for name, (lq, lk, d, causal, bias) in _VALOR.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for kernel in fa.ATTN_KERNELS:
                assert len(fa.attention_configs(lq, lk, d, dtype, causal, bias, None, kernel)) == 1
                for cc in (80, 90):
                    cfgs = fa.attention_configs(lq, lk, d, dtype, causal, bias, cc, kernel)
                    assert cfgs and len(set(cfgs)) == len(cfgs) and all(isinstance(c, LaunchConfig) for c in cfgs)
                    assert len(cfgs) <= 4, f"{name} {kernel}: autotune sets stay small"
                    for c in cfgs:
                        meta = dict(c.meta)
                        if cc == 90 and kernel != "bwd_preprocess" and meta["BLOCK_M"] == 128:
                            assert c.num_warps == 8, f"{name} {kernel} {c}: 128-row tiles need 2 warpgroups"
                        if cc == 80 and kernel == "bwd_dkdv" and not dtype == torch.float32:
                            assert meta["BLOCK_M"] * meta["BLOCK_N"] <= 64 * 32, f"{name} {c}: spills on sm_80"
                        if lq <= fa.SHORT_Q and kernel in ("fwd", "bwd_dq", "bwd_preprocess"):
                            assert meta["BLOCK_M"] <= 64, f"{name} {kernel} {c}: short queries, short tiles"
    # the query tile pads the least: 129 and 257 queries in 64-row tiles, 197 in 128-row ones
    first = lambda lq: dict(fa.attention_configs(lq, lq, 64, torch.bfloat16, cc=90)[0].meta)["BLOCK_M"]  # noqa: E731
    assert (first(129), first(197), first(257), first(40)) == (64, 128, 64, 64)
    with pytest.raises(ValueError, match="kernel must be one of"):
        fa.attention_configs(40, 40, 64, torch.bfloat16, kernel="bwd")


def _pinned_passes(monkeypatch, cls):
    """For a shape class (lq, lk, d, causal, bias): the distinct sm_80 / sm_90 configurations of
    each kernel, as passes that pin one configuration per kernel (every configuration is in some
    pass).  The launcher then runs exactly that configuration under the interpreter."""
    import valor_fast.kernels.flash_attention as fa
    real = fa.attention_configs
    lq, lk, d, causal, bias = cls
    per_kernel = {}
    for kernel in fa.ATTN_KERNELS:
        seen = []
        for cc in (80, 90):
            seen += [c for c in real(lq, lk, d, torch.bfloat16, causal, bias, cc, kernel) if c not in seen]
        per_kernel[kernel] = seen
    passes = max(len(v) for v in per_kernel.values())
    for i in range(passes):
        pinned = {k: v[i % len(v)] for k, v in per_kernel.items()}
        asked = set()

        def pin(*a, _p=pinned, _asked=asked, **kw):
            kernel = kw.get("kernel", a[-1])
            _asked.add(kernel)
            return (_p[kernel],)
        monkeypatch.setattr(fa, "attention_configs", pin)
        yield pinned
        assert asked == set(fa.ATTN_KERNELS), f"launchers asked attention_configs for {asked} only"


@pytest.mark.parametrize("cls", [
    (40, 40, 64, True, False),    # decoder self-attention: short queries, causal, key padding
    (40, 150, 64, False, False),  # short queries over longer memory (cross-attention)
    (131, 131, 64, False, False), # long sequences: 128- and 64-row tiles, 2-3 of them
])
def test_triton_every_cuda_config(monkeypatch, cls):
    lq, lk, d, causal, _ = cls
    for pinned in _pinned_passes(monkeypatch, cls):
        q, k, v, kpm = _inputs(1, 2, lq, lk, d, dtype=torch.bfloat16, pad="right")
        _check_against_ref(_triton, q, k, v, kpm, causal)
