"""`accelerate(model)` / `revert(model)`: run a Hugging Face transformers-5 model's attention
through `valor_fast.ops.attention` (flash-attn / xformers / SDPA / our Triton kernel / math).

transformers 5 looks the attention function up per call in `ALL_ATTENTION_FUNCTIONS` under
`config._attn_implementation`, and builds the mask with the function registered under the same
name in `ALL_MASK_ATTENTION_FUNCTIONS`.  So we register both under "valor_fast" (once, at import)
and switch the implementation name of every config the model's modules hold; `revert` puts the
remembered names back.  No module, parameter or forward is replaced.

Mask convention (the one transformers uses for flash-attention): for the plain causal and
bidirectional patterns our mask function returns HF's `flash_attention_mask` result, i.e. None or
the 2-D (B, Lk) key-padding mask, and causality comes from the module (`is_causal` kwarg, else
`module.is_causal`).  Any other pattern (sliding window, packed sequences, custom overlays) gets
SDPA's full 4-D boolean mask.  The attention function converts what it receives:
  None / 2-D                   -> key_padding_mask (+ causal=True for a causal module with Lq > 1)
  4-D, same for every query    -> key_padding_mask            (stride-0 view or checked on data)
  4-D, causal & key padding    -> key_padding_mask, causal=True (checked on data, eager only)
  anything else (or dropout>0) -> eager math with that mask (boolean, or additive as given)
Causal with Lq != Lk (a KV cache) is bottom-right aligned, as in flash-attention: query i sees
keys up to Lk - Lq + i.  Rows with no key to attend to give zeros (HF's eager path would average
all values there); only left-padded causal batches have such rows, and their outputs are padding.
"""
import sys
import types
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from valor_fast.ops.attention import attention as _attention
from valor_fast.utils.log import get_logger, log_once

try:
    from transformers import AttentionInterface, PretrainedConfig
    from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                            causal_mask_function, flash_attention_mask, sdpa_mask)
except ImportError as e:  # pragma: no cover - transformers is a hard dependency of the package
    raise ImportError("valor_fast.accelerate needs transformers>=5 (AttentionInterface, "
                      f"masking_utils): {e}") from e

IMPL_NAME = "valor_fast"
log = get_logger("valor_fast.accelerate")

# model -> [(config, previous _attn_implementation_internal)]; weak so a patched model can die
_PATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, List[Tuple[object, Optional[str]]]]" = \
    weakref.WeakKeyDictionary()
_ABSENT = object()  # the config had no _attn_implementation_internal attribute at all
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "position_bias", "s_aux")


# ----------------------------------------------------------------------------------------------
# mask construction (registered in AttentionMaskInterface)
# ----------------------------------------------------------------------------------------------
def valor_fast_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                    kv_offset: int = 0, mask_function=causal_mask_function,
                    attention_mask: Optional[Tensor] = None, **kwargs):
    """None or (B, Lk) bool for the plain causal / bidirectional patterns (causality is the
    module's), else SDPA's (B, 1, Lq, Lk) bool mask."""
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    if plain and kwargs.get("local_size") is None:
        return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                    mask_function, attention_mask)
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# attention function (registered in AttentionInterface)
# ----------------------------------------------------------------------------------------------
def _bottom_right_causal(lq: int, lk: int, device) -> Tensor:
    """(Lq, Lk) bool: query i sees keys j <= Lk - Lq + i (a query block at the end of the keys)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _from_4d(mask: Tensor, lq: int, lk: int, batch: int):
    """A prepared (B|1, 1|H, Lq|1, Lk) mask -> (key_padding_mask, causal, dense) where dense is
    None when the mask was recognised, else the mask itself for the math path."""
    if mask.shape[-1] != lk or mask.shape[-2] not in (1, lq):
        raise ValueError(f"accelerate: 4-D attention_mask shape {tuple(mask.shape)} does not fit "
                         f"Lq={lq}, Lk={lk}")
    compiling = torch.compiler.is_compiling()
    m = mask
    if m.dtype != torch.bool:
        # an additive 0 / -inf (or dtype-min) mask is a boolean mask in disguise; check on data
        if compiling:
            return None, False, mask
        neg = m <= torch.finfo(m.dtype).min / 2
        if not bool(((m == 0) | neg).all()):
            return None, False, mask  # a real bias: eager math adds it
        m = ~neg
    if m.shape[1] != 1 and m.stride(1) != 0:
        return None, False, mask  # per-head masks: not a key-padding pattern
    m = m[:, 0]  # (B|1, Lq|1, Lk)
    if m.shape[-2] == 1 or m.stride(-2) == 0:  # identical for every query (an expanded view)
        return m[:, 0, :].expand(batch, lk), False, None
    if compiling:
        return None, False, mask  # data checks would break the graph: stay exact
    kpm = m[:, -1, :]  # for a causal & padding mask (Lq == Lk) the last row is the padding
    if torch.equal(m, kpm[:, None, :].expand_as(m)):
        return kpm.expand(batch, lk), False, None
    if lq == lk:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=m.device).tril()
        if torch.equal(m, kpm[:, None, :] & tri):
            return kpm.expand(batch, lk), True, None
    return None, False, mask


def _interpret_mask(mask: Optional[Tensor], module_causal: bool, batch: int, lq: int, lk: int, device):
    """-> (key_padding_mask (B, Lk) bool or None, causal, dense mask for the math path or None)."""
    kpm = None
    if mask is not None:
        if mask.dim() == 4:
            return _from_4d(mask, lq, lk, batch)
        if mask.dim() != 2:
            raise ValueError(f"accelerate: attention_mask must be None, (B, Lk) or 4-D, got {tuple(mask.shape)}")
        kpm = mask.to(torch.bool)
        if kpm.shape[-1] > lk:
            kpm = kpm[:, -lk:]
        elif kpm.shape[-1] < lk:  # static cache: the unused slots at the end are not keys
            kpm = F.pad(kpm, (0, lk - kpm.shape[-1]), value=False)
    causal = module_causal and lq > 1  # one query attends to the whole past
    if causal and lq != lk:
        dense = _bottom_right_causal(lq, lk, device)[None, None]  # (1, 1, Lq, Lk)
        if kpm is not None:
            dense = dense & kpm[:, None, None, :]
        return None, False, dense
    return kpm, causal, None


def _eager(q: Tensor, k: Tensor, v: Tensor, dense: Optional[Tensor], scale: Optional[float],
           dropout: float) -> Tensor:
    """Math attention with a boolean (True = attend) or additive 4-D mask, and attention dropout."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    alive = None
    if dense is not None and dense.dtype == torch.bool:
        alive = dense.any(dim=-1, keepdim=True)  # rows with nothing to attend to -> zeros
        s = s.masked_fill(~(dense | ~alive), float("-inf"))
    elif dense is not None:
        s = s + dense.to(s.dtype)
    p = torch.softmax(s, dim=-1)
    if dropout > 0.0:
        p = F.dropout(p, p=dropout, training=True)
    out = torch.matmul(p, v)
    return out if alive is None else out.masked_fill(~alive, 0.0)


