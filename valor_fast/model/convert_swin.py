"""Video Swin weights -> our `VideoSwin` (valor_fast/model/swin.py).

Reads the state dict of the 3D Swin backbone as the public Video Swin releases ship it (mmaction
`SwinTransformer3D`: `patch_embed.proj/norm`, `layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}`, `layers.{i}.downsample.{norm,
reduction}`, `norm`), wrapped or not (`{"state_dict": ...}`, `backbone.` / `module.` / `model.` /
`video_encoder.` prefixes), and also 2D ImageNet Swin checkpoints (same block names, a 2D patch
embedding and (2wh-1)(2ww-1)-row bias tables), which are inflated to 3D.

  * `layers.{i}.blocks.{j}` -> `blocks.{sum(depths[:i]) + j}`; `layers.{i}.downsample` -> `merges.{i}`.
  * `relative_position_index` (and 2D Swin's `attn_mask`) are derived from the window size, so they
    are regenerated, never loaded.
  * A bias table made for another window is resized per dimension: centre-cropped where our window
    is smaller (exact: the smaller window's offsets are the middle of the larger one's), trilinearly
    interpolated where it is larger; a 2D table is repeated over the temporal offsets.
  * A 2D patch embedding (C, 3, 4, 4) is inflated to (C, 3, 2, 4, 4), repeated over time and
    divided by 2 (a static clip then embeds as the image did).
  * Classification heads (`cls_head.*`, `head.*`) are reported as unused.

Every load returns a report {loaded, missing, unused, shape_mismatch, resized}; missing / unused
keys are logged, never dropped silently.  Files are read with safetensors or
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..utils.log import get_logger, short_list

log = get_logger(__name__)

_PREFIXES = ("module.", "model.", "backbone.", "video_encoder.")
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def read_swin_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a Video Swin checkpoint file (.safetensors, or .pth/.pt read with
    weights_only=True), unwrapped from {"state_dict"|"model"|"module": ...}."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}); "
                         "extract its state dict into a .safetensors file with a trusted tool first") from e
    return unwrap(obj, path)


def unwrap(obj, where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    for _ in range(3):  # mmaction: {"meta", "state_dict", "optimizer"}; others {"model": ...}
        if isinstance(obj, dict):
            for wrap in ("state_dict", "model", "module"):
                if wrap in obj and isinstance(obj[wrap], dict):
                    obj = obj[wrap]
                    break
            else:
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{where}: not a state dict of tensors (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip(k: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if k.startswith(p):
                k, changed = k[len(p):], True
    return k


def resize_bias_table(table: torch.Tensor, old_window: Sequence[int], new_window: Sequence[int]) -> torch.Tensor:
    """((2a-1)(2b-1)(2c-1), H) table of window old_window -> the table of new_window.  Per
    dimension: centre crop when shrinking (exact), trilinear interpolation when growing."""
    old = [2 * w - 1 for w in old_window]
    new = [2 * w - 1 for w in new_window]
    if table.shape[0] != old[0] * old[1] * old[2]:
        raise ValueError(f"bias table has {table.shape[0]} rows; window {tuple(old_window)} needs "
                         f"{old[0] * old[1] * old[2]}")
    H = table.shape[1]
    g = table.reshape(*old, H).permute(3, 0, 1, 2)                     # (H, 2a-1, 2b-1, 2c-1)
    for dim in range(3):
        o, n = g.shape[1 + dim], new[dim]
        if n < o:                                                      # centre crop
            g = g.narrow(1 + dim, (o - n) // 2, n)
    if tuple(g.shape[1:]) != tuple(new):
        g = F.interpolate(g[None].float(), size=tuple(new), mode="trilinear", align_corners=True)[0].to(table.dtype)
    return g.permute(1, 2, 3, 0).reshape(-1, H).contiguous()


def _guess_old_window(rows: int, ours: Sequence[int], is_2d: bool) -> Tuple[int, int, int]:
    """A checkpoint table's window: 2D tables (2w-1)^2 rows, 3D ones assumed to share our spatial
    window (only the temporal extent differs between the public 3D releases)."""
    if is_2d:
        s = int(round(rows ** 0.5))
        if s * s != rows or s % 2 == 0:
            raise ValueError(f"2D bias table with {rows} rows is not (2w-1)^2")
        return (1, (s + 1) // 2, (s + 1) // 2)
    spatial = (2 * ours[1] - 1) * (2 * ours[2] - 1)
    if rows % spatial or (rows // spatial) % 2 == 0:
        raise ValueError(f"bias table with {rows} rows does not fit a ({{t}}, {ours[1]}, {ours[2]}) window; "
                         "pass src_window")
    return ((rows // spatial + 1) // 2, ours[1], ours[2])


def swin_to_ours(sd: Dict[str, torch.Tensor], target, src_window: Optional[Sequence[int]] = None
                 ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Public Video Swin (or 2D Swin) keys -> our VideoSwin keys.

    target: our VideoSwin module, or a ModelConfig (vision=swin; its Swin size gives depths and
    window).  Returns (mapped, unused input keys, notes on resized / inflated tensors)."""
    from .swin import SWIN_SIZES
    if hasattr(target, "blocks") and hasattr(target, "depths"):
        depths, window = tuple(target.depths), tuple(target.window)
    else:
        from .args import swin_size_of
        a = SWIN_SIZES[swin_size_of(target)]
        depths, window = tuple(a["depths"]), tuple(a["window"])
    offsets = [sum(depths[:i]) for i in range(len(depths))]

    sd = unwrap(sd)
    stripped: Dict[str, Tuple[str, torch.Tensor]] = {}
    for k, v in sd.items():
        stripped.setdefault(_strip(k), (k, v))
    pe = stripped.get("patch_embed.proj.weight")
    is_2d = pe is not None and pe[1].dim() == 4

    out: Dict[str, torch.Tensor] = {}
    unused: List[str] = []
    notes: List[str] = []
    for k, (orig, v) in stripped.items():
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
        if m:
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if i >= len(depths) or j >= depths[i]:
                unused.append(orig)  # a deeper checkpoint than our architecture
                continue
            dst = f"blocks.{offsets[i] + j}."
            if rest in ("attn.relative_position_index", "attn_mask"):
                continue  # regenerated from the window size
            if rest == "attn.relative_position_bias_table":
                rows = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
                if v.shape[0] != rows:
                    old = tuple(src_window) if src_window is not None else _guess_old_window(v.shape[0], window, is_2d)
                    v = resize_bias_table(v, old, window)
                    if not notes or "bias table" not in notes[-1]:
                        notes.append(f"relative position bias tables resized from window {old} to {window}")
                out[dst + rest] = v
                continue
            mm = re.match(r"(.+)\.(weight|bias)$", rest)
            if mm and mm.group(1) in _BLOCK_PARTS:
                out[dst + rest] = v
            else:
                unused.append(orig)
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)$", k)
        if m and int(m.group(1)) < len(depths) - 1:
            out[f"merges.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = v
            continue
        if k == "patch_embed.proj.weight" and v.dim() == 4:
            # 2D (C, 3, 4, 4) -> 3D (C, 3, 2, 4, 4): repeated over the 2 frames the kernel spans,
            # halved so a clip of identical frames embeds as the image did
            v = v.unsqueeze(2).repeat(1, 1, 2, 1, 1) / 2
            notes.append("2D patch embedding inflated to (C, 3, 2, 4, 4)")
            out[k] = v
            continue
        if k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
                 "patch_embed.norm.bias", "norm.weight", "norm.bias"):
            out[k] = v
            continue
        unused.append(orig)  # cls_head.*, head.*, layers.N.downsample of a missing stage, ...
    if not out:
        raise ValueError("state dict does not look like a (Video) Swin backbone: none of its keys "
                         f"({short_list(sorted(sd))}) maps to patch_embed / layers.N.blocks.M / norm")
    return out, sorted(unused), notes


