"""Contrastive (MGA) losses: every runnable backend vs a float64 reference, forward and all gradients.

Bound: a backend's max-abs error vs float64 must be <= 2x the error eager PyTorch gets in the same
dtype (the reference run on the dtype's inputs) plus a tiny floor.  Triton runs under
TRITON_INTERPRET=1 on CPU; the CUDA C++ backend only where a GPU and the built library exist.
Shapes are odd on purpose (B = 5, 7, 13; T = 7; M = 3 + 1 audio; D = 16 / 32) so every partial
tile, several row / column / D blocks and padding masks are exercised.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch / triton are imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import valor_fast.kernels.contrastive as K  # noqa: E402  (the references sit beside the kernels)
from valor_fast.ops import _cuda  # noqa: E402
from valor_fast.ops import contrastive as C  # noqa: E402
from valor_fast.ops import distributed as dist_ops  # noqa: E402
from valor_fast.utils.deps import HAS_TRITON  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backends():
    out = ["torch"]
    if HAS_TRITON and (DEV.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    if DEV.type == "cuda" and _cuda.available():
        out.append("cuda")
    return out


BACKENDS = _backends()


def _floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # a tiny absolute floor: a few fp32 ulps of the reference's scale (eager can be exact by luck),
    # plus, for a 16-bit result, half an ulp of that dtype at the reference's scale: the rounding
    # of the stored result alone (an exact value rounded to fp16 is off by up to that; eager's
    # error happened to be 0.2 ulp where a correct kernel landed 0.75 ulp away, 1 seed in 6)
    f = 8 * torch.finfo(torch.float32).eps * (1.0 + float(ref.abs().max()))
    if dtype in (torch.float16, torch.bfloat16):
        f += 0.5 * torch.finfo(dtype).eps * float(ref.abs().max())
    return f


def _assert_close(name, got, ref64, eager, dtype):
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref64.shape)}"
    assert torch.isfinite(got.double()).all(), f"{name}: non-finite values"
    err = float((got.double() - ref64).abs().max())
    e_err = float((eager.double() - ref64).abs().max())
    tol = 2 * e_err + _floor(ref64, dtype)
    assert err <= tol, f"{name} ({dtype}): max err {err:.3g} > 2 x eager {e_err:.3g} + floor"


def _run(fn, inputs, dtype, need_grad):
    """inputs: float64 masters; returns (outputs dict, grads dict) of fn on `dtype` copies."""
    xs = {k: (v.to(dtype).detach().requires_grad_(k in need_grad) if v.is_floating_point() else v)
          for k, v in inputs.items()}
    out = fn(**xs)
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    # a weighted sum so each output's gradient is distinct
    total = sum((i + 1.0) * o for i, o in enumerate(out.values()))
    total.backward()
    return {k: o.detach() for k, o in out.items()}, {k: xs[k].grad for k in need_grad}


def _compare(fn_backend, fn_ref, inputs, need_grad, backend, dtype):
    # the float64 reference sees exactly the dtype's values: only compute error is measured
    inputs = {k: v.to(dtype).double() if v.is_floating_point() else v for k, v in inputs.items()}
    ref_o, ref_g = _run(fn_ref, inputs, torch.float64, need_grad)
    eag_o, eag_g = _run(fn_ref, inputs, dtype, need_grad)
    with C.use_backend(backend):
        got_o, got_g = _run(fn_backend, inputs, dtype, need_grad)
    assert got_o.keys() == ref_o.keys()
    for k in ref_o:
        _assert_close(f"{backend} output {k}", got_o[k], ref_o[k], eag_o[k], dtype)
    for k in need_grad:
        assert got_g[k] is not None, f"{backend}: no gradient for {k}"
        _assert_close(f"{backend} grad {k}", got_g[k], ref_g[k], eag_g[k], dtype)


# Gradients the grouped fine tests check.  Not "wa": with one audio slot (VALOR's shape) the
# slot softmax is exactly 1 whatever its logit, so d loss / d wa is exactly 0 and eager's and a
# kernel's values are both rounding noise (~1e-5 in fp16): a 2x bound between two noises fails
# by chance.  The slot weights' gradients are checked with 3 frames (wv).
_NEED_FINE = ("text", "text_weight", "v", "wv", "a", "temperature")


def _temp():
    return torch.empty((), dtype=torch.float64, device=DEV).uniform_(0.05, 0.5)


def _text_mask(B, T):
    m = torch.rand(B, T, device=DEV) > 0.3
    m[:, 0] = True
    m[B // 2] = False
    m[B // 2, 0] = True  # a caption with a single real token
    return m


def _feat(*shape):
    x = torch.randn(*shape, dtype=torch.float64, device=DEV)
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# coarse
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D", [(5, 16), (13, 32)])
def test_coarse_matches_reference(backend, dtype, B, D):
    inputs = dict(text=_feat(B, D), modal=_feat(B, D), temperature=_temp())
    need = ("text", "modal", "temperature")
    _compare(lambda **k: C.contrastive_loss(**k, mode="coarse"),
             lambda **k: K.contrastive_loss_ref(**k, mode="coarse"), inputs, need, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_coarse_matches_reference(backend):
    B, D = 7, 32
    inputs = dict(text=_feat(B, D), v=_feat(B, D), a=_feat(B, D), temperature=_temp().reshape(1))

    def fn(ref):
        def f(text, v, a, temperature):
            g = (K.grouped_contrastive_loss_ref if ref else C.grouped_contrastive_loss)
            return g(text, {"v": v, "a": a}, temperature, mode="coarse")
        return f
    _compare(fn(False), fn(True), inputs, ("text", "v", "a", "temperature"), backend, torch.float32)


# ----------------------------------------------------------------------------------------------
# fine
# ----------------------------------------------------------------------------------------------
def _fine_inputs(B, T, Mv, Ma, D):
    mv = torch.rand(B, Mv, device=DEV) > 0.3
    mv[:, 0] = True
    return dict(text=_feat(B, T, D), text_weight=torch.randn(B, T, dtype=torch.float64, device=DEV),
                text_mask=_text_mask(B, T),
                v=_feat(B, Mv, D), wv=torch.randn(B, Mv, dtype=torch.float64, device=DEV), mv=mv,
                a=_feat(B, Ma, D), wa=torch.randn(B, Ma, dtype=torch.float64, device=DEV),
                temperature=_temp())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fine_loss_matches_reference(backend, dtype):
    inp = _fine_inputs(7, 7, 3, 1, 16)
    del inp["a"], inp["wa"]

    def fn(ref):
        def f(text, text_weight, text_mask, v, wv, mv, temperature):
            g = K.contrastive_loss_ref if ref else C.contrastive_loss
            return g(text, v, temperature, mode="fine", text_weight=text_weight, text_mask=text_mask,
                     modal_weight=wv, modal_mask=mv)
        return f
    _compare(fn(False), fn(True), inp, ("text", "text_weight", "v", "wv", "temperature"), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,B", [(torch.float32, 5), (torch.bfloat16, 5), (torch.float16, 5),
                                     (torch.bfloat16, 13)])
def test_grouped_fine_matches_reference(backend, dtype, B):
    """T-V, T-A and T-AV ("av" = concatenation of v and a) from one fused pass."""
    inp = _fine_inputs(B, 7, 3, 1, 16 if B == 13 else 32)

    def fn(ref):
        def f(text, text_weight, text_mask, v, wv, mv, a, wa, temperature):
            g = K.grouped_contrastive_loss_ref if ref else C.grouped_contrastive_loss
            groups = {"v": (v, wv, mv), "a": (a, wa, None), "av": ("v", "a")}
            return g(text, groups, temperature, mode="fine", text_weight=text_weight, text_mask=text_mask)
        return f
    _compare(fn(False), fn(True), inp, _NEED_FINE, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_fine_partial_groups_and_no_weights(backend):
    """Only the concatenation requested besides its parts, no weights / masks anywhere, and a
    three-part concatenation (materialised)."""
    inp = _fine_inputs(5, 7, 3, 1, 16)

    def fn(ref):
        def f(text, text_weight, text_mask, v, wv, mv, a, wa, temperature):
            g = K.grouped_contrastive_loss_ref if ref else C.grouped_contrastive_loss
            groups = {"v": (v, None, None), "a": (a, None, None), "av": ("v", "a"), "ava": ("a", "v", "a")}
            return g(text, groups, temperature, mode="fine")
        return f
    _compare(fn(False), fn(True), inp, ("text", "v", "a", "temperature"), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_similarity_matches_reference(backend):
    B, T, M, D = 5, 7, 3, 16
    inp = _fine_inputs(B, T, M, 1, D)
    args = (inp["text"], inp["text_weight"], inp["text_mask"], inp["v"], inp["wv"], inp["mv"])
    ref = K.fine_similarity_ref(*args)
    with C.use_backend(backend):
        got = C.fine_similarity(*[a.float() if a.is_floating_point() else a for a in args])
    assert got.shape == (B, B)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def _hand_case():
    """2 captions x 2 clips, D = 2, computed by hand (independent of the reference code).

    text 0: tokens (1,0), (0,1), uniform weights.  text 1: (1,0) and a padded token (5,5) whose
    weight logit is 100: both must be ignored.  clip 0: (1,0), (0,1), uniform.  clip 1: (0,2),
    (1,1) with weight logits (0, ln 3) -> softmax (1/4, 3/4).
      S(0,0) = 1/2 [ (1 + 1)/2 + (1 + 1)/2 ]                  = 1
      S(0,1) = 1/2 [ (1 + 2)/2 + (2 * 1/4 + 1 * 3/4) ]        = 1.375
      S(1,0) = 1/2 [ 1 + (1 * 1/2 + 0 * 1/2) ]                = 0.75
      S(1,1) = 1/2 [ 1 + (0 * 1/4 + 1 * 3/4) ]                = 0.875
    """
    text = torch.tensor([[[1., 0.], [0., 1.]], [[1., 0.], [5., 5.]]], device=DEV)
    tw = torch.tensor([[0., 0.], [0., 100.]], device=DEV)
    tm = torch.tensor([[True, True], [True, False]], device=DEV)
    modal = torch.tensor([[[1., 0.], [0., 1.]], [[0., 2.], [1., 1.]]], device=DEV)
    mw = torch.tensor([[0., 0.], [0., math.log(3.0)]], device=DEV)
    S = torch.tensor([[1.0, 1.375], [0.75, 0.875]], dtype=torch.float64)
    return (text, tw, tm, modal, mw, None), S


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_similarity_hand_computed(backend):
    args, S = _hand_case()
    with C.use_backend(backend):
        got = C.fine_similarity(*args)
        loss = C.contrastive_loss(args[0], args[3], torch.tensor(0.5, device=DEV), mode="fine",
                                  text_weight=args[1], text_mask=args[2], modal_weight=args[4])
    torch.testing.assert_close(got.double().cpu(), S, rtol=0, atol=1e-6)
    z = S / 0.5
    rows = [math.log(sum(math.exp(v) for v in z[i])) - z[i, i] for i in range(2)]
    cols = [math.log(sum(math.exp(z[i, j]) for i in range(2))) - z[j, j] for j in range(2)]
    expect = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    assert abs(float(loss) - float(expect)) < 1e-5


# ----------------------------------------------------------------------------------------------
# dispatch, errors, custom ops
# ----------------------------------------------------------------------------------------------
def test_dispatch_env_and_force(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv("VALOR_FAST_CONTRASTIVE", "torch")
    assert C.get_forced_backend() == "torch"
    assert C._choose("coarse", x.device, None) == "torch"
    with C.use_backend("triton" if HAS_TRITON else "torch"):
        assert C.get_forced_backend() == ("triton" if HAS_TRITON else "torch")  # code beats env
    monkeypatch.setenv("VALOR_FAST_CONTRASTIVE", "bogus")
    with pytest.raises(ValueError, match="VALOR_FAST_CONTRASTIVE"):
        C.get_forced_backend()
    monkeypatch.delenv("VALOR_FAST_CONTRASTIVE")
    assert C._choose("coarse", torch.device("cpu"), None) == "torch"  # auto on CPU
    with pytest.raises(ValueError, match="backend must be one of"):
        C.set_backend("tpu")
    if not torch.cuda.is_available():
        with C.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
            C.contrastive_loss(x, x, torch.tensor(0.1))


def test_errors_name_the_bad_input():
    t = torch.randn(4, 8)
    with pytest.raises(ValueError, match="equal shape"):
        C.contrastive_loss(t, torch.randn(5, 8), torch.tensor(0.1))
    with pytest.raises(ValueError, match="mode"):
        C.contrastive_loss(t, t, torch.tensor(0.1), mode="medium")
    with pytest.raises(ValueError, match="temperature"):
        C.contrastive_loss(t, t, torch.ones(2))
    txt, v = torch.randn(3, 5, 8), torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="text_weight"):
        C.contrastive_loss(txt, v, torch.tensor(0.1), mode="fine", text_weight=torch.randn(3, 4))
    with pytest.raises(ValueError, match="not plain groups"):
        C.grouped_contrastive_loss(txt, {"v": (v, None, None), "av": ("v", "a")}, torch.tensor(0.1), mode="fine")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_kernel_shape_limits_fall_back_or_raise():
    t = torch.randn(3, 1100, device=DEV)
    assert C._coarse_unsupported(t) is not None
    assert K.MAX_D < 1100  # the dispatcher reads the kernel module's limit
    with pytest.raises(ValueError, match="D=1100"):
        C.TRITON_OPS.coarse_sum(t, t, torch.tensor(0.1, device=DEV))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["coarse", "fine"])
def test_local_loss_path_in_one_process(backend, mode):
    """The local loss (rows vs gathered columns, separate rectangle kernels) against the square
    path: in one process gather_negatives holds this process's tensors (offset 0, world 1), so
    both must give the same loss and gradients while running different kernel calls.  The
    across-process equality is tests/ops/test_distributed_negatives.py."""
    B = 6
    inp = _fine_inputs(B, 5, 3, 1, 16)
    inp.update(pt=_feat(B, 16), pv=_feat(B, 16), pa=_feat(B, 16), va=_valid(B, "random"))

    def run(local):
        x = {k: v.float().requires_grad_() if v.is_floating_point() else v for k, v in inp.items()}
        if mode == "coarse":
            text, groups, kw = x["pt"], {"v": x["pv"], "a": x["pa"]}, {}
        else:
            text = x["text"]
            groups = {"v": (x["v"], x["wv"], x["mv"]), "a": (x["a"], x["wa"], None), "av": ("v", "a")}
            kw = dict(text_weight=x["text_weight"], text_mask=x["text_mask"])
        valid = {"a": x["va"]}
        neg = dist_ops.gather_negatives(text, groups, valid=valid, **kw) if local else None
        with C.use_backend(backend):
            res = C.grouped_contrastive_loss(text, groups, x["temperature"], mode=mode, valid=valid,
                                             negatives=neg, **kw)
        sum((i + 1.0) * v for i, v in enumerate(res.values())).backward()
        return res, {k: v.grad for k, v in x.items() if v.is_floating_point() and v.grad is not None}

    (sq, gsq), (lo, glo) = run(False), run(True)
    assert sq.keys() == lo.keys() and gsq.keys() == glo.keys() and gsq
    for k in sq:
        torch.testing.assert_close(lo[k], sq[k], rtol=1e-5, atol=1e-6)
    for k in gsq:
        torch.testing.assert_close(glo[k], gsq[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_fine_as_the_fsdp_step_calls_it(backend):
    """The fine call of a two-rank bf16 FSDP2 MGA step (tests/train/test_cuda_shaped_step.py):
    fp32 features (the projections' outputs, normalised) with bf16 token / slot weights (FSDP2's
    bf16 parameters), the token axis padded past every caption's real tokens (the gather pads it
    to the longest over ranks), every caption floored (loss.fine_padding "upstream"), and one clip
    without audio (valid drops it from T-A / T-AV).  Each gradient vs float64, within 2x the torch
    backend's error on the same mixed-dtype inputs."""
    B, T, D = 5, 9, 16
    inp = _fine_inputs(B, T, 2, 1, D)
    inp["text_mask"][:, T - 2:] = False  # padding no caption reaches
    floor = torch.ones(B, dtype=torch.bool, device=DEV)
    has_audio = torch.ones(B, dtype=torch.bool, device=DEV)
    has_audio[B - 1] = False
    weights = ("text_weight", "wv", "wa", "temperature")
    inp = {k: v.to(torch.bfloat16).double() if k in weights else v for k, v in inp.items()}
    need = ("text", "text_weight", "v", "wv", "a", "temperature")

    def run(be, low):
        x = {k: (v.to(torch.bfloat16 if k in weights else torch.float32) if low else v).detach()
             .requires_grad_(k in need) if v.is_floating_point() else v for k, v in inp.items()}
        groups = {"v": (x["v"], x["wv"], x["mv"]), "a": (x["a"], x["wa"], None), "av": ("v", "a")}
        with C.use_backend(be):
            res = C.grouped_contrastive_loss(x["text"], groups, x["temperature"], mode="fine",
                                             text_weight=x["text_weight"], text_mask=x["text_mask"],
                                             valid={"a": has_audio, "av": has_audio}, text_floor=floor)
        sum((i + 1.0) * v for i, v in enumerate(res.values())).backward()
        return res, {k: x[k].grad for k in need}
    (ref_o, ref_g), (eag_o, eag_g), (got_o, got_g) = run("torch", False), run("torch", True), run(backend, True)
    for k in ref_o:
        _assert_close(f"{backend} loss {k}", got_o[k], ref_o[k].double(), eag_o[k], torch.float32)
    for k in need:
        dt = torch.bfloat16 if k in weights else torch.float32
        _assert_close(f"{backend} grad {k}", got_g[k], ref_g[k], eag_g[k], dt)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_custom_ops_opcheck():
    """Fake impls + autograd registration are consistent (what torch.compile relies on)."""
    B, T, Mx, My, D = 3, 5, 2, 1, 16
    t, m = torch.randn(B, D, device=DEV), torch.randn(B, D, device=DEV)
    tau = torch.tensor(0.3, device=DEV)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    ops = C.TRITON_OPS
    torch.library.opcheck(ops.coarse_fwd, (t.requires_grad_(), m, tau, None, None, 0, None, None), test_utils=checks)
    valid = torch.tensor([True, False, True], device=DEV)
    torch.library.opcheck(ops.coarse_fwd, (t, m, tau, None, None, 0, valid, None), test_utils=checks)
    text = torch.randn(B, T, D, device=DEV, requires_grad=True)
    x, y = torch.randn(B, Mx, D, device=DEV), torch.randn(B, My, D, device=DEV)
    wt = torch.softmax(torch.randn(B, T, device=DEV), -1)
    mw = torch.rand(3, B, Mx + My, device=DEV)
    tm = torch.ones(B, T, dtype=torch.bool, device=DEV)
    mm = torch.ones(B, Mx + My, dtype=torch.bool, device=DEV)
    torch.library.opcheck(ops.fine_fwd, (text, wt, tm, x, y, mw, mm), test_utils=checks)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_torch_compile_traces_the_kernels():
    if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    t = torch.randn(5, 16, device=DEV, requires_grad=True)
    m = torch.randn(5, 16, device=DEV, requires_grad=True)
    tau = torch.tensor(0.3, device=DEV, requires_grad=True)

    def f(t, m, tau):
        return C.contrastive_loss(t, m, tau)
    with C.use_backend("triton"):
        eager = f(t, m, tau)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(t, m, tau)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    assert t.grad is not None and tau.grad is not None


