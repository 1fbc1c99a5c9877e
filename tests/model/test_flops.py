"""valor_fast.model.flops: the training FLOP count follows the groups an objective trains.
Expected values are worked out by hand for a tiny config (the arithmetic is in the comments)."""
import dataclasses

import pytest

from valor_fast.model.args import ModelConfig
from valor_fast.model.flops import training_flops_per_sample

# vision: 32 px / 16 -> 4 patches + CLS = 5 tokens a frame; audio: 16 mel x 32 frames / 16 ->
# 1 x 2 patches + CLS = 3 tokens a slice; widths 8, one layer each, text FFN 16, vocabulary 100
TINY = ModelConfig(image_size=32, patch_size=16, vision_width=8, vision_layers=1, vision_heads=2,
                   audio_width=8, audio_layers=1, audio_heads=2, audio_mel_bins=16, audio_frames=32,
                   text_width=8, text_layers=1, text_heads=2, text_ffn=16, vocab_size=100)
KW = dict(frames=2, text_len=4, audio_slices=1, mask_prob=0.5)
# a block, per token: 2 (4 w^2 + 2 w ffn) + 2*2 kv w
VISION = 2 * 5 * (2 * (4 * 64 + 2 * 8 * 32) + 4 * 5 * 8)      # 2 frames x 5 tokens x 1696 = 16960
AUDIO = 3 * (2 * (4 * 64 + 2 * 8 * 32) + 4 * 3 * 8)           # 3 tokens x 1632 = 4896
TEXT = 4 * (2 * (4 * 64 + 2 * 8 * 16) + 4 * 4 * 8)            # 4 tokens x 1152 = 4608
LM = 0.5 * 4 * 2 * 8 * 100                                    # masked rows x 2 w V = 3200 a group


def _decoder(mem):
    # a decoder pass, per text token: the BERT block (self-attention over the 4 text keys) plus
    # cross-attention: q, o 2*2 w^2 and QK^T, PV 2*2 mem w over the `mem` memory tokens
    per_tok = 2 * (4 * 64 + 2 * 8 * 16) + 4 * 4 * 8 + 4 * 64 + 4 * mem * 8
    return 4 * per_tok


def _memory_kv(mem):
    return 1 * 2 * 2 * mem * 64    # k and v projections of the memory, once, one layer


def test_retrieval_has_no_decoder_term():
    got = training_flops_per_sample(TINY, mga_groups=("tv",), **KW)
    assert got == 3 * (VISION + TEXT) == 64704
    # nothing of the decoder or LM head: the vocabulary and the mask share do not matter
    big_vocab = dataclasses.replace(TINY, vocab_size=30522)
    assert training_flops_per_sample(big_vocab, mga_groups=("tv",), **{**KW, "mask_prob": 0.9}) == got
    # T-A retrieval reads the audio encoder instead of the vision one
    assert training_flops_per_sample(TINY, mga_groups=("ta",), **KW) == 3 * (AUDIO + TEXT)


def test_caption_counts_its_groups_only():
    mem = 2 * 5 + 3                                         # both modalities: 13 memory tokens
    one = training_flops_per_sample(TINY, mgc_groups=("tav",), **KW)
    assert one == 3 * (VISION + AUDIO + _decoder(mem) + _memory_kv(mem) + LM) == 107040
    # MGC on T-A alone: no vision encoder, the memory is the 3 audio tokens
    assert training_flops_per_sample(TINY, mgc_groups=("ta",), **KW) == 3 * (AUDIO + _decoder(3) + _memory_kv(3) + LM)


def test_pretraining_counts_every_group():
    g = ("tv", "ta", "tav")
    mem = 13
    got = training_flops_per_sample(TINY, mga_groups=g, mgc_groups=g, **KW)
    assert got == 3 * (VISION + AUDIO + TEXT + 3 * _decoder(mem) + _memory_kv(mem) + 3 * LM) == 183840
    with pytest.raises(ValueError, match="unknown groups"):
        training_flops_per_sample(TINY, mga_groups=("tx",), **KW)
