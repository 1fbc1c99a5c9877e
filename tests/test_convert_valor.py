"""The upstream VALOR checkpoint converter, on a state dict built here from the upstream key
listing (TXH-mercury/VALOR model/{modeling,pretrain,bert,transformer}.py naming) with random
values: every tensor of ours is filled, each lands where the layout says, leftovers are reported,
and `load_init` takes the file as an untrusted checkpoint."""
import pytest
import torch

from valor_fast.model.args import model_config
from valor_fast.model.convert import load_init, load_valor_checkpoint
from valor_fast.model.valor import build_model

SMALL = dict(image_size=32, vision_width=96, vision_heads=2, text_width=64, text_heads=2, text_ffn=128,
             audio_width=48, audio_heads=2, contra_dim=32, vision_layers=2, text_layers=2, audio_layers=2)


def upstream_state_dict(cfg, g):
    """Key names and shapes of an upstream VALOR (CLIP vision, va_concate BERT, AST) checkpoint."""
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d, v, a, C, V = cfg.text_width, cfg.vision_width, cfg.audio_width, cfg.contra_dim, cfg.vocab_size
    sd = {}
    mm = "multimodal_encoder."
    sd[mm + "embeddings.word_embeddings.weight"] = r(V, d)
    sd[mm + "embeddings.position_embeddings.weight"] = r(512, d)
    sd[mm + "embeddings.token_type_embeddings.weight"] = r(2, d)
    sd[mm + "embeddings.prompt_embedding.weight"] = r(1, d)
    sd[mm + "embeddings.LayerNorm.weight"], sd[mm + "embeddings.LayerNorm.bias"] = r(d), r(d)
    for i in range(cfg.text_layers):
        p = f"{mm}encoder.layer.{i}."
        for blk in ("attention.self", "cross_attn.cross"):
            for n in ("query", "key", "value"):
                sd[f"{p}{blk}.{n}.weight"], sd[f"{p}{blk}.{n}.bias"] = r(d, d), r(d)
        for blk in ("attention.output", "cross_attn.output"):
            sd[f"{p}{blk}.dense.weight"], sd[f"{p}{blk}.dense.bias"] = r(d, d), r(d)
            sd[f"{p}{blk}.LayerNorm.weight"], sd[f"{p}{blk}.LayerNorm.bias"] = r(d), r(d)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(cfg.text_ffn, d), r(cfg.text_ffn)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(d, cfg.text_ffn), r(d)
        sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"] = r(d), r(d)
    sd[mm + "pooler.dense.weight"], sd[mm + "pooler.dense.bias"] = r(d, d), r(d)
    # upstream registers the shared text encoder twice: identical tensors under txt_encoder.*
    for k in list(sd):
        sd["txt_encoder." + k[len(mm):]] = sd[k]
    sd["cls.dense.weight"], sd["cls.dense.bias"] = r(d, d), r(d)
    sd["cls.layernorm.weight"], sd["cls.layernorm.bias"] = r(d), r(d)
    sd["cls.decoder.weight"], sd["cls.decoder.bias"] = sd[mm + "embeddings.word_embeddings.weight"], r(V)
    cv = "clip_model.visual."
    n = cfg.image_size // cfg.patch_size
    sd[cv + "conv1.weight"] = r(v, 3, cfg.patch_size, cfg.patch_size)
    sd[cv + "class_embedding"] = r(v)
    sd[cv + "positional_embedding"] = r(n * n + 1, v)
    for ln in ("ln_pre", "ln_post"):
        sd[f"{cv}{ln}.weight"], sd[f"{cv}{ln}.bias"] = r(v), r(v)
    for i in range(cfg.vision_layers):
        p = f"{cv}transformer.resblocks.{i}."
        sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * v, v), r(3 * v)
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(v, v), r(v)
        for ln in ("ln_1", "ln_2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = r(v), r(v)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * v, v), r(4 * v)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(v, 4 * v), r(v)
    sd[cv + "proj"] = r(v, 512)
    sd["clip_model.token_embedding.weight"] = r(10, 8)   # CLIP's text tower: not ours
    grid = (cfg.audio_mel_bins // 16) * (cfg.audio_frames // 16)
    sd["audio_embeddings.cls_token"] = r(1, 1, a)
    sd["audio_embeddings.distill_token"] = r(1, 1, a)
    sd["audio_embeddings.first_conv.weight"], sd["audio_embeddings.first_conv.bias"] = r(a, 1, 16, 16), r(a)
    sd["audio_embeddings.position_embeddings.weight"] = r(grid + 1, a)
    for i in range(cfg.audio_layers):
        p = f"audio_encoder.layer.{i}."
        for j in range(4):
            sd[f"{p}attention.linears.{j}.weight"], sd[f"{p}attention.linears.{j}.bias"] = r(a, a), r(a)
        sd[p + "ff_layer.linear1.weight"], sd[p + "ff_layer.linear1.bias"] = r(4 * a, a), r(4 * a)
        sd[p + "ff_layer.linear2.weight"], sd[p + "ff_layer.linear2.bias"] = r(a, 4 * a), r(a)
        for ln in ("layernorm1", "layernorm2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = r(a), r(a)
    sd["audio_encoder.last_layernorm.weight"], sd["audio_encoder.last_layernorm.bias"] = r(a), r(a)
    sd["contra_head_t.linear.weight"] = r(C, d)
    sd["contra_head_v.linear.weight"] = r(C, v)
    sd["contra_head_a.linear.weight"] = r(C, a)
    for m in ("text", "video", "audio"):
        sd[f"{m}_fine_weight.0.weight"], sd[f"{m}_fine_weight.0.bias"] = r(C, C), r(C)
        sd[f"{m}_fine_weight.2.weight"], sd[f"{m}_fine_weight.2.bias"] = r(1, C), r(1)
    sd["va_fusion.weight"], sd["va_fusion.bias"] = r(C, 2 * C), r(C)
    sd["contra_temp"] = torch.tensor(0.05)
    for m, w in (("video", v), ("audio", a)):
        sd[f"{m}_frame_embedding"] = r(1, 32, d)
        sd[f"{m}_type_embeddings"] = r(1, 1, d)
        sd[f"hidden_trans_{m}_multimodal.0.weight"], sd[f"hidden_trans_{m}_multimodal.0.bias"] = r(d, w), r(d)
        sd[f"hidden_trans_{m}_multimodal.1.weight"], sd[f"hidden_trans_{m}_multimodal.1.bias"] = r(d), r(d)
    return sd


def test_valor_converter_fills_every_tensor_and_places_them():
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    cfg = model_config("tiny", **SMALL)
    model = build_model(cfg)
    sd = upstream_state_dict(cfg, g)
    rep = load_valor_checkpoint(model, sd)
    assert rep["missing"] == [] and rep["shape_mismatch"] == {}
    # what has no counterpart is reported, and only that
    assert set(rep["unused"]) == {"multimodal_encoder.pooler.dense.weight", "multimodal_encoder.pooler.dense.bias",
                                  "txt_encoder.pooler.dense.weight", "txt_encoder.pooler.dense.bias",
                                  "multimodal_encoder.embeddings.prompt_embedding.weight",
                                  "txt_encoder.embeddings.prompt_embedding.weight", "clip_model.visual.proj",
                                  "clip_model.token_embedding.weight", "audio_embeddings.distill_token"}
    ours = model.state_dict()
    eq = lambda a, b: torch.equal(ours[a], b)  # noqa: E731
    q, k, v = sd["clip_model.visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert eq("vision.blocks.1.attn.q.weight", q) and eq("vision.blocks.1.attn.v.weight", v)
    assert eq("vision.blocks.1.attn.k.bias", sd["clip_model.visual.transformer.resblocks.1.attn.in_proj_bias"].chunk(3)[1])
    assert eq("vision.blocks.0.mlp.fc2.weight", sd["clip_model.visual.transformer.resblocks.0.mlp.c_proj.weight"])
    assert eq("text.layers.1.cross.k.weight", sd["multimodal_encoder.encoder.layer.1.cross_attn.cross.key.weight"])
    assert eq("text.layers.0.ln_cross.bias", sd["multimodal_encoder.encoder.layer.0.cross_attn.output.LayerNorm.bias"])
    assert eq("text.layers.1.fc1.weight", sd["multimodal_encoder.encoder.layer.1.intermediate.dense.weight"])
    assert eq("text.lm_head.bias", sd["cls.decoder.bias"])
    assert eq("audio.blocks.1.attn.o.weight", sd["audio_encoder.layer.1.attention.linears.3.weight"])
    assert eq("audio.blocks.0.ln2.weight", sd["audio_encoder.layer.0.layernorm2.weight"])
    assert eq("audio.cls", sd["audio_embeddings.cls_token"].reshape(-1))
    assert eq("vision_weight.fc2.weight", sd["video_fine_weight.2.weight"])
    assert eq("type_embed.weight", torch.cat([sd["video_type_embeddings"].reshape(1, -1),
                                               sd["audio_type_embeddings"].reshape(1, -1)]))
    assert eq("clip_embed.weight", sd["audio_frame_embedding"][0])
    assert abs(float(model.temperature) - 0.05) < 1e-7
    # the converted model runs
    ids = torch.tensor([[101, 2000, 2001, 102]])
    assert torch.isfinite(model.encode_text(ids, ids > 0)).all()


def test_load_init_detects_upstream_layout_and_rejects_mismatch(tmp_path):
    from safetensors.torch import save_file
    cfg = model_config("tiny", **SMALL)
    sd = upstream_state_dict(cfg, torch.Generator().manual_seed(1))
    # upstream files are .pt; read with weights_only=True (a pickle with code would be refused)
    path = tmp_path / "model_step_100.pt"
    torch.save(sd, path)
    rep = load_init(build_model(cfg), str(path))
    assert rep["missing"] == []
    # our own safetensors round-trips; a different size is a clear error naming the problem
    src = build_model(cfg)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "ours.safetensors"))
    dst = build_model(cfg)
    load_init(dst, str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_init(build_model(model_config("tiny", **{**SMALL, "text_ffn": 96})), str(tmp_path / "ours.safetensors"))


def test_valor_l_conversion_keeps_logit_scale_prompt_row_and_fills_frame_slots(tmp_path):
    """A VALOR-L model (logit_scale temperature, task prompts) takes clip_model.logit_scale and the
    prompt row and reports contra_temp (never read with CLIP vision) unused; load_init (fine-tuning)
    fills the frame-embedding rows past VALOR-L's 2 pretraining frames (1 slice) with the last
    trained one, while the plain conversion keeps them as saved."""
    import math
    cfg = model_config("tiny", **SMALL, temperature_param="logit_scale", task_prompts=True)
    sd = upstream_state_dict(cfg, torch.Generator().manual_seed(2))
    sd["clip_model.logit_scale"] = torch.tensor(math.log(1 / 0.03))
    model = build_model(cfg)
    rep = load_valor_checkpoint(model, sd)
    assert rep["missing"] == [] and "contra_temp" in rep["unused"]
    assert not any("prompt_embedding" in k or "logit_scale" in k for k in rep["unused"])
    assert abs(float(model.temp()) - 0.03) < 1e-6
    assert torch.equal(model.text.embeddings.prompt.weight, sd["multimodal_encoder.embeddings.prompt_embedding.weight"])
    assert torch.equal(model.frame_embed.weight, sd["video_frame_embedding"][0])
    path = tmp_path / "model_step_1.pt"
    torch.save(sd, path)
    tuned = build_model(cfg)
    assert load_init(tuned, str(path))["frame_slots"] == [2, 1]
    fe, ce = tuned.frame_embed.weight, tuned.clip_embed.weight
    assert torch.equal(fe[:2], sd["video_frame_embedding"][0, :2]) and (fe[2:] == fe[1]).all()
    assert (ce == sd["audio_frame_embedding"][0, 0]).all()


def test_our_checkpoint_from_before_the_fusion_bias_still_loads(tmp_path):
    from safetensors.torch import save_file
    cfg = model_config("tiny", **SMALL)
    src = build_model(cfg)
    old = {k: v.contiguous() for k, v in src.state_dict().items() if k != "av_fusion.bias"}
    save_file(old, str(tmp_path / "old.safetensors"))
    dst = build_model(cfg)
    with torch.no_grad():
        dst.av_fusion.bias.fill_(1.0)
    load_init(dst, str(tmp_path / "old.safetensors"))
    assert torch.equal(dst.av_fusion.weight, src.av_fusion.weight) and not dst.av_fusion.bias.any()
