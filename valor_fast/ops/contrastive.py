"""MGA contrastive losses: public entry points and the eager (torch) reference.

Shapes: coarse text (B, D) vs modal (B, D); fine text (Bt, T, D) with weights/masks (Bt, T)
vs modal (Bm, M, D) with weights/masks (Bm, M).  Masks are bool, True = real token; weights
are pre-softmax logits.  logits = S / temperature; loss = mean of the text->modal and
modal->text cross-entropies with the matching pair on the diagonal.

The eager functions here (`*_ref`, `info_nce`) are the spec, shared by the tests and benchmarks.
The public entry points (`contrastive_loss`, `fine_similarity`, `grouped_contrastive_loss`, at
the end of the file) dispatch to Triton (valor_fast.kernels.contrastive), CUDA C++
(csrc/contrastive.cu through valor_fast.ops._cuda) or torch; they take optional gather /
local_loss keywords for negatives from all data-parallel ranks.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

NEG = float("-inf")


def _acc(x: torch.Tensor) -> torch.Tensor:
    # accumulate in fp32 at least; float64 inputs stay float64 (the tests' reference precision)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_fine(text, text_weight, text_mask, modal, modal_weight, modal_mask):
    if text.dim() != 3 or modal.dim() != 3:
        raise ValueError(f"fine similarity needs text (B, T, D) and modal (B, M, D); got "
                         f"text {tuple(text.shape)}, modal {tuple(modal.shape)}")
    if text.shape[-1] != modal.shape[-1]:
        raise ValueError(f"feature sizes differ: text D={text.shape[-1]}, modal D={modal.shape[-1]}")
    for name, t, ref in (("text_weight", text_weight, text), ("text_mask", text_mask, text),
                         ("modal_weight", modal_weight, modal), ("modal_mask", modal_mask, modal)):
        if t is not None and tuple(t.shape) != tuple(ref.shape[:2]):
            raise ValueError(f"{name} must be {tuple(ref.shape[:2])}, got {tuple(t.shape)}")


def _masked_softmax(w: Optional[torch.Tensor], mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # (B, N) weights -> softmax over real tokens; uniform when no weights are given.
    if w is None:
        w = torch.zeros(like.shape[:2], dtype=torch.float32, device=like.device)
    w = _acc(w)
    if mask is not None:
        w = w.masked_fill(~mask, NEG)
    return torch.softmax(w, dim=-1)


def fine_similarity_ref(text, text_weight, text_mask, modal, modal_weight, modal_mask) -> torch.Tensor:
    """VALOR's weighted token-wise max-similarity, eager: materialises (Bt, Bm, T, M).

    S(a, b) = 1/2 [ sum_i softmax(w_a)_i max_j <a_i, b_j> + sum_j softmax(w_b)_j max_i <a_i, b_j> ]
    with padded tokens excluded from the max and the softmax.
    """
    _check_fine(text, text_weight, text_mask, modal, modal_weight, modal_mask)
    sim = torch.einsum("atd,bmd->abtm", _acc(text), _acc(modal))  # (Bt, Bm, T, M)
    if modal_mask is not None:
        sim_t = sim.masked_fill(~modal_mask[None, :, None, :], NEG)
    else:
        sim_t = sim
    if text_mask is not None:
        sim_m = sim.masked_fill(~text_mask[:, None, :, None], NEG)
    else:
        sim_m = sim
    t2m = sim_t.max(dim=-1).values  # (Bt, Bm, T): best modal token for each text token
    m2t = sim_m.max(dim=-2).values  # (Bt, Bm, M): best text token for each modal token
    wt = _masked_softmax(text_weight, text_mask, text)    # (Bt, T)
    wm = _masked_softmax(modal_weight, modal_mask, modal)  # (Bm, M)
    # padded rows hold -inf maxima but zero weight: zero them so 0 * -inf does not give nan
    t2m = torch.where(wt[:, None, :] > 0, t2m, torch.zeros_like(t2m))
    m2t = torch.where(wm[None, :, :] > 0, m2t, torch.zeros_like(m2t))
    s_t = (t2m * wt[:, None, :]).sum(-1)
    s_m = (m2t * wm[None, :, :]).sum(-1)
    return 0.5 * (s_t + s_m)


def _check_valid(valid: Optional[torch.Tensor], B: int, name: str = "valid") -> None:
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B,):
        got = f"{tuple(valid.shape)} {valid.dtype}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"{name} must be a ({B},) bool tensor (True = sample takes part), got {got}")


def info_nce(sim: torch.Tensor, temperature: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) similarity with matches on the diagonal.  valid (B,) bool:
    only pairs of valid samples take part (see `masked_info_nce`)."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"InfoNCE needs a square (B, B) similarity, got {tuple(sim.shape)}")
    logits = _acc(sim) / _acc(temperature)
    if valid is not None:
        _check_valid(valid, sim.shape[0])
        return masked_info_nce(logits, logits, 0, valid, valid)
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def masked_ce_rows(logits: torch.Tensor, offset: int, row_valid: torch.Tensor,
                   col_valid: torch.Tensor) -> torch.Tensor:
    """(R, C) logits -> (R,) cross-entropy of row i against label column offset + i, softmax over
    the valid columns only; 0 at invalid rows.  No host sync: masks stay tensors.  Excluded
    columns are -inf (exp gives exactly 0, so the valid rows' values are those of the subset);
    excluded rows are zeroed first so their log-sum-exp is finite and their gradient exactly 0."""
    z = logits.masked_fill(~col_valid[None, :], float("-inf")).masked_fill(~row_valid[:, None], 0.0)
    label = torch.arange(offset, offset + logits.shape[0], device=logits.device)
    ce = torch.logsumexp(z, dim=1) - logits.gather(1, label[:, None]).squeeze(1)
    return torch.where(row_valid, ce, torch.zeros_like(ce))


def masked_mean_loss(ce_sum: torch.Tensor, n_valid: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * ce_sum / (2 n) for n >= 2 valid samples, else exactly 0 with zero gradients."""
    n = n_valid.to(ce_sum.dtype)
    loss = ce_sum * (scale / 2.0) / n.clamp(min=1.0)
    return torch.where(n_valid >= 2, loss, torch.zeros_like(loss))


def masked_info_nce(s_rows: torch.Tensor, s_cols: torch.Tensor, offset: int, valid_rows: torch.Tensor,
                    valid_cols: torch.Tensor, world: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE over the valid samples of logits (already divided by the temperature).
    s_rows (B, N): these rows vs all columns; s_cols (N, B): all rows vs these columns; the label
    of local sample i is offset + i; valid_rows (B,), valid_cols (N,) bool.  Square case: N == B,
    offset 0, the same mask twice.  Local case (this rank's B of the N = world * B gathered): the
    loss is scaled by world / (2 n_global), so the mean over ranks is the full-batch loss."""
    ce = (masked_ce_rows(s_rows, offset, valid_rows, valid_cols).sum()
          + masked_ce_rows(s_cols.t(), offset, valid_rows, valid_cols).sum())
    return masked_mean_loss(ce, valid_cols.sum(), float(world))


def contrastive_loss_ref(text, modal, temperature, *, mode="coarse", text_weight=None, text_mask=None,
                         modal_weight=None, modal_mask=None, valid=None) -> torch.Tensor:
    """valid (B,) bool: the loss of the valid samples' sub-batch, exactly 0 below 2 of them (the
    reference selects the sub-batch, a host sync; the dispatched ops mask without one)."""
    if valid is not None:
        _check_valid(valid, text.shape[0])
        idx = valid.nonzero().squeeze(1)
        if idx.numel() < 2:  # zero, still connected to every input (their gradients are zeros)
            return 0.0 * contrastive_loss_ref(text, modal, temperature, mode=mode, text_weight=text_weight,
                                              text_mask=text_mask, modal_weight=modal_weight, modal_mask=modal_mask)
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return contrastive_loss_ref(pick(text), pick(modal), temperature, mode=mode, text_weight=pick(text_weight),
                                    text_mask=pick(text_mask), modal_weight=pick(modal_weight),
                                    modal_mask=pick(modal_mask))
    if mode == "coarse":
        if text.dim() != 2 or modal.dim() != 2 or text.shape != modal.shape:
            raise ValueError(f"coarse mode needs text and modal of equal shape (B, D); got "
                             f"{tuple(text.shape)} and {tuple(modal.shape)}")
        sim = _acc(text) @ _acc(modal).t()
    elif mode == "fine":
        sim = fine_similarity_ref(text, text_weight, text_mask, modal, modal_weight, modal_mask)
    else:
        raise ValueError(f"mode must be 'coarse' or 'fine', got {mode!r}")
    return info_nce(sim, temperature)


GroupSpec = Union[torch.Tensor, Tuple]


def resolve_groups(groups: Dict[str, GroupSpec], mode: str) -> Dict[str, GroupSpec]:
    """Expand a fine-mode ("v", "a") concatenation spec into (modal, weight, mask)."""
    out = {}
    for name, spec in groups.items():
        if mode == "fine" and isinstance(spec, tuple) and spec and all(isinstance(s, str) for s in spec):
            parts = []
            for s in spec:
                if s not in groups or isinstance(groups[s], tuple) and all(isinstance(x, str) for x in groups[s]):
                    raise ValueError(f"group {name!r} concatenates {spec}, but {s!r} is not a plain group")
                parts.append(groups[s])
            modal = torch.cat([p[0] for p in parts], dim=1)
            ws = [p[1] if p[1] is not None else torch.zeros(p[0].shape[:2], device=p[0].device) for p in parts]
            ms = [p[2] if p[2] is not None else torch.ones(p[0].shape[:2], dtype=torch.bool, device=p[0].device)
                  for p in parts]
            out[name] = (modal, torch.cat(ws, dim=1), torch.cat(ms, dim=1))
        else:
            out[name] = spec
    return out


def _check_valid_groups(valid: Optional[Dict[str, torch.Tensor]], groups: dict, B: int) -> None:
    if valid is None:
        return
    if not isinstance(valid, dict):
        raise ValueError(f"valid must be a dict group name -> (B,) bool mask, got {type(valid).__name__}")
    for name, v in valid.items():
        if name not in groups:
            raise ValueError(f"valid names group {name!r}, which is not among the groups {sorted(groups)}")
        _check_valid(v, B, f"valid[{name!r}]")


def grouped_contrastive_loss_ref(text, groups, temperature, *, mode, text_weight=None, text_mask=None,
                                 valid=None):
    _check_valid_groups(valid, groups, text.shape[0])
    valid = valid or {}
    res = {}
    for name, spec in resolve_groups(groups, mode).items():
        if mode == "fine":
            modal, mw, mm = spec
            res[name] = contrastive_loss_ref(text, modal, temperature, mode="fine", text_weight=text_weight,
                                             text_mask=text_mask, modal_weight=mw, modal_mask=mm,
                                             valid=valid.get(name))
        else:
            res[name] = contrastive_loss_ref(text, spec, temperature, mode="coarse", valid=valid.get(name))
    return res


# ==============================================================================================
# dispatch: public entry points
# ==============================================================================================
# Backend choice, per call:
#   1. a backend forced in code (`set_backend` / `use_backend`, for tests and benchmarks),
#   2. else the env var VALOR_FAST_CONTRASTIVE=triton|cuda|torch|auto (read per call),
#   3. else auto: CUDA tensors -> triton (valor_fast.kernels.contrastive) when triton is installed,
#      else cuda (csrc/contrastive.cu via ctypes) when the library was built, else torch;
#      CPU tensors -> torch.  Forcing triton on CPU needs TRITON_INTERPRET=1; forcing cuda needs
#      CUDA tensors and the built library.
# Auto also falls back to torch for inputs the kernels do not take (float64, D > 1024, T > 128,
# more than 128 modal tokens per clip).  The choice is logged once per (op, backend, reason).
# Triton is preferred over cuda in auto: its tiles use tensor cores, the CUDA C++ kernels are
# plain fp32 FMA tiling (a dependency-free fallback).
import contextlib  # noqa: E402
import os  # noqa: E402
from typing import Iterator, List  # noqa: E402

from ..utils.deps import HAS_TRITON, INSTALL_HINTS  # noqa: E402
from ..utils.log import log_once  # noqa: E402
from . import distributed as _dist  # noqa: E402

BACKENDS = ("triton", "cuda", "torch")
_ENV = "VALOR_FAST_CONTRASTIVE"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_D, _MAX_T, _MAX_SLOTS = 1024, 128, 128
_forced: Optional[str] = None


def _validate(name: Optional[str], source: str) -> Optional[str]:
    if name is None or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source}: contrastive backend must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force 'triton', 'cuda' or 'torch' for the contrastive ops (None / 'auto': automatic)."""
    global _forced
    _forced = _validate(name, "set_backend")


def get_forced_backend() -> Optional[str]:
    if _forced is not None:
        return _forced
    return _validate(os.environ.get(_ENV, "").strip().lower() or None, _ENV)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """`with use_backend("triton"): ...` forces a backend inside the block."""
    global _forced
    prev = _forced
    _forced = _validate(name, "use_backend")
    try:
        yield
    finally:
        _forced = prev


def _cuda_available() -> bool:
    from . import _cuda
    return _cuda.available()


def available_backends(device: torch.device) -> List[str]:
    """Backends that can run on tensors of `device` in this process."""
    out = ["torch"]
    if HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        out.append("triton")
    if device.type == "cuda" and _cuda_available():
        out.append("cuda")
    return out


def _log(op: str, backend: str, reason: str) -> None:
    if not torch.compiler.is_compiling():
        log_once(f"contrastive:{op}:{backend}:{reason}", f"contrastive {op}: {backend} backend ({reason})")


def _choose(op: str, device: torch.device, unsupported: Optional[str]) -> str:
    """`unsupported`: why the kernels cannot take these inputs, or None."""
    forced = get_forced_backend()
    if forced == "torch":
        _log(op, "torch", "forced")
        return "torch"
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"contrastive {op}: backend 'triton' forced but triton is not installed "
                               f"({INSTALL_HINTS['triton']})")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"contrastive {op}: backend 'triton' forced for {device.type} tensors; Triton "
                               "runs on CUDA, or on the CPU only with TRITON_INTERPRET=1")
        _log(op, "triton", "forced")
        return "triton"
    if forced == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"contrastive {op}: backend 'cuda' forced for {device.type} tensors")
        if not _cuda_available():
            from . import _cuda
            raise RuntimeError(f"contrastive {op}: backend 'cuda' forced but {_cuda.why_unavailable()}")
        _log(op, "cuda", "forced")
        return "cuda"
    if device.type != "cuda":
        _log(op, "torch", f"auto: {device.type} tensors")
        return "torch"
    if unsupported is not None:
        _log(op, "torch", f"auto: {unsupported}")
        return "torch"
    if HAS_TRITON:
        _log(op, "triton", "auto: CUDA")
        return "triton"
    if _cuda_available():
        _log(op, "cuda", f"auto: CUDA, triton not installed ({INSTALL_HINTS['triton']})")
        return "cuda"
    _log(op, "torch", f"auto: triton not installed ({INSTALL_HINTS['triton']}) and csrc not built")
    return "torch"


