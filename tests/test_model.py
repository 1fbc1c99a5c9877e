import pytest
import torch

from valor_fast.config import LossConfig, load_config
from valor_fast.model.args import model_config
from valor_fast.data.tokenizer import DECODE_IDS
from valor_fast.model.decoding import beam_search
from valor_fast.model.valor import VALOR, count_parameters
from valor_fast.tasks.pretrain import pretrain_step_losses


def _batch(cfg, B=3, L=9, frames=2):
    ids = torch.randint(1000, 3000, (B, L))
    ids[:, 0] = 101
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, L - 3:] = False
    ids[~mask] = 0
    return dict(video=torch.randn(B, frames, 3, cfg.image_size, cfg.image_size),
                audio=torch.randn(B, 1, cfg.audio_frames, cfg.audio_mel_bins),
                text_ids=ids, text_mask=mask, has_audio=torch.ones(B, dtype=torch.bool))


def test_tiny_forward_shapes_and_losses():
    cfg = model_config("tiny")
    m = VALOR(cfg)
    b = _batch(cfg)
    vt = m.encode_video(b["video"])
    at = m.encode_audio(b["audio"])
    n_patch = (cfg.image_size // cfg.patch_size) ** 2
    assert vt.shape == (3, 2, 1 + n_patch, cfg.vision_width)
    assert at.shape == (3, 1, 129, cfg.audio_width)       # 4 x 32 patches + CLS
    th = m.encode_text(b["text_ids"], b["text_mask"])
    assert th.shape == (3, 9, cfg.text_width)
    t = m.text_features(th, b["text_mask"])
    assert torch.allclose(t.tokens.norm(dim=-1), torch.ones(3, 9), atol=1e-5)
    mem, nv = m.memory(vt, at)
    assert mem.shape == (3, 2 * (1 + n_patch) + 129, cfg.text_width) and nv == 2 * (1 + n_patch)
    losses = pretrain_step_losses(m, b, LossConfig())
    assert set(losses) == {"loss", "mga/tv", "mga/ta", "mga/tav", "mgc/tv", "mgc/ta", "mgc/tav"}
    losses["loss"].backward()
    assert m.temperature.grad is not None and m.vision.patch_embed.weight.grad.abs().sum() > 0
    assert m.audio.patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size,lo,hi", [("base", 300e6, 325e6), ("large", 515e6, 540e6)])
def test_named_sizes_on_meta(size, lo, hi):
    with torch.device("meta"):
        m = VALOR(model_config(size))
    n = count_parameters(m)["total"]
    assert lo < n < hi
    with torch.device("meta"):
        vt = m.encode_video(torch.empty(2, 4, 3, 224, 224))
    assert vt.shape == (2, 4, 197 if size == "base" else 257, m.cfg.vision_width)


def test_decoder_is_causal():
    cfg = model_config("tiny")
    m = VALOR(cfg).eval()
    b = _batch(cfg, B=1, L=8)
    mem, nv = m.memory(m.encode_video(b["video"]), m.encode_audio(b["audio"]))
    ids = b["text_ids"]
    h1 = m.decode(ids, None, mem, None)
    ids2 = ids.clone()
    ids2[0, 5:] = 2000
    h2 = m.decode(ids2, None, mem, None)
    torch.testing.assert_close(h1[:, :5], h2[:, :5])           # the future does not leak back
    assert not torch.allclose(h1[:, 5:], h2[:, 5:])


def test_beam_search_cache_matches_uncached():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    m = VALOR(cfg).eval()
    b = _batch(cfg, B=2)
    mem, _ = m.memory(m.encode_video(b["video"]), m.encode_audio(b["audio"]))
    for beam in (1, 3):
        a = beam_search(m, mem, None, beam=beam, max_len=6, use_cache=True, **DECODE_IDS)
        u = beam_search(m, mem, None, beam=beam, max_len=6, use_cache=False, **DECODE_IDS)
        assert a == u and len(a) == 2 and all(len(s) <= 6 for s in a)


def test_config_overrides_and_errors():
    cfg = load_config(None, {"train.lr": "3e-4", "loss.mga_mode": "coarse", "data.cache": "false"})
    assert cfg.train.lr == 3e-4 and cfg.loss.mga_mode == "coarse" and cfg.data.cache is False
    with pytest.raises(ValueError, match="no field 'lrr'"):
        load_config(None, {"train.lrr": "1"})
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("huge")


def test_moved_config_fields_still_load(tmp_path):
    # a run folder's config.yaml written before the fields moved: model.max_text_len (it only
    # sized the position table), data.audio_mel_bins, the dead model.gradient_checkpointing
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  size: tiny\n  max_text_len: 600\n  audio_mel_bins: 128\n  gradient_checkpointing: false\n"
                   "data:\n  max_text_len: 520\n  audio_mel_bins: 128\n")
    cfg = load_config(str(old))
    assert cfg.model.max_positions == 600 and cfg.data.max_text_len == 520 and cfg.model.audio_mel_bins == 128
    assert not hasattr(cfg.model, "max_text_len") and not hasattr(cfg.data, "audio_mel_bins")
    assert load_config(None, {"model.max_text_len": "40"}).model.max_positions == 512   # max(512, 40)
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        load_config(None, {"model.gradient_checkpointing": "true"})
    with pytest.raises(ValueError, match="model.audio_mel_bins alone"):
        load_config(None, {"data.audio_mel_bins": "128", "model.audio_mel_bins": "64"})
    with pytest.raises(ValueError, match="data.max_text_len=600 exceeds model.max_positions=512"):
        load_config(None, {"data.max_text_len": "600"})
