"""CoAVT and VLSA models: token layout, shapes at the tiny size (CPU) and the paper size (meta
device), parameter counts against closed forms, and the properties the architecture promises
(audio / video streams kept apart until the joint layer, masked patches invisible, cached
greedy decoding equal to the uncached argmax)."""
import pytest
import torch

from valor_fast.model.coavt import CoAVT, coavt_args, count_parameters as coavt_count
from valor_fast.model.patch_embed import AudioPatchEmbed, VideoPatchEmbed, patchify_audio, patchify_video
from valor_fast.model.vlsa import VLSA, vlsa_args, count_parameters as vlsa_count


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: tiny matmuls run ~10x faster without intra-op thread contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _small_coavt(**over):
    kw = dict(image_size=32, max_frames=3, audio_mel_bins=32, audio_frames=48, width=64, heads=2,
              vocab_size=1000, query_count=5)
    kw.update(over)
    return CoAVT(coavt_args("tiny", **kw)).eval()


def _small_vlsa(**over):
    kw = dict(image_size=32, max_frames=3, audio_mel_bins=32, audio_frames=48, width=64, heads=2, vocab_size=1000)
    kw.update(over)
    return VLSA(vlsa_args("tiny", **kw)).eval()


# ------------------------------------------------------------------------------------------------
# patch layout
# ------------------------------------------------------------------------------------------------
def test_patchify_follows_the_patch_projection_order():
    """Conv2d(stride=p) tokens == patchify(input) @ W^T: the reconstruction targets line up with
    the tokens they are predicted from (video row-major per frame, audio mel-major per slice)."""
    p, D = 4, 7
    ve = VideoPatchEmbed(12, p, D, max_frames=2)
    video = torch.randn(2, 2, 3, 12, 12, dtype=torch.float64)
    ve.double()
    conv = ve.proj(video.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(2, -1, D)
    lin = patchify_video(video, p) @ ve.proj.weight.reshape(D, -1).t() + ve.proj.bias
    torch.testing.assert_close(conv, lin)
    ae = AudioPatchEmbed(8, 12, p, D, max_slices=2).double()
    audio = torch.randn(2, 2, 12, 8, dtype=torch.float64)   # (B, S, frames, mel)
    x = audio.flatten(0, 1).transpose(1, 2).unsqueeze(1)
    conv = ae.proj(x).flatten(2).transpose(1, 2).reshape(2, -1, D)
    lin = patchify_audio(audio, p) @ ae.proj.weight.reshape(D, -1).t() + ae.proj.bias
    torch.testing.assert_close(conv, lin)
    # one patch by hand: slice 1, mel block 1, time block 2 of clip 0
    k = 1 * (2 * 3) + 1 * 3 + 2
    torch.testing.assert_close(patchify_audio(audio, p)[0, k], audio[0, 1, 8:12, 4:8].t().reshape(-1))


def test_patch_embed_errors_name_the_input():
    ve = VideoPatchEmbed(16, 8, 4, max_frames=2)
    with pytest.raises(ValueError, match="frames are"):
        ve(torch.zeros(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="exceed the 2 frame"):
        ve(torch.zeros(1, 3, 3, 16, 16))
    with pytest.raises(ValueError, match="without a \\[MASK\\]"):
        ve(torch.zeros(1, 1, 3, 16, 16), torch.zeros(1, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# CoAVT
# ------------------------------------------------------------------------------------------------
def test_coavt_tiny_shapes_and_stream_separation():
    m = _small_coavt()
    a = m.args
    B, n, S = 3, 2, 1
    video, audio = torch.randn(B, n, 3, 32, 32), torch.randn(B, S, 48, 32)
    s = m.encode_av(video, audio)
    La = S * (32 // 16) * (48 // 16)
    Lv = n * (32 // 16) ** 2
    assert s["a"].shape == (B, La, a.width) and s["v"].shape == (B, Lv, a.width)
    assert s["av"].shape == (B, La + Lv, a.width) and s["av_mask"] is None
    # the "a" stream never sees the video and the "v" stream never the audio; "av" mixes them
    s2 = m.encode_av(video + torch.randn_like(video), audio)
    torch.testing.assert_close(s2["a"], s["a"])
    assert not torch.allclose(s2["v"], s["v"])
    assert not torch.allclose(s2["av"][:, :La], s["av"][:, :La])
    q = m.queries(s["av"])
    assert q.shape == (B, a.query_count, a.width)
    ids = torch.randint(999, 1000, (B, 6))
    mask = torch.ones(B, 6, dtype=torch.bool)
    th = m.encode_text(ids, mask)
    assert m.match_logits(s["av"], None, th, mask).shape == (B, 2)
    assert m.decode(ids, mask, q).shape == (B, 6, a.width)
    tok, w = m.query_features(q)
    assert tok.shape == (B, a.query_count, a.contra_dim) and w.shape == (B, a.query_count)
    torch.testing.assert_close(tok.norm(dim=-1), torch.ones(B, a.query_count))


def test_coavt_missing_audio_is_masked_in_the_joint_stream():
    m = _small_coavt()
    B = 2
    video, audio = torch.randn(B, 1, 3, 32, 32), torch.randn(B, 1, 48, 32)
    ha = torch.tensor([True, False])
    s = m.encode_av(video, audio, ha)
    La = 6
    assert s["av_mask"].shape == (B, La + 4) and not bool(s["av_mask"][1, :La].any())
    # clip 1's video tokens in "av" ignore its (masked) audio entirely
    s2 = m.encode_av(video, audio + torch.randn_like(audio) * torch.tensor([0.0, 1.0])[:, None, None, None], ha)
    torch.testing.assert_close(s2["av"][1, La:], s["av"][1, La:])


def test_coavt_generate_cached_equals_uncached_argmax():
    m = _small_coavt()
    video, audio = torch.randn(2, 1, 3, 32, 32), torch.randn(2, 1, 48, 32)
    caps = m.generate(video, audio, max_len=5, eos=-1)          # eos never produced: 5 tokens each
    q = m.queries(m.encode_av(video, audio)["av"])
    ids = torch.full((2, 1), 101)
    for _ in range(5):
        h = m.decode(ids, None, q)
        ids = torch.cat([ids, m.text.logits(h[:, -1]).argmax(-1, keepdim=True)], 1)
    assert caps == ids[:, 1:].tolist()


def _block_params(C: int, ffn: int) -> int:
    # pre-norm block: q/k/v/o (C*C + C each), fc1 + fc2, two LayerNorms
    return 4 * (C * C + C) + (C * ffn + ffn) + (ffn * C + C) + 4 * C


def test_coavt_paper_size_shapes_on_meta_and_counts():
    a = coavt_args("coavt")
    with torch.device("meta"):
        m = CoAVT(a)
        B = 2
        s = m.encode_av(torch.empty(B, 10, 3, 224, 224), torch.empty(B, 2, 512, 128))
        assert s["a"].shape == (B, 512, 768) and s["v"].shape == (B, 10 * 196, 768)
        assert m.queries(s["av"]).shape == (B, 32, 768)
        ids = torch.zeros(B, 40, dtype=torch.long)
        mask = torch.ones(B, 40, dtype=torch.bool)
        th = m.encode_text(ids, mask)
        assert th.shape == (B, 40, 768)
        assert m.match_logits(s["av"], None, th, mask).shape == (B, 2)
    assert [len(b) for b in m.transformer_blocks()] == [11, 11, 1, 12, 12]
    c = coavt_count(m)
    C, F_ = 768, 3072
    assert c["vision"] == 11 * _block_params(C, F_) + (3 * 256 * C + C) + 196 * C + 10 * C
    assert c["audio"] == 11 * _block_params(C, F_) + (256 * C + C) + 512 // 2 * C + 2 * C
    # joint: shared attention + MLP, LayerNorms per stream (2 a block x 3 streams) + final norms
    assert c["joint"] == (_block_params(C, F_) - 4 * C) + 2 * 3 * 2 * C + 3 * 2 * C + 2 * C
    assert c["total"] == sum(p.numel() for p in m.parameters())
    assert 380e6 < c["total"] < 420e6


# ------------------------------------------------------------------------------------------------
# VLSA
# ------------------------------------------------------------------------------------------------
def test_vlsa_tiny_shapes_and_masked_patches_are_invisible():
    m = _small_vlsa(global_tokens=2)
    B, n = 2, 2
    video = torch.randn(B, n, 3, 32, 32)
    Nv = n * 4
    mask = torch.zeros(B, Nv, dtype=torch.bool)
    mask[:, 1::3] = True
    g, h = m.encode_video(video, mask)
    assert g.shape == (B, 2, 64) and h.shape == (B, Nv, 64)
    # change the pixels of a masked patch (frame 0, patch 1: rows 0-15, cols 16-31): no effect
    v2 = video.clone()
    v2[:, 0, :, :16, 16:] += 5.0
    g2, h2 = m.encode_video(v2, mask)
    torch.testing.assert_close(g2, g)
    torch.testing.assert_close(h2, h)
    g3, _ = m.encode_video(v2)          # unmasked, the same change is seen
    assert not torch.allclose(g3, g)
    ids = torch.randint(999, 1000, (B, 5))
    tm = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    gt, ht = m.encode_text(ids, tm)
    assert gt.shape == (B, 2, 64) and ht.shape == (B, 5, 64)
    ga, ha = m.encode_audio(torch.randn(B, 1, 48, 32))
    assert ha.shape == (B, 6, 64)
    f = m.global_feature("audio", m.pooled(ga, ha))
    assert f.shape == (B, m.args.contra_dim)
    assert m.gam_logits("video", ga.mean(1), g.mean(1)).shape == (B,)


def test_vlsa_paper_size_shapes_on_meta_and_counts():
    a = vlsa_args("vlsa")
    with torch.device("meta"):
        m = VLSA(a)
        g, h = m.encode_video(torch.empty(2, 8, 3, 224, 224), torch.zeros(2, 8 * 196, dtype=torch.bool))
        assert g.shape == (2, 1, 768) and h.shape == (2, 8 * 196, 768)
        ga, ha = m.encode_audio(torch.empty(2, 2, 512, 128))
        assert ha.shape == (2, 512, 768)
        gt, ht = m.encode_text(torch.zeros(2, 40, dtype=torch.long), torch.ones(2, 40, dtype=torch.bool))
        assert ht.shape == (2, 40, 768)
        assert m.video_head(h).shape[-1] == 3 * 16 * 16 and m.audio_head(ha).shape[-1] == 256
    assert [len(b) for b in m.transformer_blocks()] == [12]
    c = vlsa_count(m)
    assert c["transformer"] == 12 * _block_params(768, 3072) + 2 * 768
    assert c["total"] == sum(p.numel() for p in m.parameters())
    assert 100e6 < c["total"] < 130e6


def test_size_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown CoAVT size"):
        coavt_args("huge")
    with pytest.raises(ValueError, match="wdth"):
        vlsa_args("tiny", wdth=3)