def _kernels(backend: str):
    if backend == "triton":
        import valor_fast.kernels.contrastive as k
        return k
    from . import _cuda
    return _cuda


# ---- coarse ----------------------------------------------------------------------------------

def _coarse_unsupported(text: torch.Tensor) -> Optional[str]:
    if text.dtype not in _KERNEL_DTYPES:
        return f"dtype {text.dtype}"
    if text.shape[-1] > _MAX_D:
        return f"D={text.shape[-1]} > {_MAX_D}"
    return None


def info_nce_local(s_rows: torch.Tensor, s_cols: torch.Tensor, temperature: torch.Tensor, offset: int,
                   valid_rows: Optional[torch.Tensor] = None, valid_cols: Optional[torch.Tensor] = None,
                   world: int = 1) -> torch.Tensor:
    """InfoNCE of this rank's rows against all gathered columns (open_clip's local_loss).
    s_rows (B, N): local texts vs all clips; s_cols (N, B): all texts vs local clips.  The label of
    local row i is column offset + i.  Equals `info_nce` when B == N and offset == 0.  With masks
    (valid_rows (B,) local, valid_cols (N,) gathered) see `masked_info_nce`."""
    B = s_rows.shape[0]
    if s_cols.shape != s_rows.shape[::-1] or not 0 <= offset <= s_rows.shape[1] - B:
        raise ValueError(f"info_nce_local: s_rows {tuple(s_rows.shape)}, s_cols {tuple(s_cols.shape)}, "
                         f"offset {offset} do not fit")
    t = _acc(temperature)
    if valid_rows is not None:
        return masked_info_nce(_acc(s_rows) / t, _acc(s_cols) / t, offset, valid_rows, valid_cols, world)
    target = torch.arange(offset, offset + B, device=s_rows.device)
    return 0.5 * (F.cross_entropy(_acc(s_rows) / t, target) + F.cross_entropy(_acc(s_cols).t() / t, target))


