"""Model checkpoints: safetensors files written atomically (temp file + rename), so a crash
mid-save never leaves a truncated checkpoint where a good one was."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


def save_model(model: nn.Module, path: str, metadata: Optional[Dict[str, str]] = None) -> str:
    # tied weights (LM head <-> word embeddings) are one tensor here, so the state dict has no
    # aliases; contiguous copies keep safetensors happy with views
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def load_model(model: nn.Module, path: str, strict: bool = True) -> Dict[str, list]:
    """Load a safetensors (or weights_only torch) checkpoint; returns missing/unexpected keys."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # untrusted: tensors only
    res = model.load_state_dict(sd, strict=strict)
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
