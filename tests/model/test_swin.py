"""Video Swin (valor_fast/model/swin.py) and its weight loading (convert_swin.py).

The model is checked against an independent eager implementation written here, window by window
with Python loops (bias looked up by relative offset, the shifted-window mask from which tokens
wrapped around in the roll), in float64; window helpers against direct constructions; loading
against a synthetic state dict with the public Video Swin key names; and a tiny Swin VALOR trains
on the embedded synthetic data.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch / triton are imported

import importlib  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from valor_fast.config import load_config  # noqa: E402
from valor_fast.model.args import model_config  # noqa: E402
from valor_fast.model.convert_swin import load_swin, resize_bias_table, swin_to_ours  # noqa: E402
from valor_fast.model.swin import (  # noqa: E402
    SWIN_SIZES, VideoSwin, clip_window, compute_mask, relative_position_index, swin_arch, window_partition,
    window_reverse)
from valor_fast.model.valor import VALOR, count_parameters  # noqa: E402

A = importlib.import_module("valor_fast.ops.attention")

SMALL = dict(embed_dim=16, depths=(2, 2), heads=(2, 4), window=(2, 4, 4), drop_path=0.0)


# ----------------------------------------------------------------------------------------------
# windows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ws", [(2, 4, 4), (1, 3, 5), (4, 2, 2)])
def test_window_partition_roundtrip(ws):
    B, C = 2, 5
    D, H, W = ws[0] * 2, ws[1] * 3, ws[2] * 2
    x = torch.randn(B, D, H, W, C)
    win = window_partition(x, ws)
    nW = (D // ws[0]) * (H // ws[1]) * (W // ws[2])
    assert win.shape == (B * nW, ws[0] * ws[1] * ws[2], C)
    assert torch.equal(window_reverse(win, ws, B, D, H, W), x)
    # window order: clip-major, then (d, h, w) window-major; tokens (d, h, w) inside a window
    b, a, i, j = 1, 1, 2, 1
    w_id = b * nW + (a * (H // ws[1]) + i) * (W // ws[2]) + j
    direct = x[b, a * ws[0]:(a + 1) * ws[0], i * ws[1]:(i + 1) * ws[1], j * ws[2]:(j + 1) * ws[2]]
    assert torch.equal(win[w_id], direct.reshape(-1, C))


def _mask_direct(D, H, W, ws, ss):
    """Shifted-window mask built token pair by token pair: after rolling the padded grid back by
    ss, the token at rolled position p came from (p + s) mod P; two tokens of a window may attend
    iff, in every dimension, both or neither wrapped around."""
    nd, nh, nw = D // ws[0], H // ws[1], W // ws[2]
    N = ws[0] * ws[1] * ws[2]
    out = torch.zeros(nd * nh * nw, N, N)
    for a in range(nd):
        for i in range(nh):
            for j in range(nw):
                toks = [(a * ws[0] + d, i * ws[1] + h, j * ws[2] + w)
                        for d in range(ws[0]) for h in range(ws[1]) for w in range(ws[2])]
                wrap = [tuple(p + s >= P for p, s, P in zip(t, ss, (D, H, W))) for t in toks]
                for m in range(N):
                    for n in range(N):
                        if wrap[m] != wrap[n]:
                            out[(a * nh + i) * nw + j, m, n] = -100.0
    return out


@pytest.mark.parametrize("D,H,W,ws,ss", [(4, 8, 8, (2, 4, 4), (1, 2, 2)), (2, 6, 9, (2, 3, 3), (0, 1, 1)),
                                         (6, 4, 4, (3, 4, 4), (1, 0, 0))])
def test_shifted_window_mask_matches_direct_construction(D, H, W, ws, ss):
    got = compute_mask(D, H, W, ws, ss, torch.device("cpu"))
    assert torch.equal(got, _mask_direct(D, H, W, ws, ss))
    assert (got == 0).any() and (got == -100).any()


def test_window_clipping_and_shift():
    assert clip_window((4, 56, 56), (8, 7, 7), (4, 3, 3)) == ((4, 7, 7), (0, 3, 3))  # VALOR-B stage 1
    assert clip_window((4, 7, 7), (8, 7, 7), (4, 3, 3)) == ((4, 7, 7), (0, 0, 0))    # stage 4: one window
    assert clip_window((16, 14, 14), (8, 7, 7), (4, 3, 3)) == ((8, 7, 7), (4, 3, 3))


def _rel_index_loop(window):
    wd, wh, ww = window
    toks = [(d, h, w) for d in range(wd) for h in range(wh) for w in range(ww)]
    return torch.tensor([[(a[0] - b[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1) + (a[1] - b[1] + wh - 1) * (2 * ww - 1)
                          + (a[2] - b[2] + ww - 1) for b in toks] for a in toks])


def test_relative_position_index_and_clipped_bias():
    assert torch.equal(relative_position_index((2, 3, 4)), _rel_index_loop((2, 3, 4)))
    blk = VideoSwin(**SMALL).blocks[0]
    table = blk.attn.relative_position_bias_table  # window (2, 4, 4)
    for ws in [(2, 4, 4), (1, 3, 2), (2, 2, 4)]:
        got = blk.attn.position_bias(ws)  # (H, N, N)
        toks = [(d, h, w) for d in range(ws[0]) for h in range(ws[1]) for w in range(ws[2])]
        for m, a in enumerate(toks):
            for n, b in enumerate(toks):
                row = (a[0] - b[0] + 1) * 7 * 7 + (a[1] - b[1] + 3) * 7 + (a[2] - b[2] + 3)
                assert torch.equal(got[:, m, n], table[row])


# ----------------------------------------------------------------------------------------------
# the model vs an eager window-by-window reference
# ----------------------------------------------------------------------------------------------
def _ref_attention(attn, tokens, ws, table_window, wrap):
    """One window (N, C): softmax(q k^T / sqrt(hd) + table[offset] + mask) v, projected."""
    N, C = tokens.shape
    Hh = attn.heads
    qkv = F.linear(tokens, attn.qkv.weight, attn.qkv.bias).view(N, 3, Hh, C // Hh).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]                                   # (H, N, hd)
    wd, wh, ww = table_window
    toks = [(d, h, w) for d in range(ws[0]) for h in range(ws[1]) for w in range(ws[2])]
    bias = torch.empty(Hh, N, N, dtype=tokens.dtype)
    for m, a in enumerate(toks):
        for n, b in enumerate(toks):
            row = ((a[0] - b[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1) + (a[1] - b[1] + wh - 1) * (2 * ww - 1)
                   + (a[2] - b[2] + ww - 1))
            bias[:, m, n] = attn.relative_position_bias_table[row]
            if wrap is not None and wrap[m] != wrap[n]:
                bias[:, m, n] -= 100.0
    s = q @ k.transpose(-1, -2) * (C // Hh) ** -0.5 + bias
    out = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(N, C)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def _ref_block(blk, x):
    B, D, H, W, C = x.shape
    ws, ss = list(blk.window), list(blk.shift)
    for i, n in enumerate((D, H, W)):  # a dimension the window covers: one window, no shift
        if n <= ws[i]:
            ws[i], ss[i] = n, 0
    h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    P = [n + (-n % w) for n, w in zip((D, H, W), ws)]
    h = F.pad(h, (0, 0, 0, P[2] - W, 0, P[1] - H, 0, P[0] - D))
    h = torch.roll(h, shifts=[-s for s in ss], dims=(1, 2, 3))
    out = torch.zeros_like(h)
    for b in range(B):
        for a in range(0, P[0], ws[0]):
            for i in range(0, P[1], ws[1]):
                for j in range(0, P[2], ws[2]):
                    win = h[b, a:a + ws[0], i:i + ws[1], j:j + ws[2]].reshape(-1, C)
                    wrap = None
                    if any(ss):
                        wrap = [(a + d + ss[0] >= P[0], i + hh + ss[1] >= P[1], j + w + ss[2] >= P[2])
                                for d in range(ws[0]) for hh in range(ws[1]) for w in range(ws[2])]
                    res = _ref_attention(blk.attn, win, ws, blk.window, wrap)
                    out[b, a:a + ws[0], i:i + ws[1], j:j + ws[2]] = res.view(ws[0], ws[1], ws[2], C)
    out = torch.roll(out, shifts=ss, dims=(1, 2, 3))[:, :D, :H, :W]
    x = x + out
    y = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    y = F.linear(F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + y


def _ref_swin(swin, video):
    """video (B, T, 3, H, W) -> (B, T, h*w, C): VALOR's Video Swin written out directly."""
    x = video.permute(0, 2, 1, 3, 4)                                   # (B, 3, T, H, W)
    x = F.pad(x, (0, -x.shape[-1] % 4, 0, -x.shape[-2] % 4, 0, 1))     # one zero frame: T tokens
    x = F.conv3d(x, swin.patch_embed.proj.weight, swin.patch_embed.proj.bias, stride=(1, 4, 4))
    x = x.permute(0, 2, 3, 4, 1)
    x = F.layer_norm(x, (x.shape[-1],), swin.patch_embed.norm.weight, swin.patch_embed.norm.bias)
    k = 0
    for s, depth in enumerate(swin.depths):
        for _ in range(depth):
            x = _ref_block(swin.blocks[k], x)
            k += 1
        if s < len(swin.depths) - 1:
            mg = swin.merges[s]
            x = F.pad(x, (0, 0, 0, x.shape[3] % 2, 0, x.shape[2] % 2))
            x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
            x = F.linear(F.layer_norm(x, (x.shape[-1],), mg.norm.weight, mg.norm.bias), mg.reduction.weight)
    x = F.layer_norm(x, (x.shape[-1],), swin.norm.weight, swin.norm.bias)
    B, T, h, w, C = x.shape
    return x.reshape(B, T, h * w, C)