def _coarse_torch(text, modal, temperature, text_cols, modal_cols, offset, valid_rows=None, valid_cols=None):
    if text_cols is None:
        return info_nce(_acc(text) @ _acc(modal).t(), temperature, valid_rows)
    return info_nce_local(_acc(text) @ _acc(modal_cols).t(), _acc(text_cols) @ _acc(modal).t(), temperature, offset,
                          valid_rows, valid_cols, _dist.world())


def _gathering(gather: bool) -> bool:
    return bool(gather) and _dist.world() > 1


def _coarse(text, modal, temperature, gather: bool, local_loss: bool, text_all=None, valid=None) -> torch.Tensor:
    """`text_all`: the already gathered text (grouped calls gather it once for all groups)."""
    if text.dim() != 2 or modal.dim() != 2 or text.shape != modal.shape:
        raise ValueError(f"coarse mode needs text and modal of equal shape (B, D); got "
                         f"{tuple(text.shape)} and {tuple(modal.shape)}")
    if temperature.numel() != 1:
        raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
    _check_valid(valid, text.shape[0])
    tc = mc = None
    offset = 0
    vr = vc = valid
    if _gathering(gather):
        t_all = _dist.gather_features(text) if text_all is None else text_all
        m_all = _dist.gather_features(modal)
        v_all = None if valid is None else _dist.gather_features(valid)
        if local_loss:
            tc, mc, offset, vc = t_all, m_all, _dist.rank() * text.shape[0], v_all
        else:
            text, modal, vr, vc = t_all, m_all, v_all, v_all
    backend = _choose("coarse", text.device, _coarse_unsupported(text))
    if backend != "torch" and valid is not None:
        _log("coarse", "torch", f"{backend} kernels take no valid mask yet")
        backend = "torch"
    if backend == "torch":
        return _coarse_torch(text, modal, temperature, tc, mc, offset, vr, vc)
    return _kernels(backend).coarse_loss(text, modal, temperature, tc, mc, offset)


