"""Attention entry point (placeholder: PyTorch SDPA; the dispatcher arrives with the
flash-attention issue).  q (B, H, Lq, Dh), k/v (B, H, Lk, Dh), key_padding_mask (B, Lk) bool
True = attend."""
import torch
import torch.nn.functional as F


def attention(q, k, v, key_padding_mask=None, causal=False, scale=None):
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
    if causal and mask is not None:
        L = q.shape[-2]
        cm = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask = mask & cm
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