# ----------------------------------------------------------------------------------------------
# valid masks (samples that leave a group, e.g. clips without audio for T-A / T-AV)
# ----------------------------------------------------------------------------------------------
def _valid(B, kind):
    """A (B,) bool mask: random (at least 2 valid), exactly one, none, or all valid."""
    if kind == "random":
        v = torch.rand(B, device=DEV) > 0.4
        v[torch.randperm(B, device=DEV)[:2]] = True
        v[torch.randperm(B, device=DEV)[:1]] = False
        return v
    v = torch.zeros(B, dtype=torch.bool, device=DEV)
    if kind == "one":
        v[int(torch.randint(B, ()))] = True
    elif kind == "all":
        v[:] = True
    return v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,kind", [(torch.float32, "random"), (torch.bfloat16, "random"),
                                        (torch.float32, "one"), (torch.float32, "none"),
                                        (torch.float16, "all")])
def test_coarse_valid_matches_sub_batch(backend, dtype, kind):
    """The masked loss equals the loss of the valid samples' sub-batch (float64, selected by
    indexing); fewer than two valid samples give exactly 0 and zero gradients."""
    B, D = 9, 16
    inputs = dict(text=_feat(B, D), modal=_feat(B, D), temperature=_temp(), valid=_valid(B, kind))
    need = ("text", "modal", "temperature")
    _compare(lambda **k: C.contrastive_loss(**k, mode="coarse"),
             lambda **k: K.contrastive_loss_ref(**k, mode="coarse"), inputs, need, backend, dtype)
    if kind in ("one", "none"):
        xs = {k: v.float().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
        with C.use_backend(backend):
            loss = C.contrastive_loss(xs["text"], xs["modal"], xs["temperature"], valid=xs["valid"])
        loss.backward()
        assert float(loss.detach()) == 0.0
        assert all(float(xs[k].grad.abs().max()) == 0.0 for k in need)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,kinds", [(torch.bfloat16, ("all", "random", "random")),
                                         (torch.float32, ("random", "one", "none"))])