# ---- fine ------------------------------------------------------------------------------------

def _is_concat(spec) -> bool:
    return isinstance(spec, tuple) and len(spec) > 0 and all(isinstance(s, str) for s in spec)


def _fine_unsupported(text, parts) -> Optional[str]:
    dts = {text.dtype} | {p[0].dtype for p in parts}
    if not dts <= set(_KERNEL_DTYPES):
        return f"dtype {sorted(map(str, dts))}"
    if text.shape[-1] > _MAX_D:
        return f"D={text.shape[-1]} > {_MAX_D}"
    if text.shape[1] > _MAX_T:
        return f"T={text.shape[1]} > {_MAX_T}"
    slots = sum(p[0].shape[1] for p in parts)
    if slots > _MAX_SLOTS:
        return f"{slots} modal tokens per clip > {_MAX_SLOTS}"
    return None


def _ones_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _fine_sims(backend: str, text, text_weight, text_mask, parts) -> List[torch.Tensor]:
    """parts: [(modal, weight, mask)] of one group, or two groups x, y -> [S_x] or [S_x, S_y, S_x++y],
    each (Bt, Bm)."""
    for m, w, k in parts:
        _check_fine(text, text_weight, text_mask, m, w, k)
    if backend == "torch":
        out = [fine_similarity_ref(text, text_weight, text_mask, *p) for p in parts]
        if len(parts) == 2:
            cat = resolve_groups({"x": parts[0], "y": parts[1], "xy": ("x", "y")}, "fine")["xy"]
            out.append(fine_similarity_ref(text, text_weight, text_mask, *cat))
        return out
    wt = _masked_softmax(text_weight, text_mask, text)  # (Bt, T), zero at padding
    tmask = _ones_mask(text) if text_mask is None else text_mask
    if len(parts) == 1:
        x, wx, mx = parts[0]
        mw = _masked_softmax(wx, mx, x)[None]  # (1, Bm, Mx)
        mmask = _ones_mask(x) if mx is None else mx
        y = None
    else:
        (x, wx, mx), (y, wy, my) = parts
        px, py = _masked_softmax(wx, mx, x), _masked_softmax(wy, my, y)  # (Bm, Mx), (Bm, My)
        zx, zy = torch.zeros_like(px), torch.zeros_like(py)
        lx = torch.zeros(x.shape[:2], device=x.device) if wx is None else wx
        ly = torch.zeros(y.shape[:2], device=y.device) if wy is None else wy
        mx_ = _ones_mask(x) if mx is None else mx
        my_ = _ones_mask(y) if my is None else my
        mmask = torch.cat([mx_, my_], 1)  # (Bm, Mx+My)
        pxy = _masked_softmax(torch.cat([_acc(lx), _acc(ly)], 1), mmask, x)  # softmax over the concatenation
        # group weights in the kernel's slot layout, zero outside the group's slots: (3, Bm, Mx+My)
        mw = torch.stack([torch.cat([px, zy], 1), torch.cat([zx, py], 1), pxy])
    S = _kernels(backend).fine_sim_groups(text, wt, tmask, x, y, mw, mmask)
    return list(S.unbind(0))


