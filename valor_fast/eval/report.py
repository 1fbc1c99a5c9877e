"""What a user looks at after a run: `curves.png` and a one-screen `summary.md` in the run folder.

Inputs are plain data, so any caller (the trainer at the end of a run, `valor-fast eval`, a
notebook over an old run's history.json) can write them:
  history   list of per-step dicts: step, loss, per-term losses (mga/tv, mgc/tav, ...), lr,
            grad_norm, and val/... metrics on the steps where validation ran
  metrics   the final (test) metrics: retrieval/t2av/R@1, caption/CIDEr, train/seconds, ...
  config    the resolved config as a dict ({"model": {...}, "train": {...}, ...})
  examples  (prediction, references) caption pairs

The caption statistics are there so a captioner stuck on one token ("a a a a ...", CIDEr 0) is
visible at a glance rather than only as a low score: distinct-token share of all predicted
tokens, and the share of the most frequent one.

matplotlib (the `viz` extra) is optional: without it the PNG is skipped with one logged line.
Both files are written atomically (temp file in the run folder, then rename).
"""
from __future__ import annotations

import io
import math
import os
from collections import Counter
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..utils import deps
from ..utils.log import get_logger, log_once
from .metrics import simple_tokenize

log = get_logger(__name__)

# one fixed canvas so the PNG's size is known: (rows x 2) panels of 6 x 3.5 in at 100 dpi
PANEL_W, PANEL_H, DPI = 6.0, 3.5, 100
RETRIEVAL_ROWS = ("t2av", "t2v", "t2a", "av2t", "v2t", "a2t")
N_EXAMPLES = 5


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(history: Sequence[Mapping], key: str) -> Tuple[List[float], List[float]]:
    """(steps, values) of `key` over the records that carry a finite value for it."""
    xs, ys = [], []
    for i, r in enumerate(history):
        v = r.get(key)
        if _finite(v):
            xs.append(float(r.get("step", i + 1)))
            ys.append(float(v))
    return xs, ys


def _keys(history: Sequence[Mapping]) -> List[str]:
    seen: Dict[str, None] = {}
    for r in history:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def loss_keys(history: Sequence[Mapping]) -> List[str]:
    """The total loss first, then every per-term loss (a '/' in the name, not val/ or data/)."""
    ks = _keys(history)
    terms = sorted(k for k in ks if "/" in k and not k.startswith(("val/", "data/", "train/")))
    return (["loss"] if "loss" in ks else []) + terms


def caption_stats(predictions: Sequence[str]) -> Dict[str, float]:
    """Token statistics of predicted captions (lower-cased, punctuation stripped): distinct
    tokens / all tokens, the most frequent token and its share, distinct captions / captions.
    A degenerate captioner ("a a a a ...") shows distinct_share ~0 and top_share 1."""
    toks = [t for p in predictions for t in simple_tokenize(p).split()]
    counts = Counter(toks)
    top, top_n = counts.most_common(1)[0] if counts else ("", 0)
    n = len(toks)
    return {"tokens": float(n), "distinct_tokens": float(len(counts)),
            "distinct_share": len(counts) / n if n else 0.0, "top_token": top,
            "top_share": top_n / n if n else 0.0,
            "distinct_captions": float(len(set(predictions))), "captions": float(len(predictions)),
            "empty_captions": float(sum(1 for p in predictions if not simple_tokenize(p)))}


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- curves.png --------------------------------------------------------------------------------

def _val_panels(history: Sequence[Mapping]) -> Tuple[List[str], List[str]]:
    ks = [k for k in _keys(history) if k.startswith("val/")]
    r1 = sorted(k for k in ks if k.endswith("R@1") and _series(history, k)[0])
    cider = sorted(k for k in ks if "cider" in k.lower() and _series(history, k)[0])
    return r1, cider


def _label(key: str) -> str:
    # val/retrieval/t2av/R@1 -> t2av R@1; mga/tv stays
    parts = [p for p in key.split("/") if p not in ("val", "retrieval", "caption")]
    return " ".join(parts) or key