def _small_swin(dtype=torch.float64):
    swin = VideoSwin(**SMALL).to(dtype)
    with torch.no_grad():  # non-trivial norms and a table large enough to matter
        for m in swin.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0.0, 1.0)
    return swin


def test_swin_matches_eager_reference_fp64():
    # T=3, 20x28 px: 5x7 tokens (padded to windows), stage 2 3x4 (spatially one clipped window,
    # temporally shifted); every block kind runs
    swin = _small_swin()
    video = torch.randn(2, 3, 3, 20, 28, dtype=torch.float64)
    ref = _ref_swin(swin, video)
    with A.use_backend("math"):
        got = swin(video)
    assert got.shape == (2, 3, 12, 32)
    assert (got - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_swin_backends_match_reference_with_grads(backend):
    swin64 = _small_swin()
    swin = _small_swin(torch.float32)
    swin.load_state_dict({k: v.float() for k, v in swin64.state_dict().items()})
    video = torch.randn(1, 4, 3, 16, 16, dtype=torch.float64)
    ref = _ref_swin(swin64, video)
    ref.square().mean().backward()
    with A.use_backend(backend):
        got = swin(video.float())
    got.square().mean().backward()
    assert (got.double() - ref).abs().max().item() < 2e-5
    for (name, p), p64 in zip(swin.named_parameters(), swin64.parameters()):
        scale = max(1e-3, p64.grad.abs().max().item())
        assert (p.grad.double() - p64.grad).abs().max().item() < 2e-4 * scale, name


def test_temporal_tokens_and_valor_features():
    # T frames give T temporal tokens (patch kernel 2 at stride 1 over one padded frame)
    swin = VideoSwin(**SMALL)
    for T in (1, 2, 4, 5):
        assert swin(torch.randn(1, T, 3, 32, 32)).shape == (1, T, 4 * 4, 32)
    # the first temporal token sees frames 0 and 1, the last frame t=T-1 and the zero pad
    v = torch.randn(1, 3, 3, 32, 32)
    v2 = v.clone()
    v2[:, 2] = 0.0
    e1, e2 = swin.patch_embed(v), swin.patch_embed(v2)
    assert torch.equal(e1[:, 0], e2[:, 0]) and not torch.equal(e1[:, 1], e2[:, 1])
    m = VALOR(model_config("tiny", vision="swin"))
    vt = m.encode_video(torch.randn(2, 4, 3, 64, 64))
    assert vt.shape == (2, 4, 64, m.vision.out_dim)
    f = m.video_features(vt)  # one feature a frame: the spatial mean, no temporal pooling
    assert f.tokens.shape == (2, 4, m.cfg.contra_dim)
    manual = F.normalize(m.vision_proj(vt.mean(2)).float(), dim=-1)
    assert torch.allclose(f.tokens, manual, atol=1e-6)
    mem, split = m.memory(vt, torch.randn(2, 1, 129, m.cfg.audio_width))
    assert split == 4 * 64 and mem.shape == (2, 4 * 64 + 129, m.cfg.text_width)


def test_drop_path_only_in_training():
    swin = VideoSwin(**dict(SMALL, drop_path=0.5))
    v = torch.randn(4, 2, 3, 16, 16)
    swin.eval()
    assert torch.equal(swin(v), swin(v))
    swin.train()
    torch.manual_seed(0)
    a = swin(v)
    torch.manual_seed(1)
    assert not torch.allclose(a, swin(v))


def test_named_sizes():
    with torch.device("meta"):
        b = VALOR(model_config("valor_b"))
        sw = VideoSwin(**swin_arch("B"))
        vt = b.encode_video(torch.empty(2, 4, 3, 224, 224))
    assert b.vision.out_dim == 1024 and vt.shape == (2, 4, 49, 1024)
    assert 86e6 < sum(p.numel() for p in sw.parameters()) < 90e6  # Video Swin-B: ~88M
    assert 305e6 < count_parameters(b)["total"] < 325e6             # VALOR-B ~313M (reference)
    with torch.device("meta"):
        n_l = count_parameters(VALOR(model_config("valor_l")))["total"]
    assert 515e6 < n_l < 540e6                                       # VALOR-L ~527M
    for recipe, size, frames in (("valor_b", "valor_b", 4), ("valor_l", "valor_l", 2)):
        cfg = load_config(recipe)
        assert cfg.model.size == size and cfg.data.frames_train == frames
    assert load_config("valor_b").model.vision == "swin"
    assert load_config("valor_l").model.patch_size == 14 and load_config("valor_l").model.image_size == 224


# ----------------------------------------------------------------------------------------------
# weights: the public Video Swin layout
# ----------------------------------------------------------------------------------------------
def _public_swin_sd(arch, device="cpu", two_d=False):
    """A synthetic checkpoint with the public (mmaction SwinTransformer3D) key names, built from
    the architecture description rather than from our module."""
    C, wd, wh, ww = arch["embed_dim"], *arch["window"]
    t = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    sd = {"patch_embed.proj.weight": t(C, 3, 4, 4) if two_d else t(C, 3, 2, 4, 4), "patch_embed.proj.bias": t(C),
          "patch_embed.norm.weight": t(C), "patch_embed.norm.bias": t(C)}
    rows = (2 * wh - 1) * (2 * ww - 1) if two_d else (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1)
    n_tok = wh * ww if two_d else wd * wh * ww
    for i, (depth, heads) in enumerate(zip(arch["depths"], arch["heads"])):
        d = C * 2 ** i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            sd.update({p + "norm1.weight": t(d), p + "norm1.bias": t(d),
                       p + "attn.relative_position_bias_table": t(rows, heads),
                       p + "attn.relative_position_index": torch.zeros(n_tok, n_tok, dtype=torch.long, device=device),
                       p + "attn.qkv.weight": t(3 * d, d), p + "attn.qkv.bias": t(3 * d),
                       p + "attn.proj.weight": t(d, d), p + "attn.proj.bias": t(d),
                       p + "norm2.weight": t(d), p + "norm2.bias": t(d),
                       p + "mlp.fc1.weight": t(4 * d, d), p + "mlp.fc1.bias": t(4 * d),
                       p + "mlp.fc2.weight": t(d, 4 * d), p + "mlp.fc2.bias": t(d)})
        if i < len(arch["depths"]) - 1:
            sd.update({f"layers.{i}.downsample.reduction.weight": t(2 * d, 4 * d),
                       f"layers.{i}.downsample.norm.weight": t(4 * d), f"layers.{i}.downsample.norm.bias": t(4 * d)})
    Cf = C * 2 ** (len(arch["depths"]) - 1)
    sd.update({"norm.weight": t(Cf), "norm.bias": t(Cf), "cls_head.fc_cls.weight": t(400, Cf),
               "cls_head.fc_cls.bias": t(400)})
    return sd


def test_load_public_checkpoint_no_missing_keys(tmp_path):
    sd = _public_swin_sd(SMALL)
    path = tmp_path / "swin_small.pth"
    # as mmaction saves it: {"meta": ..., "state_dict": {"backbone.*": ..., "cls_head.*": ...}}
    torch.save({"meta": {"epoch": 30, "config": "swin"},
                "state_dict": {("backbone." + k if not k.startswith("cls_head") else k): v for k, v in sd.items()}},
               path)
    swin = VideoSwin(**SMALL)
    rep = load_swin(swin, str(path))
    assert rep["missing"] == [] and rep["shape_mismatch"] == {}
    assert rep["unused"] == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight"]
    own = swin.state_dict()
    assert torch.equal(own["blocks.3.attn.qkv.weight"], sd["layers.1.blocks.1.attn.qkv.weight"])
    assert torch.equal(own["merges.0.reduction.weight"], sd["layers.0.downsample.reduction.weight"])
    assert torch.equal(own["blocks.2.attn.relative_position_bias_table"],
                       sd["layers.1.blocks.0.attn.relative_position_bias_table"])
    # the index buffer is regenerated, not taken from the file (zeros there)
    assert torch.equal(swin.blocks[0].attn.relative_position_index, relative_position_index((2, 4, 4)))
    # through the VALOR model and model.init_vision (a safetensors file of the bare backbone)
    from safetensors.torch import save_file

    from valor_fast.model.valor import build_model
    sd_t = _public_swin_sd(SWIN_SIZES["tiny"])
    save_file(sd_t, str(tmp_path / "tiny.safetensors"))
    m = build_model(model_config("tiny", vision="swin", init_vision=str(tmp_path / "tiny.safetensors")))
    assert torch.equal(m.vision.blocks[1].mlp.fc2.weight, sd_t["layers.0.blocks.1.mlp.fc2.weight"])


def test_load_public_checkpoint_into_swin_b_on_meta():
    # every Video Swin-B tensor has a public counterpart (meta tensors: no memory)
    with torch.device("meta"):
        swin = VideoSwin(**swin_arch("B"))
    sd = _public_swin_sd(SWIN_SIZES["B"], device="meta")
    mapped, unused, notes = swin_to_ours({"backbone." + k: v for k, v in sd.items()}, swin)
    own = swin.state_dict()
    assert set(mapped) == set(own)
    assert all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in own)
    assert unused == ["backbone.cls_head.fc_cls.bias", "backbone.cls_head.fc_cls.weight"] and notes == []