def test_grouped_valid_matches_sub_batch(backend, dtype, kinds):
    """Fine T-V / T-A / T-AV (one fused pass) and coarse groups, each with its own mask."""
    B = 7
    inp = _fine_inputs(B, 7, 3, 1, 16)
    inp.update(vv=_valid(B, kinds[0]), va=_valid(B, kinds[1]), vav=_valid(B, kinds[2]),
               pv=_feat(B, 16), pa=_feat(B, 16), pt=_feat(B, 16))

    def fn(ref):
        def f(text, text_weight, text_mask, v, wv, mv, a, wa, temperature, vv, va, vav, pv, pa, pt):
            g = K.grouped_contrastive_loss_ref if ref else C.grouped_contrastive_loss
            groups = {"v": (v, wv, mv), "a": (a, wa, None), "av": ("v", "a")}
            fine = g(text, groups, temperature, mode="fine", text_weight=text_weight, text_mask=text_mask,
                     valid={"v": vv, "a": va, "av": vav})
            coarse = g(pt, {"v": pv, "a": pa}, temperature, mode="coarse", valid={"a": va})
            return {**fine, **{"c" + k: x for k, x in coarse.items()}}
        return f
    need = _NEED_FINE + ("pv", "pa", "pt")
    _compare(fn(False), fn(True), inp, need, backend, dtype)


