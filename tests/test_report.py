"""eval/report.py: curves.png and summary.md from a synthetic run history."""
import logging
import math
import os

import pytest

from valor_fast.eval import report
from valor_fast.utils import deps


def _history(steps=40, val_every=10):
    h = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 16.0 * math.exp(-s / 15) + 1.0, "mga/tv": 3.5 * math.exp(-s / 20),
             "mga/tav": 3.4 * math.exp(-s / 12), "mgc/tav": 10.3 * math.exp(-s / 25) + 0.5,
             "lr": 1e-3 * min(1.0, s / 4) * (1 - s / (steps + 1)), "grad_norm": 5.0 + s % 3}
        if s % val_every == 0:
            r.update({"val/retrieval/t2av/R@1": s / steps, "val/retrieval/t2v/R@1": s / (2 * steps),
                      "val/caption/CIDEr": 3.0 * s / steps})
        h.append(r)
    h[5]["mga/tv"] = float("nan")   # a non-finite record is skipped, not plotted
    return h


METRICS = {"retrieval/t2av/R@1": 0.8958, "retrieval/t2av/R@5": 1.0, "retrieval/t2av/R@10": 1.0,
           "retrieval/t2av/MdR": 1.0, "retrieval/t2v/R@1": 0.2291, "retrieval/t2v/R@5": 0.75,
           "retrieval/t2v/R@10": 0.9, "retrieval/t2v/MdR": 2.0, "caption/CIDEr": 2.7777,
           "caption/BLEU-4": 0.7, "caption/n_clips": 48.0, "train/seconds": 431.0,
           "train/samples_per_s": 45.6, "train/steps": 40.0}
CONFIG = {"model": {"size": "tiny"}, "train": {"steps": 40, "batch_size": 32, "lr": 1e-3, "seed": 0},
          "loss": {"mga_weight": 1.5, "mgc_weight": 1.0}}
EXAMPLES = [(f"a red circle moves from left to right while a low tone beeps {i}",
             [f"a red circle moves from left to right while a low tone beeps {i}", "a red ball slides"])
            for i in range(7)]


def test_report_writes_png_and_summary(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    hist = _history()
    out = report.write_report(str(tmp_path), hist, METRICS, CONFIG, EXAMPLES, recipe="tiny")
    assert out["curves"] == str(tmp_path / "curves.png")
    with Image.open(out["curves"]) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size == report.curves_figure_size(hist) == (1200, 700)   # two rows: val present
        # something was drawn: not a blank canvas
        assert len(set(im.convert("L").getdata())) > 10
    text = open(out["summary"]).read()
    assert "recipe **tiny**" in text and "lr 0.001" in text
    assert "| t2av | 0.896 | 1.000 | 1.000 | 1.0 |" in text
    assert "| t2v | 0.229 |" in text
    assert "CIDEr 2.778" in text and "BLEU-4 0.700" in text
    assert "7 min 11 s" in text and "45.6 samples/s" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| a red circle")]
    assert len(rows) == report.N_EXAMPLES                      # 5 of the 7 examples
    assert rows[0] == ("| a red circle moves from left to right while a low tone beeps 0 | "
                       "a red circle moves from left to right while a low tone beeps 0 |")
    assert "degenerate" not in text
    assert len(text.splitlines()) < 45                         # one screen
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic: no temp left behind


def test_curves_without_validation_is_one_row(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    hist = [{k: v for k, v in r.items() if not k.startswith("val/")} for r in _history()]
    path = report.write_curves(str(tmp_path / "c.png"), hist)
    with Image.open(path) as im:
        assert im.size == report.curves_figure_size(hist) == (1200, 350)


def test_caption_stats_flags_a_stuck_captioner():
    st = report.caption_stats(["a a a a a a", "a a a a a a", "a a a a a b"])
    assert st["top_token"] == "a" and st["top_share"] == pytest.approx(17 / 18)
    assert st["distinct_tokens"] == 2 and st["distinct_share"] == pytest.approx(2 / 18)
    assert st["distinct_captions"] == 2
    text = report.render_summary([], {}, CONFIG, [("a a a a", ["a red box slides down"])] * 3)
    assert "degenerate" in text and "most frequent 'a' 100.0%" in text
    assert "no test metrics" in text


def test_no_matplotlib_skips_png_with_install_hint(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(deps, "HAS_MATPLOTLIB", False)
    from valor_fast.utils import log as vlog
    monkeypatch.setattr(vlog, "_ONCE", set())
    logger = logging.getLogger("valor_fast")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger="valor_fast"):
        out = report.write_report(str(tmp_path), _history(), METRICS, CONFIG, EXAMPLES)
    assert out["curves"] is None and not (tmp_path / "curves.png").exists()
    hints = [r.getMessage() for r in caplog.records if "curves.png skipped" in r.getMessage()]
    assert len(hints) == 1 and 'pip install -e ".[viz]"' in hints[0]
    assert "not drawn" in open(out["summary"]).read()
