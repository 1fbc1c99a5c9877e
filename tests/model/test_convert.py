"""Our encoders reproduce Hugging Face's on converted weights (real MiniLM BERT; random CLIP)."""
import torch
from transformers import BertModel, CLIPVisionConfig, CLIPVisionModel, ASTConfig, ASTModel

from valor_fast.model.args import model_config
from valor_fast.model.convert import (ast_to_ours, clip_vision_to_ours, minilm_path)
from valor_fast.model.valor import VALOR


def test_minilm_bert_matches_hf():
    hf = BertModel.from_pretrained(minilm_path()).eval()
    c = hf.config
    cfg = model_config("tiny", text_width=c.hidden_size, text_layers=c.num_hidden_layers,
                       text_heads=c.num_attention_heads, text_ffn=c.intermediate_size, init_text="minilm")
    from valor_fast.model.valor import build_model
    m = build_model(cfg).eval()
    ids = torch.randint(1000, 20000, (3, 11))
    ids[:, 0] = 101
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 6:] = False
    ids[~mask] = 0
    ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    ours = m.encode_text(ids, mask)
    torch.testing.assert_close(ours[mask], ref[mask], rtol=1e-4, atol=1e-4)


def test_clip_vision_matches_hf():
    hc = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          image_size=32, patch_size=8)
    hf = CLIPVisionModel(hc).eval()
    cfg = model_config("tiny", image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4)
    m = VALOR(cfg).eval()
    mapped, unused = clip_vision_to_ours(hf.state_dict(), 32, 8)
    res = m.vision.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 3, 32, 32)
    out = hf(pixel_values=x)
    ref = hf.post_layernorm(out.last_hidden_state)   # we keep all tokens after the final LN
    torch.testing.assert_close(m.vision(x[:, None])[:, 0], ref, rtol=1e-4, atol=1e-4)
    assert not [k for k in unused if "position_ids" not in k]


def test_ast_loads_all_tensors():
    hc = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   num_mel_bins=64, max_length=512, frequency_stride=16, time_stride=16)
    hf = ASTModel(hc)
    cfg = model_config("tiny", audio_width=32, audio_layers=2, audio_heads=4)
    m = VALOR(cfg)
    mapped, unused = ast_to_ours(hf.state_dict(), (4, 32), (4, 32))
    m.audio.load_state_dict(mapped, strict=True)
    assert unused == ["embeddings.distillation_token"]
    # AudioSet-style grid (12 x 101) resizes to ours
    sd = dict(hf.state_dict())
    sd["embeddings.position_embeddings"] = torch.randn(1, 2 + 12 * 101, 32)
    mapped, _ = ast_to_ours(sd, (12, 101), (4, 32))
    assert mapped["pos"].shape == (129, 32)