def test_valid_errors_name_the_bad_input():
    t = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"valid must be a \(4,\) bool"):
        C.contrastive_loss(t, t, torch.tensor(0.1), valid=torch.ones(4))
    with pytest.raises(ValueError, match=r"valid\['a'\]"):
        C.grouped_contrastive_loss(t, {"a": t}, torch.tensor(0.1), mode="coarse",
                                   valid={"a": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'x', which is not among the groups"):
        C.grouped_contrastive_loss(t, {"a": t}, torch.tensor(0.1), mode="coarse",
                                   valid={"x": torch.ones(4, dtype=torch.bool)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_masks_never_sync_with_the_host(backend):
    """No .item() / bool() / nonzero on the masked path (forward and backward): counted as
    aten._local_scalar_dense / nonzero calls under a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.hits = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
                self.hits.append(str(func))
            return func(*args, **(kwargs or {}))

    B = 6
    inp = _fine_inputs(B, 5, 3, 1, 16)
    x = {k: v.float().requires_grad_() if v.is_floating_point() else v for k, v in inp.items()}
    va = _valid(B, "random")
    pt, pa = _feat(B, 16).float().requires_grad_(), _feat(B, 16).float().requires_grad_()
    groups = {"v": (x["v"], x["wv"], x["mv"]), "a": (x["a"], x["wa"], None), "av": ("v", "a")}
    with C.use_backend(backend), Count() as c:
        fine = C.grouped_contrastive_loss(x["text"], groups, x["temperature"], mode="fine",
                                          text_weight=x["text_weight"], text_mask=x["text_mask"],
                                          valid={"a": va, "av": va})
        coarse = C.contrastive_loss(pt, pa, x["temperature"], valid=va)
        (sum(fine.values()) + coarse).backward()
    assert not c.hits, f"host syncs on the masked path: {c.hits}"


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_torch_compile_traces_the_masked_kernels():
    """valid masks enter the custom op as tensors: fullgraph traces them, no graph break, also
    when the compiled call is the first (availability is probed at import, not in the trace)."""
    if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    B = 7
    xs = [torch.randn(B, 16, device=DEV, requires_grad=True) for _ in range(2)]
    tau = torch.tensor(0.3, device=DEV, requires_grad=True)
    valid = _valid(B, "random")

    def f(t, m, tau, valid):
        return C.grouped_contrastive_loss(t, {"v": m, "a": m}, tau, mode="coarse", valid={"a": valid})
    with C.use_backend("triton"):  # compiled first: nothing lazy may be left for the trace
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*xs, tau, valid)
        eager = f(*xs, tau, valid)
        sum(compiled.values()).backward()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k])
    assert all(x.grad is not None for x in xs) and tau.grad is not None


# ----------------------------------------------------------------------------------------------
# text_floor: upstream's padded max (docs/upstream.md P1)
# ----------------------------------------------------------------------------------------------
def _floor_inputs(B, T, Mv, Ma, D):
    """Fine inputs plus a (B,) text_floor mask that bites: the single-token caption (B // 2) is
    floored and clip 0's first frame is opposite its token (a best real match of -1)."""
    inp = _fine_inputs(B, T, Mv, Ma, D)
    fl = torch.rand(B, device=DEV) > 0.5
    fl[B // 2], fl[0] = True, False
    inp["text_floor"] = fl
    inp["v"][0, 0] = -inp["text"][B // 2, 0]
    inp["mv"][0, 0] = True
    return inp


def test_text_floor_reference_is_upstreams_masked_product():
    """fine_similarity_ref with text_floor = "the caption is padded" equals upstream's formula
    (similarities multiplied by the 0/1 masks, tests/upstream_ref.py fine_matrix, an independent
    re-derivation), forward and gradients in float64; without the floor it is our exclusion rule."""
    import upstream_ref as R  # tests/ is on sys.path under pytest
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    B, T, M, D = 6, 7, 4, 16
    text = R.norm(torch.randn(B, T, D, generator=g, dtype=torch.float64)).requires_grad_()
    z = R.norm(torch.randn(B, M, D, generator=g, dtype=torch.float64)).requires_grad_()
    wt = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_()
    wz = torch.randn(B, M, generator=g, dtype=torch.float64).requires_grad_()
    lens = torch.tensor([7, 1, 3, 5, 7, 2])
    tm = torch.arange(T)[None] < lens[:, None]
    with torch.no_grad():
        z[0, 0] = -text[1, 0]  # caption 1's only token: its best real match is -1 for this frame
    ones = torch.ones(B, M, dtype=torch.float64)
    for padded_max in (True, False):
        floor = (lens < T) if padded_max else None
        ours = K.fine_similarity_ref(text, wt, tm, z, wz, None, floor)
        theirs = R.fine_matrix(text, z, tm.double(), ones, wt, wz, padded_max=padded_max)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
        w = torch.rand(B, B, generator=g, dtype=torch.float64)
        g_ours = torch.autograd.grad((ours * w).sum(), (text, z, wt, wz))
        g_theirs = torch.autograd.grad((theirs * w).sum(), (text, z, wt, wz))
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert float((K.fine_similarity_ref(text, wt, tm, z, wz, None, lens < T)
                  - K.fine_similarity_ref(text, wt, tm, z, wz, None)).detach().abs().max()) > 1e-3, "the floor never bit"


def _floor_hand_case():
    """1 caption x 1 clip, D = 2.  Text: (1, 0) real, (5, 5) padded.  Clip: (-1, 0), (0, 1), uniform.
    Token sims of the real token: -1, 0.  Text side: max = 0 (slot 1), weight 1.  Modal side: each
    slot's best real text token: -1, 0; floored: 0, 0 (slot 1's exact 0 is a tie with the floor,
    kept by the real token).
      no floor: S = 1/2 [0 + (-1 + 0)/2] = -0.25, dS/dtext_0 = 1/2 (0,1) + 1/4 (-1,0) + 1/4 (0,1)
      floor:    S = 1/2 [0 + ( 0 + 0)/2] =  0,    dS/dtext_0 = 1/2 (0,1) +            1/4 (0,1)"""
    text = torch.tensor([[[1., 0.], [5., 5.]]], device=DEV)
    tm = torch.tensor([[True, False]], device=DEV)
    modal = torch.tensor([[[-1., 0.], [0., 1.]]], device=DEV)
    want = {False: (-0.25, (-0.25, 0.75), ((-0.25, 0.0), (0.0, 0.75))),
            True: (0.0, (0.0, 0.75), ((0.0, 0.0), (0.0, 0.75)))}
    return text, tm, modal, want


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_floor_hand_computed(backend):
    text0, tm, modal0, want = _floor_hand_case()
    for floor in (False, True):
        text, modal = text0.clone().requires_grad_(), modal0.clone().requires_grad_()
        fl = torch.tensor([floor], device=DEV)
        with C.use_backend(backend):
            S = C.fine_similarity(text, None, tm, modal, None, None, fl)
        S.sum().backward()
        s, d_tok, d_modal = want[floor]
        assert abs(float(S.detach()) - s) < 1e-6, (backend, floor, float(S.detach()))
        torch.testing.assert_close(text.grad[0, 0].double().cpu(), torch.tensor(d_tok, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
        assert float(text.grad[0, 1].abs().max()) == 0.0, "a padded token got a gradient"
        # d S / d clip tokens: slot 0 = 1/4 (1, 0) from the modal side unless floored; slot 1 =
        # 1/2 (1, 0) text side + 1/4 (1, 0) modal side
        d0 = (0.0, 0.0) if floor else (0.25, 0.0)
        torch.testing.assert_close(modal.grad[0].double().cpu(), torch.tensor([d0, (0.75, 0.0)], dtype=torch.float64),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,B", [(torch.float32, 5), (torch.bfloat16, 7), (torch.float16, 5),
                                     (torch.bfloat16, 13)])
def test_grouped_fine_text_floor_matches_reference(backend, dtype, B):
    """T-V, T-A, T-AV with a per-text floor (the fused pass and the materialised three-part
    concatenation), every gradient, against float64."""
    inp = _floor_inputs(B, 7, 3, 1, 16 if B == 13 else 32)

    def fn(ref):
        def f(text, text_weight, text_mask, v, wv, mv, a, wa, temperature, text_floor):
            g = K.grouped_contrastive_loss_ref if ref else C.grouped_contrastive_loss
            groups = {"v": (v, wv, mv), "a": (a, wa, None), "av": ("v", "a")}
            if B == 5:
                groups["ava"] = ("a", "v", "a")
            return g(text, groups, temperature, mode="fine", text_weight=text_weight, text_mask=text_mask,
                     text_floor=text_floor)
        return f
    _compare(fn(False), fn(True), inp, _NEED_FINE, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_similarity_text_floor_matches_reference(backend):
    inp = _floor_inputs(6, 7, 3, 1, 16)
    w = torch.rand(6, 6, dtype=torch.float64, device=DEV) + 0.5  # a distinct upstream gradient per pair

    def fn(ref):
        def f(text, text_weight, text_mask, v, wv, mv, text_floor):
            S = (K.fine_similarity_ref if ref else C.fine_similarity)(text, text_weight, text_mask, v, wv, mv,
                                                                      text_floor)
            return {"weighted S": (S * w.to(S.dtype)).sum(), "S[B//2]": S[3].sum(), "S[:, 0]": S[:, 0].sum()}
        return f
    _compare(fn(False), fn(True), {k: inp[k] for k in ("text", "text_weight", "text_mask", "v", "wv", "mv",
                                                         "text_floor")},
             ("text", "text_weight", "v", "wv"), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_floor_local_loss_path_in_one_process(backend):
    """text_floor through gather_negatives (Negatives.text_floor) equals the square path."""
    B = 6
    inp = _floor_inputs(B, 5, 3, 1, 16)

    def run(local):
        x = {k: v.float().requires_grad_() if v.is_floating_point() else v for k, v in inp.items()}
        groups = {"v": (x["v"], x["wv"], x["mv"]), "a": (x["a"], x["wa"], None), "av": ("v", "a")}
        kw = dict(text_weight=x["text_weight"], text_mask=x["text_mask"], text_floor=x["text_floor"])
        neg = dist_ops.gather_negatives(x["text"], groups, **kw) if local else None
        with C.use_backend(backend):
            res = C.grouped_contrastive_loss(x["text"], groups, x["temperature"], mode="fine", negatives=neg, **kw)
        sum((i + 1.0) * v for i, v in enumerate(res.values())).backward()
        return res, {k: v.grad for k, v in x.items() if v.is_floating_point() and v.grad is not None}

    (sq, gsq), (lo, glo) = run(False), run(True)
    assert sq.keys() == lo.keys() and gsq.keys() == glo.keys() and gsq
    for k in sq:
        torch.testing.assert_close(lo[k], sq[k], rtol=1e-5, atol=1e-6)
    for k in gsq:
        torch.testing.assert_close(glo[k], gsq[k], rtol=1e-5, atol=1e-6)


def test_text_floor_errors_name_the_bad_input():
    txt, v = torch.randn(3, 5, 8), torch.randn(3, 2, 8)
    tau = torch.tensor(0.1)
    with pytest.raises(ValueError, match=r"text_floor must be a \(3,\) bool"):
        C.fine_similarity(txt, None, None, v, None, None, torch.ones(3))
    with pytest.raises(ValueError, match=r"text_floor must be a \(3,\) bool"):
        C.contrastive_loss(txt, v, tau, mode="fine", text_floor=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_floor is for mode='fine'"):
        C.contrastive_loss(txt[:, 0], v[:, 0], tau, text_floor=torch.ones(3, dtype=torch.bool))
    groups = {"v": (v, None, None)}
    neg = dist_ops.gather_negatives(txt, groups)
    with pytest.raises(ValueError, match="pass the same text_floor to gather_negatives"):
        C.grouped_contrastive_loss(txt, groups, tau, mode="fine", negatives=neg,
                                   text_floor=torch.ones(3, dtype=torch.bool))
    assert K.upstream_text_floor(torch.tensor([[True] * 3 + [False], [True] * 4]), 4).tolist() == [True, False]


# ----------------------------------------------------------------------------------------------
# 16-bit gradient products: why hi + lo (kernels/contrastive.py `_precisions`)
# ----------------------------------------------------------------------------------------------
def _mismatch_share(gprec, a, b, temp, scale):
    """Share of bf16 dA elements that differ from round(float64 truth) with gradient products
    `gprec` ("hilo" | "single"), the coarse gradient of the square loss (P with both lse terms)."""
    old = K._GPREC_OVERRIDE
    K._GPREC_OVERRIDE = gprec
    try:
        lse_a, _ = K.coarse_lse(a, b, temp)
        lse_b, _ = K.coarse_lse(b, a, temp)
        da, _ = K.coarse_grad(a, b, temp, scale, lse_a, lse_b, 0, 2.0, False)
    finally:
        K._GPREC_OVERRIDE = old
    a64, b64 = a.double(), b.double()
    z = a64 @ b64.t() / temp.double()
    p = (z - z.logsumexp(1, keepdim=True)).exp() + (z - z.logsumexp(0, keepdim=True)).exp() \
        - 2 * torch.eye(a.shape[0], dtype=torch.float64)
    truth = (scale.double() * p @ b64).to(torch.bfloat16)
    return float((da != truth).double().mean())


@pytest.mark.skipif(not HAS_TRITON or DEV.type != "cpu", reason="the interpreter's emulated products")
def test_gradient_products_single_rounding_is_too_coarse():
    """One bf16 rounding of P before its MMA moves many more gradient elements off the correctly
    rounded value than the hi + lo pair the kernels use (the csrc kernels measured 15-57% against
    <= 1.3%, tests/csrc/test_csrc_contrastive.py)."""
    B, D = 24, 40
    a, b = _feat(B, D).to(torch.bfloat16), _feat(B, D).to(torch.bfloat16)
    temp = torch.tensor([0.07], dtype=torch.float32)
    scale = torch.tensor([1.0 / (2 * B)], dtype=torch.float32)
    hilo = _mismatch_share("hilo", a, b, temp, scale)
    single = _mismatch_share("single", a, b, temp, scale)
    assert hilo <= 0.05, f"hi + lo: {hilo:.1%} of the elements off round(float64)"
    assert single > hilo + 0.05, f"single rounding {single:.1%} vs hi + lo {hilo:.1%}"


@pytest.mark.parametrize("arch", [K.A100, K.H100], ids=["sm_80", "sm_90a"])
def test_fine_launch_padding_share_at_valor_shape(arch):
    """Issue 17: at VALOR's fine shape (T = 40, 4 frames + 1 audio, D = 512) the default launch of
    the forward, d_text and d_modal wastes < 25% of its similarity MMAs on padding on both archs
    (on sm_90a every 16-bit d_modal config does: its set is the packed tile alone, kernels/
    contrastive.py `fine_configs`).  Checked on the configurations themselves: no compile here
    (bench/audit_contrastive.py records the same share beside registers and spills)."""
    packed = 1 - 120 * 5 / (128 * 6)  # 21.9%: 3 texts x 40 in 128 rows, the audio slot padded to 2
    for dt in (torch.bfloat16, torch.float16):
        share = {k: K.fine_waste(40, 4, 1, **K.fine_configs(k, 40, 4, 1, 512, dt, arch)[0])
                 for k in ("fwd", "text", "modal")}
        assert share["fwd"] == pytest.approx(1 - 120 / 128)  # 8 idle rows, no padded slot
        assert share["text"] == pytest.approx(packed)
        assert share["modal"] == pytest.approx(packed)
        assert max(share.values()) < 0.25
        modal = K.fine_configs("modal", 40, 4, 1, 512, dt, arch)
        # sm_90a: one MMA over K = 2R for the hi + lo pair (`_gmma` HILO_K2), sm_80 two
        assert all(c["HILO_K2"] is (arch.cc >= 90) for c in modal)
        if arch.cc >= 90:
            assert all(K.fine_waste(40, 4, 1, **c) == pytest.approx(packed) for c in modal)


@pytest.mark.skipif(not HAS_TRITON or DEV.type != "cpu", reason="the interpreter's launch configuration")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fine_modal_grad_both_hilo_forms(dtype, monkeypatch):
    """d_modal's 16-bit hi + lo gradient product in the form sm_80 compiles (two MMAs) against
    float64; every other fine test runs the interpreter's default, sm_90a's form (one MMA over
    K = 2R of the interleaved pair, `_gmma` HILO_K2)."""
    assert K.fine_configs("modal", 7, 3, 1, 32, dtype, None)[0]["HILO_K2"] is True
    monkeypatch.setattr(K, "_FINE_HILO_K2", False)
    assert K.fine_configs("modal", 7, 3, 1, 32, dtype, None)[0]["HILO_K2"] is False
    inp = _floor_inputs(7, 7, 3, 1, 32)

    def fn(ref):
        def f(text, text_weight, text_mask, v, wv, mv, a, wa, temperature, text_floor):
            g = K.grouped_contrastive_loss_ref if ref else C.grouped_contrastive_loss
            groups = {"v": (v, wv, mv), "a": (a, wa, None), "av": ("v", "a")}
            return g(text, groups, temperature, mode="fine", text_weight=text_weight, text_mask=text_mask,
                     text_floor=text_floor)
        return f
    _compare(fn(False), fn(True), inp, _NEED_FINE, "triton", dtype)