def valor_fast_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                 attention_mask: Optional[Tensor], dropout: float = 0.0,
                                 scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                 **kwargs) -> Tuple[Tensor, None]:
    """transformers attention-interface function.  query (B, H, Lq, Dh), key/value (B, Hkv, Lk, Dh);
    returns ((B, Lq, H, Dh), None) (no attention weights)."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"valor_fast attention: {name!r} is not supported; revert() the model")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: share each K/V head
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    module_causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    kpm, causal, dense = _interpret_mask(attention_mask, module_causal, B, Lq, Lk, query.device)
    if dense is None and dropout == 0.0:
        out = _attention(query, key, value, key_padding_mask=kpm, causal=causal, scale=scaling)
    else:
        if dropout > 0.0 and not torch.compiler.is_compiling():
            log_once("accelerate:dropout", "valor_fast attention: attention dropout > 0 runs the eager "
                     "math path (the fused kernels have no dropout)")
        if dense is None and (kpm is not None or causal):
            dense = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device)[None, None]
            if causal:
                dense = dense.tril()
            if kpm is not None:
                dense = dense & kpm[:, None, None, :]
        out = _eager(query, key, value, dense, scaling, dropout)
    return out.transpose(1, 2), None


AttentionInterface.register(IMPL_NAME, valor_fast_attention_forward)
AttentionMaskInterface.register(IMPL_NAME, valor_fast_mask)


# ----------------------------------------------------------------------------------------------
# patching
# ----------------------------------------------------------------------------------------------
def _supported_types() -> tuple:
    from transformers import ASTModel, BertLMHeadModel, BertModel, CLIPVisionModel
    return (BertModel, BertLMHeadModel, CLIPVisionModel, ASTModel)


def _configs(model: torch.nn.Module) -> list:
    """Every distinct config object the model's modules read `_attn_implementation` from."""
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def is_accelerated(model: torch.nn.Module) -> bool:
    return model in _PATCHED


def accelerate(model: torch.nn.Module) -> torch.nn.Module:
    """Patch a transformers BertModel / BertLMHeadModel / CLIPVisionModel / ASTModel in place so its
    attention runs through `valor_fast.ops.attention`; returns the same object (idempotent)."""
    supported = _supported_types()
    if not isinstance(model, supported):
        raise TypeError(f"accelerate: model must be one of {[c.__name__ for c in supported]}, "
                        f"got {type(model).__name__}")
    if model in _PATCHED:
        return model
    saved = []
    for cfg in _configs(model):
        saved.append((cfg, cfg.__dict__.get("_attn_implementation_internal", _ABSENT)))
        cfg._attn_implementation_internal = IMPL_NAME  # the raw attribute: no validation, no recursion
    _PATCHED[model] = saved
    log.info("accelerate: %s attention -> valor_fast.ops.attention (%d config(s); was %s)",
             type(model).__name__, len(saved), sorted({str(s[1]) for s in saved if s[1] is not _ABSENT}))
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `accelerate(model)` exactly (a model that was not accelerated is returned unchanged)."""
    saved = _PATCHED.pop(model, None)
    if saved is None:
        return model
    for cfg, old in saved:
        if old is _ABSENT:
            cfg.__dict__.pop("_attn_implementation_internal", None)
        else:
            cfg._attn_implementation_internal = old
    return model


class _CallableModule(types.ModuleType):
    """Importing this submodule binds `valor_fast.accelerate` to the module, shadowing the package's
    `accelerate(model)` wrapper of the same name; calling the module keeps that spelling working."""

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        return accelerate(model)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["accelerate", "revert", "is_accelerated", "valor_fast_attention_forward", "valor_fast_mask",
           "IMPL_NAME"]
