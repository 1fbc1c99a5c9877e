"""kernels/lm_head_ce.py (vocabulary-chunked LM head + cross-entropy) through the dispatcher with
each backend forced: forward and every gradient against float64, and under bf16 autocast with an
fp32 tied weight (bound: tests/_fused_check.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch/triton are imported

import pytest  # noqa: E402
import torch  # noqa: E402

import valor_fast.kernels.lm_head_ce as k_lm  # noqa: E402
from valor_fast.ops import fused  # noqa: E402
from _fused_check import BACKENDS, DTYPES, _check_all, _compare  # noqa: E402

pytestmark = pytest.mark.usefixtures("kernel_device")   # VALOR_FAST_TEST_DEVICE=cuda: on the GPU


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
