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
    losses = pretrain_step_losses(m, b, LossConfig(mgc_groups=""))
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


def test_task_prompts_ids_and_the_prompted_decoder():
    """VALOR-L's prompts: the ids are the tokenizer's; the prompted decoder stays causal in the
    text, its prompt is used (the output differs from the unprompted one), and cached beam search
    (the prompt's keys cached with the first pass) equals the uncached one."""
    from valor_fast.data.tokenizer import encode
    from valor_fast.model.args import TASK_PROMPT_IDS
    assert tuple(encode(["project language in common space"], 40)[0]) == TASK_PROMPT_IDS["contra"]
    assert tuple(encode(["describe the video with natural language"], 40)[0]) == TASK_PROMPT_IDS["caption"]
    assert tuple(encode(["answer the question"], 40)[0][1:-1]) == TASK_PROMPT_IDS["qa"]
    torch.manual_seed(0)
    cfg = model_config("tiny", task_prompts=True)
    m = VALOR(cfg).eval()
    b = _batch(cfg, B=2, L=8)
    mem, _ = m.memory(m.encode_video(b["video"]), m.encode_audio(b["audio"]))
    ids = b["text_ids"]
    h1 = m.decode(ids, None, mem, None)
    ids2 = ids.clone()
    ids2[:, 5:] = 2000
    torch.testing.assert_close(h1[:, :5], m.decode(ids2, None, mem, None)[:, :5])
    assert not torch.allclose(h1, m.decode(ids, None, mem, None, prompt=torch.tensor([[101, 2000, 102]] * 2)))
    assert not torch.allclose(m.encode_text(ids, b["text_mask"]),
                              m.text.encode(ids, b["text_mask"]))           # the contrastive prompt is read
    qa = torch.tensor([[101, 3437, 1996, 3160, 2054, 102], [101, 3437, 1996, 3160, 2129, 102]])
    for beam, tp in ((1, None), (3, None), (2, qa)):
        a = beam_search(m, mem, None, beam=beam, max_len=5, use_cache=True, task_prompt=tp, **DECODE_IDS)
        u = beam_search(m, mem, None, beam=beam, max_len=5, use_cache=False, task_prompt=tp, **DECODE_IDS)
        assert a == u and len(a) == 2


def test_missing_audio_zeros_keeps_every_clip_in_every_group():
    """loss.missing_audio=zeros (upstream): a clip without audio counts in T-A / T-AV like any
    clip (its zero spectrogram), i.e. as if has_audio were not given; mask leaves it out."""
    cfg = model_config("tiny")
    m = VALOR(cfg).eval()
    b = _batch(cfg)
    b["has_audio"] = torch.tensor([True, False, True])
    run = lambda batch, mode: pretrain_step_losses(m, batch, LossConfig(missing_audio=mode, mgc_groups=""),  # noqa: E731
                                                   torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, n, k = run(b, "zeros"), run({x: y for x, y in b.items() if x != "has_audio"}, "mask"), run(b, "mask")
    for key in ("mga/ta", "mga/tav", "mgc/ta", "mgc/tav"):
        assert torch.equal(z[key], n[key]) and not torch.equal(z[key], k[key]), key


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
    with pytest.raises(ValueError, match=r"data.max_text_len=600: must be <= model.max_positions \(512\)"):
        load_config(None, {"data.max_text_len": "600"})


@pytest.mark.parametrize("size,std", [("tiny", 0.5), ("base", 0.01)])
def test_vit_position_table_starts_at_the_configured_scale(size, std):
    # the tiny model's position table starts as large as a patch's content (ModelConfig.vision_pos_std);
    # a user's value wins over the size's
    torch.manual_seed(0)
    cfg = model_config(size, vision_layers=1, text_layers=1, audio_layers=1)
    pos = VALOR(cfg).vision.pos
    assert abs(pos.std().item() - std) < 0.1 * std
    pos = VALOR(model_config(size, vision_layers=1, text_layers=1, audio_layers=1, vision_pos_std=0.2)).vision.pos
    assert abs(pos.std().item() - 0.2) < 0.02
    assert load_config(None, {"model.vision_pos_std": "0.3"}).model.vision_pos_std == 0.3
    with pytest.raises(ValueError, match="model.vision_pos_std"):
        load_config(None, {"model.vision_pos_std": "-1"})