def curves_figure_size(history: Sequence[Mapping]) -> Tuple[int, int]:
    """(width, height) in pixels of the curves.png `write_curves` draws for this history."""
    r1, cider = _val_panels(history)
    rows = 2 if (r1 or cider) else 1
    return int(2 * PANEL_W * DPI), int(rows * PANEL_H * DPI)


def render_curves(history: Sequence[Mapping], title: str = "") -> bytes:
    """PNG bytes: training loss per term and learning rate over steps; a second row with the
    validation retrieval R@1 and CIDEr when the history holds val/ records."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    r1, cider = _val_panels(history)
    rows = 2 if (r1 or cider) else 1
    fig, axes = plt.subplots(rows, 2, figsize=(2 * PANEL_W, rows * PANEL_H), dpi=DPI, squeeze=False)
    try:
        ax = axes[0][0]
        for k in loss_keys(history):
            xs, ys = _series(history, k)
            if xs:
                ax.plot(xs, ys, label=k, lw=2.0 if k == "loss" else 1.0)
        if any(y > 0 for k in loss_keys(history) for y in _series(history, k)[1]):
            ax.set_yscale("log")   # MGC starts near ln(30522) = 10.3, MGA near ln(B): one axis
        ax.set(title="training loss", xlabel="step")
        ax.legend(fontsize=7, ncol=2)
        ax = axes[0][1]
        xs, ys = _series(history, "lr")
        if xs:
            ax.plot(xs, ys, color="tab:purple")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        else:
            ax.text(0.5, 0.5, "no lr in the history", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="learning rate", xlabel="step")
        if rows == 2:
            for ax, keys, name in ((axes[1][0], r1, "validation retrieval R@1"), (axes[1][1], cider, "validation CIDEr")):
                for k in keys:
                    xs, ys = _series(history, k)
                    ax.plot(xs, ys, marker="o", ms=3, label=_label(k))
                if keys:
                    ax.legend(fontsize=7)
                else:
                    ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set(title=name, xlabel="step")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)   # no bbox_inches: the canvas size stays fixed
        return buf.getvalue()
    finally:
        plt.close(fig)


def write_curves(path: str, history: Sequence[Mapping], title: str = "") -> Optional[str]:
    """Write curves.png atomically; None (one logged line) when matplotlib is not installed."""
    if not deps.HAS_MATPLOTLIB:
        log_once("report:no-matplotlib", f"curves.png skipped: matplotlib is not installed "
                                         f"({deps.INSTALL_HINTS['matplotlib']})")
        return None
    _atomic_write_bytes(path, render_curves(history, title))
    return path


# -- summary.md --------------------------------------------------------------------------------

def _fmt_seconds(s: Optional[float]) -> str:
    if not _finite(s):
        return "n/a"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m else f"{s:.1f} s"


def _cell(s: str, width: int = 90) -> str:
    s = " ".join(str(s).split()).replace("|", "\\|")
    return s if len(s) <= width else s[:width - 3] + "..."


def _metric_lines(metrics: Mapping) -> List[str]:
    out = []
    rows = [g for g in RETRIEVAL_ROWS if _finite(metrics.get(f"retrieval/{g}/R@1"))]
    if rows:
        out += ["| retrieval | R@1 | R@5 | R@10 | MdR |", "|---|---:|---:|---:|---:|"]
        for g in rows:
            v = [metrics.get(f"retrieval/{g}/{m}") for m in ("R@1", "R@5", "R@10", "MdR")]
            out.append(f"| {g} | " + " | ".join(f"{x:.3f}" if _finite(x) else "-" for x in v[:3])
                       + (f" | {v[3]:.1f} |" if _finite(v[3]) else " | - |"))
    cap = {k.split("/", 1)[1]: v for k, v in metrics.items()
           if k.startswith("caption/") and k != "caption/n_clips" and _finite(v)}
    if cap:
        out += ["", "caption: " + ", ".join(f"{k} {v:.3f}" for k, v in cap.items())]
    qa = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("qa/") and _finite(v)
          and k != "qa/seconds"}
    if qa:
        out += ["", "qa: " + ", ".join(f"{k} {v:.3f}" for k, v in qa.items())]
    return out or ["(no test metrics: train.final_eval was off)"]


def _recipe_line(config: Mapping, recipe: str) -> str:
    t, m, l = config.get("train", {}) or {}, config.get("model", {}) or {}, config.get("loss", {}) or {}
    bits = [f"model {m.get('size', '?')}"]
    for k in ("steps", "batch_size", "lr", "warmup", "seed"):
        if k in t:
            bits.append(f"{k} {t[k]}")
    for k in ("mga_weight", "mgc_weight", "mask_prob", "groups", "mgc_groups", "mga_group_weights"):
        if k in l:
            bits.append(f"{k} {l[k]}")
    return f"recipe **{recipe or 'custom'}**: " + ", ".join(bits)


def render_summary(history: Sequence[Mapping], metrics: Mapping, config: Mapping,
                   examples: Sequence[Tuple[str, Sequence[str]]], recipe: str = "",
                   wall_s: Optional[float] = None, samples_per_s: Optional[float] = None,
                   curves: Optional[str] = "curves.png") -> str:
    """The summary.md text (about 30 lines)."""
    wall = wall_s if _finite(wall_s) else metrics.get("train/seconds")
    sps = samples_per_s if _finite(samples_per_s) else metrics.get("train/samples_per_s")
    steps = metrics.get("train/steps", history[-1].get("step") if history else None)
    losses = [r["loss"] for r in history if _finite(r.get("loss"))]
    lines = [f"# Run summary{': ' + recipe if recipe else ''}", "", _recipe_line(config, recipe), "",
             f"- steps {int(steps) if _finite(steps) else 'n/a'}, wall time {_fmt_seconds(wall)}, "
             f"{f'{sps:.1f}' if _finite(sps) else 'n/a'} samples/s",
             f"- loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "- loss: no records",
             f"- curves: {curves}" if curves else "- curves: not drawn (pip install -e \".[viz]\")",
             "", "## Test metrics", ""]
    lines += _metric_lines(metrics)
    preds = [p for p, _ in examples]
    if preds:
        st = caption_stats(preds)
        warn = "  **(degenerate: one token dominates)**" if st["top_share"] > 0.5 else ""
        lines += ["", "## Captions", "",
                  f"distinct tokens {int(st['distinct_tokens'])} of {int(st['tokens'])} "
                  f"({100 * st['distinct_share']:.1f}%), most frequent {st['top_token']!r} "
                  f"{100 * st['top_share']:.1f}%, distinct captions {int(st['distinct_captions'])} of "
                  f"{int(st['captions'])}{warn}", "",
                  "| prediction | reference |", "|---|---|"]
        for p, refs in list(examples)[:N_EXAMPLES]:
            lines.append(f"| {_cell(p) or '(empty)'} | {_cell(refs[0]) if refs else '-'} |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str, history: Sequence[Mapping], metrics: Mapping, config: Mapping,
                 examples: Sequence[Tuple[str, Sequence[str]]], recipe: str = "",
                 wall_s: Optional[float] = None, samples_per_s: Optional[float] = None) -> Dict[str, Optional[str]]:
    """Write run_dir/curves.png (when matplotlib is there) and run_dir/summary.md; returns
    {"curves": path or None, "summary": path}."""
    os.makedirs(run_dir, exist_ok=True)
    title = f"{recipe or 'run'}: {os.path.basename(os.path.normpath(run_dir))}"
    curves = write_curves(os.path.join(run_dir, "curves.png"), history, title)
    text = render_summary(history, metrics, config, examples, recipe, wall_s, samples_per_s,
                          os.path.basename(curves) if curves else None)
    summary = os.path.join(run_dir, "summary.md")
    _atomic_write_bytes(summary, text.encode("utf-8"))
    return {"curves": curves, "summary": summary}


__all__ = ["caption_stats", "curves_figure_size", "loss_keys", "render_curves", "render_summary",
           "write_curves", "write_report"]