def _fine_jobs(groups: Dict[str, GroupSpec]):
    """Plan the kernel calls: a concatenation of two plain groups shares one call with both
    parts; other plain groups get one call each; longer concatenations are materialised.
    -> [(parts, names)] where names[i] is the group whose S is the call's i-th output (or None)."""
    plain = {n: s for n, s in groups.items() if not _is_concat(s)}
    for n, s in plain.items():
        if not (isinstance(s, (tuple, list)) and len(s) == 3 and isinstance(s[0], torch.Tensor)):
            raise ValueError(f"fine mode: group {n!r} must be (modal, modal_weight, modal_mask) or a tuple "
                             f"of group names, got {type(s).__name__}")
    jobs, done = [], set()
    for n, s in groups.items():
        if not _is_concat(s):
            continue
        bad = [p for p in s if p not in plain]
        if bad:
            raise ValueError(f"group {n!r} concatenates {s}, but {bad} are not plain groups")
        if len(s) == 2:
            names = [None if s[0] in done else s[0], None if s[1] in done or s[1] == s[0] else s[1], n]
            jobs.append(([tuple(plain[s[0]]), tuple(plain[s[1]])], names))
            done.update(x for x in names if x is not None)
        else:
            jobs.append(([resolve_groups({**plain, n: s}, "fine")[n]], [n]))
            done.add(n)
    for n, s in plain.items():
        if n not in done:
            jobs.append(([tuple(s)], [n]))
    return jobs