def _offsets_table(table, window, offsets):
    wd, wh, ww = window
    return torch.stack([table[(d + wd - 1) * (2 * wh - 1) * (2 * ww - 1) + (h + wh - 1) * (2 * ww - 1) + (w + ww - 1)]
                        for d, h, w in offsets])


def test_bias_table_crop_and_interpolate():
    big = torch.randn(15 * 13 * 13, 4)                                 # window (8, 7, 7)
    small = resize_bias_table(big, (8, 7, 7), (4, 7, 7))              # VALOR-B's clipped window
    assert small.shape == (7 * 13 * 13, 4)
    offs = [(d, h, w) for d in range(-3, 4) for h in (-6, 0, 5) for w in (-6, 2, 6)]
    assert torch.equal(_offsets_table(small, (4, 7, 7), offs), _offsets_table(big, (8, 7, 7), offs))
    grown = resize_bias_table(small, (4, 7, 7), (8, 7, 7))            # interpolated in time
    assert grown.shape == big.shape
    # align_corners: the end and centre offsets keep their values
    keep = [(0, 1, 2), (3, -2, 0), (-3, 4, -5)]
    assert torch.allclose(_offsets_table(grown, (8, 7, 7), [(0, 1, 2), (7, -2, 0), (-7, 4, -5)]),
                          _offsets_table(small, (4, 7, 7), keep), atol=1e-6)
    # a checkpoint trained with a larger temporal window loads by cropping its tables
    arch = dict(SMALL, window=(4, 4, 4))
    swin = VideoSwin(**SMALL)
    rep = load_swin(swin, _public_swin_sd(arch))
    assert rep["missing"] == [] and any("(4, 4, 4)" in n for n in rep["resized"])


