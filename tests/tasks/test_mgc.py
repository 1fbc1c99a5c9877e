"""MGC's masker (tasks/mgc.py mask_tokens): selection, replacement statistics, short captions."""
import torch

from valor_fast.data.tokenizer import MASK_ID
from valor_fast.tasks.mgc import mask_tokens


def test_masker_statistics():
    B, L = 400, 30
    ids = torch.randint(2000, 3000, (B, L))
    lens = torch.randint(2, L + 1, (B,))
    mask = torch.arange(L)[None] < lens[:, None]
    ids[~mask] = 0
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    inp, sel = mask_tokens(ids, mask, 0.6, generator=g)
    assert not sel[:, 0].any(), "position 0 ([CLS]) is never selected"
    assert not (sel & ~mask).any(), "padding is never selected"
    assert sel.any(1).all(), "at least one token a sequence"
    elig = mask.clone()
    elig[:, 0] = False
    frac = sel.sum() / elig.sum()
    assert 0.57 < float(frac) < 0.63
    s_in, s_id = inp[sel], ids[sel]
    p_mask = float((s_in == MASK_ID).float().mean())
    p_keep = float((s_in == s_id).float().mean())
    p_rand = 1 - p_mask - p_keep
    assert 0.77 < p_mask < 0.83 and 0.07 < p_keep < 0.13 and 0.07 < p_rand < 0.13
    assert (inp[~sel] == ids[~sel]).all(), "unselected tokens are untouched"
    # a length-2 caption ([CLS] w) always gets its one word selected
    short = torch.tensor([[101, 2000, 0, 0]])
    _, s = mask_tokens(short, short != 0, 0.0)
    assert s.tolist() == [[False, True, False, False]]