def _fine_group_sims(backend, text, text_weight, text_mask, groups) -> Dict[str, torch.Tensor]:
    out = {}
    for parts, names in _fine_jobs(groups):
        for name, S in zip(names, _fine_sims(backend, text, text_weight, text_mask, parts)):
            if name is not None:
                out[name] = S
    return out


def _gather_fine(text, text_weight, text_mask, groups):
    """All-gather the text (token axis padded to the longest over ranks) and every plain group."""
    if text_mask is None:
        text_mask = _ones_mask(text)
    if text_weight is None:
        text_weight = torch.zeros(text.shape[:2], dtype=torch.float32, device=text.device)
    t = _dist.gather_features(text, pad_dim=1)
    tw = _dist.gather_features(text_weight, pad_dim=1)
    tm = _dist.gather_features(text_mask, pad_dim=1, pad_value=False)
    g = {}
    for n, s in groups.items():
        if _is_concat(s):
            g[n] = s
        else:
            m, w, k = s
            g[n] = (_dist.gather_features(m), None if w is None else _dist.gather_features(w),
                    None if k is None else _dist.gather_features(k))
    return t, tw, tm, g


def _fine_group_losses(text, groups, temperature, text_weight, text_mask, gather, local_loss, valid=None):
    if text.dim() != 3:
        raise ValueError(f"fine mode needs text (B, T, D), got {tuple(text.shape)}")
    if temperature.numel() != 1:
        raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
    plain_parts = [tuple(s) for s in groups.values() if not _is_concat(s)]
    dev = text.device
    unsupported = None
    for s in plain_parts:
        unsupported = unsupported or _fine_unsupported(text, [s])
    cat_slots = [sum(groups[p][0].shape[1] for p in s) for s in groups.values()
                 if _is_concat(s) and all(p in groups and not _is_concat(groups[p]) for p in s)]
    if unsupported is None and cat_slots and max(cat_slots) > _MAX_SLOTS:
        unsupported = f"{max(cat_slots)} concatenated modal tokens per clip > {_MAX_SLOTS}"
    backend = _choose("fine", dev, unsupported)
    valid = valid or {}
    if not _gathering(gather):
        S = _fine_group_sims(backend, text, text_weight, text_mask, groups)
        return {n: info_nce(s, temperature, valid.get(n)) for n, s in S.items()}
    t_all, tw_all, tm_all, g_all = _gather_fine(text, text_weight, text_mask, groups)
    v_all = {n: _dist.gather_features(v) for n, v in valid.items()}
    if not local_loss:
        S = _fine_group_sims(backend, t_all, tw_all, tm_all, g_all)
        return {n: info_nce(s, temperature, v_all.get(n)) for n, s in S.items()}
    # local: this rank's texts vs all clips, and all texts vs this rank's clips
    rows = _fine_group_sims(backend, text, text_weight, text_mask, g_all)
    cols = _fine_group_sims(backend, t_all, tw_all, tm_all, groups)
    off = _dist.rank() * text.shape[0]
    return {n: info_nce_local(rows[n], cols[n], temperature, off, valid.get(n), v_all.get(n), _dist.world())
            for n in rows}