def test_2d_checkpoint_is_inflated():
    sd = _public_swin_sd(SMALL, two_d=True)
    swin = VideoSwin(**SMALL)
    rep = load_swin(swin, {"model": sd})
    assert rep["missing"] == [] and rep["shape_mismatch"] == {}
    w3 = swin.patch_embed.proj.weight
    assert torch.equal(w3[:, :, 0], sd["patch_embed.proj.weight"] / 2) and torch.equal(w3[:, :, 0], w3[:, :, 1])
    # a clip of identical frames embeds as the 2D patch embedding did (away from the padded frame)
    img = torch.randn(1, 3, 16, 16)
    clip = img[:, None].expand(1, 3, 3, 16, 16)
    e2d = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)  # (1, C, 4, 4)
    e3d = swin.patch_embed.proj(F.pad(clip.transpose(1, 2), (0, 0, 0, 0, 0, 1)))              # (1, C, 3, 4, 4)
    assert torch.allclose(e3d[:, :, 0], e2d, atol=1e-5)
    # the 2D table is repeated over every temporal offset
    t2 = sd["layers.0.blocks.0.attn.relative_position_bias_table"]  # (7*7, H)
    t3 = swin.blocks[0].attn.relative_position_bias_table            # (3*7*7, H)
    assert torch.allclose(t3.view(3, 49, -1), t2.expand(3, 49, -1))


