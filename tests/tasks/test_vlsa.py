"""VLSA objectives against float64 references written here: masked-patch reconstruction (only
masked patches count: an unmasked patch's target can change freely), the per-patch normalised
pixel target, the patch masks, global audio matching, the T-V / T-A / V-A InfoNCE; the fixed key
set; and a short CPU training run in which every term falls."""
import pytest
import torch
import torch.nn.functional as F

from valor_fast.model.patch_embed import patchify_video
from valor_fast.model.vlsa import VLSA, vlsa_args
from valor_fast.tasks.vlsa import (KEYS, VLSALossArgs, VLSATask, contrastive_losses, gam_loss, masked_patch_loss,
                                   random_patch_mask, video_targets)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(dtype=torch.float32, **over):
    torch.manual_seed(0)
    kw = dict(image_size=32, max_frames=2, audio_mel_bins=32, audio_frames=64, width=64, heads=2,
              vocab_size=1000, contra_dim=32)
    kw.update(over)
    return VLSA(vlsa_args("tiny", **kw)).to(dtype)


def _clip_batch(B, g, L=7):
    """Learnable content: each clip's frames are its own colour plus a little of a few smooth
    patterns, its fbank its own spectrum, constant over time, plus the same; so a masked patch
    is predictable from the visible ones and clips are told apart.  Captions are word sequences."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    basis = torch.stack([xx, yy, xx * yy, (3 * xx).sin(), (3 * yy).cos()])          # (5, 32, 32)
    video = (2 * torch.randn(B, 1, 3, 1, 1, generator=g)
             + 0.3 * torch.einsum("bncp,phw->bnchw", torch.randn(B, 2, 3, 5, generator=g), basis))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 32), indexing="ij")
    basis = torch.stack([xx, yy, xx * yy, (3 * xx).sin(), (3 * yy).cos()])          # (5, 64 frames, 32 mel)
    audio = (2 * torch.randn(B, 1, 1, 32, generator=g)
             + 0.3 * torch.einsum("bsp,phw->bshw", torch.randn(B, 1, 5, generator=g), basis))
    ids = torch.randint(200, 999, (B, L), generator=g)
    ids[:, 0] = 101
    return dict(video=video, audio=audio, has_audio=torch.ones(B, dtype=torch.bool), text_ids=ids,
                text_mask=torch.ones(B, L, dtype=torch.bool), index=torch.arange(B))


# ------------------------------------------------------------------------------------------------
# masked modelling
# ------------------------------------------------------------------------------------------------
def test_masked_patch_loss_counts_masked_patches_only():
    d = torch.float64
    B, N, C, P = 3, 10, 6, 5
    head = torch.nn.Linear(C, P).to(d)
    tokens = torch.randn(B, N, C, dtype=d, requires_grad=True)
    target = torch.randn(B, N, P, dtype=d)
    mask = torch.rand(B, N) < 0.4
    mask[:, 0] = True
    s, n = masked_patch_loss(tokens, head, target, mask)
    ref, cnt = 0.0, 0
    for b in range(B):
        for i in range(N):
            if mask[b, i]:
                ref = ref + ((head(tokens[b, i]) - target[b, i]) ** 2).mean()
                cnt += 1
    torch.testing.assert_close(s, ref)
    assert int(n) == cnt
    # an unmasked patch's target (and its token state) does not enter the loss...
    t2 = target.clone()
    t2[~mask] = torch.randn(int((~mask).sum()), P, dtype=d) * 100
    torch.testing.assert_close(masked_patch_loss(tokens, head, t2, mask)[0], s)
    s.backward()
    assert float(tokens.grad[~mask].abs().max()) == 0.0
    # ...a masked one's does
    t3 = target.clone()
    t3[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] += 1.0
    assert not torch.allclose(masked_patch_loss(tokens, head, t3, mask)[0], s)


def test_video_target_is_the_per_patch_normalised_pixels():
    d = torch.float64
    video = torch.randn(2, 2, 3, 8, 8, dtype=d)
    got = video_targets(video, 4, norm_pix=True)
    assert got.shape == (2, 2 * 4, 3 * 16)
    b, f, r, c = 1, 1, 0, 1                      # clip 1, frame 1, patch row 0, col 1 -> patch 4 + 1
    patch = video[b, f, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].reshape(-1)
    want = (patch - patch.mean()) / (patch.var(unbiased=False) + 1e-6).sqrt()
    torch.testing.assert_close(got[b, f * 4 + r * 2 + c].double(), want)
    torch.testing.assert_close(video_targets(video, 4, norm_pix=False).double(), patchify_video(video, 4))


def test_patch_masks_have_the_exact_count_and_are_uniform():
    g = torch.Generator().manual_seed(0)
    m = random_patch_mask(4000, 10, 0.6, g)
    assert m.shape == (4000, 10) and bool((m.sum(1) == 6).all())
    torch.testing.assert_close(m.double().mean(0), torch.full((10,), 0.6, dtype=torch.float64), atol=0.03, rtol=0)
    assert bool((random_patch_mask(3, 4, 0.99, g).sum(1) == 3).all())   # at least one patch stays visible


# ------------------------------------------------------------------------------------------------
# global audio matching and contrastive
# ------------------------------------------------------------------------------------------------
def test_gam_loss_matches_the_float64_reference():
    m = _model(torch.float64)
    N, C = 5, 64
    a, v = torch.randn(N, C, dtype=torch.float64), torch.randn(N, C, dtype=torch.float64)
    rows = torch.arange(N)
    neg = torch.tensor([3, 4, 0, 1, 2])
    valid = torch.tensor([True, True, False, True, True])
    got = gam_loss(m, "video", a, v, rows, neg, valid)
    terms = []
    for i in range(N):
        if not valid[i]:
            continue
        pos = m.gam["video"](a[i:i + 1], v[i:i + 1])
        ng = m.gam["video"](a[i:i + 1], v[int(neg[i]):int(neg[i]) + 1])
        terms += [-F.logsigmoid(pos), -F.logsigmoid(-ng)]
    torch.testing.assert_close(got, torch.cat(terms).mean())


def test_contrastive_losses_match_the_float64_reference():
    N, D = 7, 6
    ft, fv, fa = (F.normalize(torch.randn(N, D, dtype=torch.float64), dim=-1) for _ in range(3))
    tau = torch.tensor(0.1, dtype=torch.float64)
    ha = torch.tensor([True, True, False, True, True, False, True])

    def nce(x, y):
        S = x @ y.t() / tau
        t = torch.arange(S.shape[0])
        return 0.5 * (F.cross_entropy(S, t) + F.cross_entropy(S.t(), t))

    got = contrastive_losses(ft, fv, fa, tau, ha)
    i = ha.nonzero().squeeze(1)
    torch.testing.assert_close(got["tv"], nce(ft, fv))
    torch.testing.assert_close(got["ta"], nce(ft[i], fa[i]))
    torch.testing.assert_close(got["va"], nce(fv[i], fa[i]))


# ------------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------------
def test_task_key_set_is_fixed_and_masks_follow_the_draws():
    task = VLSATask(_model())
    g = torch.Generator().manual_seed(2)
    for ha in ([True] * 4, [True, False, True, True], [False, False, True, False]):
        b = _clip_batch(4, g)
        b["has_audio"] = torch.tensor(ha)
        p = task.prepare(b, g)
        assert p["vlsa_video_mask"].shape == (4, 2 * 4) and p["vlsa_audio_mask"].shape == (4, 8)
        out = task(p)
        assert set(out) == set(KEYS) | {"loss"}
        assert all(bool(torch.isfinite(v)) for v in out.values())
    # the same generator state gives the same draws (a resumed step masks the same patches)
    b = _clip_batch(4, g)
    p1 = task.prepare(b, torch.Generator().manual_seed(9))
    p2 = task.prepare(b, torch.Generator().manual_seed(9))
    for k in ("vlsa_video_mask", "vlsa_audio_mask", "vlsa_text_draws", "vlsa_partners"):
        assert torch.equal(p1[k], p2[k])
    with pytest.raises(ValueError, match="prepare"):
        task(b)


def test_short_training_run_every_term_falls():
    task = VLSATask(_model(), VLSALossArgs(norm_pix=False))
    g = torch.Generator().manual_seed(0)
    b = _clip_batch(8, g)
    b["has_audio"][7] = False
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    hist = []
    for _ in range(45):
        out = task(task.prepare(b, g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        hist.append({k: float(v.detach()) for k, v in out.items()})
    for k in KEYS + ("loss",):
        first, last = hist[0][k], sum(h[k] for h in hist[-3:]) / 3
        assert last < 0.9 * first, f"{k}: {first:.3f} -> {last:.3f}"