def load_swin(module, path_or_sd, strict_shapes: bool = True, src_window: Optional[Sequence[int]] = None) -> dict:
    """Load Video Swin weights into `module`: our VideoSwin, or a VALOR model with vision=swin
    (keys go under `vision.`).  Returns {loaded, missing (ours left at init), unused (checkpoint
    keys with no counterpart), shape_mismatch, resized}; logs missing / unused keys."""
    from .swin import VideoSwin
    swin = module if isinstance(module, VideoSwin) else getattr(module, "vision", None)
    if not isinstance(swin, VideoSwin):
        raise TypeError(f"load_swin: {type(module).__name__} has no Video Swin encoder (set model.vision=swin)")
    sd = read_swin_checkpoint(path_or_sd) if isinstance(path_or_sd, str) else unwrap(dict(path_or_sd))
    mapped, unused, notes = swin_to_ours(sd, swin, src_window)
    own = swin.state_dict()
    mism = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in mapped.items()
            if k in own and tuple(own[k].shape) != tuple(v.shape)}
    if mism and strict_shapes:
        raise ValueError("Swin checkpoint does not fit the configured architecture (checkpoint vs model "
                         f"shapes): {dict(list(mism.items())[:6])}; check model.swin_size")
    unused += sorted(k for k in mapped if k not in own)
    mapped = {k: v for k, v in mapped.items() if k in own and k not in mism}
    res = swin.load_state_dict(mapped, strict=False)
    report = {"loaded": len(mapped), "missing": sorted(res.missing_keys), "unused": unused,
              "shape_mismatch": {k: list(v) for k, v in mism.items()}, "resized": notes}
    log.info("Video Swin weights: %d tensors loaded, %d of ours left at init, %d checkpoint tensors unused%s",
             report["loaded"], len(report["missing"]), len(report["unused"]),
             "; " + "; ".join(notes) if notes else "")
    if report["missing"]:
        log.warning("Swin tensors not in the checkpoint (kept at init): %s", short_list(report["missing"]))
    if report["unused"]:
        log.warning("checkpoint tensors without a counterpart: %s", short_list(report["unused"]))
    return report


__all__ = ["swin_to_ours", "load_swin", "resize_bias_table", "read_swin_checkpoint", "unwrap"]