def test_bad_checkpoints(tmp_path):
    swin = VideoSwin(**SMALL)
    with pytest.raises(ValueError, match="does not look like a .*Swin"):
        load_swin(swin, {"encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="does not fit the configured architecture"):
        load_swin(swin, _public_swin_sd(dict(SMALL, embed_dim=24)))
    with pytest.raises(ValueError, match="not a state dict"):
        load_swin(swin, {"meta": {"epoch": 3}})
    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        load_swin(swin, str(p))
    with pytest.raises(TypeError, match="model.vision=swin"):
        load_swin(VALOR(model_config("tiny")), _public_swin_sd(SMALL))
    # a deeper checkpoint: its extra blocks are reported, ours all loaded
    rep = load_swin(swin, _public_swin_sd(dict(SMALL, depths=(2, 4))))
    assert rep["missing"] == [] and any("layers.1.blocks.3." in k for k in rep["unused"])


# ----------------------------------------------------------------------------------------------
# training: the embedded default with --model.vision swin
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    from valor_fast.data.synth import generate
    root = tmp_path_factory.mktemp("synth")
    generate(str(root / "ds"), seed=3, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    return str(root / "ds")


def test_tiny_swin_trains(small_synth, tmp_path):
    from valor_fast.train.trainer import train
    cfg = load_config("tiny", {"model.vision": "swin", "data.root": small_synth, "data.synth": "false",
                               "model.image_size": "32", "train.steps": "24", "train.batch_size": "16",
                               "train.lr": "1e-3", "train.out_dir": str(tmp_path), "train.run_name": "s",
                               "train.log_every": "8", "train.final_eval": "false"})
    train(cfg)
    hist = json.loads((tmp_path / "s" / "history.json").read_text())
    first = sum(h["loss"] for h in hist[:4]) / 4
    last = sum(h["loss"] for h in hist[-4:]) / 4
    assert last < first - 0.5, (first, last)
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert "vision.blocks.0.attn.relative_position_bias_table" in sd
    assert not any("relative_position_index" in k for k in sd)  # derived, not saved