# ---- public ----------------------------------------------------------------------------------

def fine_similarity(text, text_weight, text_mask, modal, modal_weight, modal_mask) -> torch.Tensor:
    """(Bt, Bm) weighted token-wise max-similarity (differentiable), without (Bt, Bm, T, M) on the
    kernel backends."""
    _check_fine(text, text_weight, text_mask, modal, modal_weight, modal_mask)
    part = (modal, modal_weight, modal_mask)
    backend = _choose("fine", text.device, _fine_unsupported(text, [part]))
    return _fine_sims(backend, text, text_weight, text_mask, [part])[0]


def contrastive_loss(text, modal, temperature, *, mode="coarse", text_weight=None, text_mask=None,
                     modal_weight=None, modal_mask=None, valid: Optional[torch.Tensor] = None,
                     gather: bool = False, local_loss: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE (scalar fp32, or float64 for float64 inputs) between text and one modality.

    valid (B,) bool: only samples marked True take part (an invalid row leaves the mean over rows
    of both directions, an invalid column every softmax denominator); exactly 0 with zero
    gradients when fewer than 2 are valid.  The mask stays a tensor: no host sync.  Invalid
    samples' features are still computed, so they must be finite.

    gather=True: under torch.distributed (world > 1) all-gather the features first (gradients go
    back to the owning rank; see valor_fast.ops.distributed for the scaling contract); a no-op in
    one process.  local_loss=True (with gather): this rank's rows vs all gathered columns, labels
    offset by rank * B (every rank passes the same B)."""
    if mode == "coarse":
        return _coarse(text, modal, temperature, gather, local_loss, valid=valid)
    if mode == "fine":
        _check_fine(text, text_weight, text_mask, modal, modal_weight, modal_mask)
        _check_valid(valid, text.shape[0])
        return _fine_group_losses(text, {"m": (modal, modal_weight, modal_mask)}, temperature, text_weight,
                                  text_mask, gather, local_loss, None if valid is None else {"m": valid})["m"]
    raise ValueError(f"mode must be 'coarse' or 'fine', got {mode!r}")


def grouped_contrastive_loss(text, groups, temperature, *, mode, text_weight=None, text_mask=None,
                             valid: Optional[Dict[str, torch.Tensor]] = None, gather: bool = False,
                             local_loss: bool = False) -> Dict[str, torch.Tensor]:
    """Loss per group.  coarse: groups name -> modal (B, D).  fine: name -> (modal, weight, mask) or
    a tuple of group names to concatenate (("v", "a") for T-AV); a two-part concatenation is fused
    with its parts (one read of the features for all three groups).  valid: group name -> (B,)
    bool mask (e.g. {"a": has_audio, "av": has_audio}); a group without one uses every sample;
    semantics as in `contrastive_loss`.  gather / local_loss as in `contrastive_loss`."""
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"groups must be a non-empty dict name -> spec, got {type(groups).__name__}")
    _check_valid_groups(valid, groups, text.shape[0])
    valid = valid or {}
    if mode == "coarse":
        for n, s in groups.items():
            if not isinstance(s, torch.Tensor):
                raise ValueError(f"coarse mode: group {n!r} must be a (B, D) tensor, got {type(s).__name__}")
        t_all = _dist.gather_features(text) if _gathering(gather) and text.dim() == 2 else None
        return {n: _coarse(text, s, temperature, gather, local_loss, t_all, valid.get(n)) for n, s in groups.items()}
    if mode == "fine":
        return _fine_group_losses(text, groups, temperature, text_weight, text_mask, gather, local_loss, valid)
    raise ValueError(f"mode must be 'coarse' or 'fine', got {mode!r}")
