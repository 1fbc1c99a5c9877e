"""Recipes ship inside the package and resolve by name; the dataclass defaults are the embedded
default recipe (tiny); a CI-sized run of the default wires up its report (summary.md, curves.png)."""
import json
import os

import pytest
import yaml

from valor_fast.config import RECIPES_DIR, ConfigError, find_recipe, load_config, recipe_names, to_dict

SHIPPED = ["tiny", "base", "large", "valor_b", "valor_l", "finetune_caption", "finetune_qa",
           "finetune_retrieval", "finetune_scst"]


def test_recipes_are_package_data_and_resolve_by_name(tmp_path, monkeypatch):
    assert set(SHIPPED) <= set(recipe_names())
    assert RECIPES_DIR.startswith(os.path.dirname(os.path.abspath(__import__("valor_fast").__file__)))
    setup = open(os.path.join(os.path.dirname(__file__), "..", "setup.py")).read()
    assert '"recipes/*.yaml"' in setup                    # installed with the package
    monkeypatch.chdir(tmp_path)                           # not the repository root
    for name in SHIPPED:
        assert find_recipe(name) == os.path.join(RECIPES_DIR, name + ".yaml")
        assert find_recipe(name + ".yaml") == find_recipe(name)
        load_config(name)                                 # every shipped recipe validates
    # the old place resolves to the shipped recipe; a path is a path
    assert find_recipe("configs/tiny.yaml") == find_recipe("tiny")
    own = tmp_path / "tiny.yaml"
    own.write_text("train:\n  steps: 7\n")
    assert find_recipe(str(own)) == str(own) and load_config(str(own)).train.steps == 7
    assert find_recipe("tiny.yaml") == "tiny.yaml"        # a file here wins over the name
    with pytest.raises(ConfigError, match="not found.*finetune_qa.*tiny"):
        find_recipe("tinny")


def test_dataclass_defaults_are_the_tiny_recipe():
    """One source of truth: every field of the tiny recipe equals the default, and the config the
    defaults make is the recipe's, field for field."""
    with open(find_recipe("tiny")) as f:
        raw = yaml.safe_load(f)
    default = load_config(None)
    for sec, body in raw.items():
        for k, v in body.items():
            assert getattr(getattr(default, sec), k) == v, f"{sec}.{k}: default {getattr(getattr(default, sec), k)!r} != recipe {v!r}"
    assert to_dict(default) == to_dict(load_config("tiny"))


def test_upstream_recipes_keep_upstream_semantics():
    for name in ("valor_b", "valor_l"):
        c = load_config(name)
        assert (c.loss.fine_padding, c.loss.mask_random_from, c.loss.missing_audio) == ("upstream", 106, "zeros")
    for name in ("valor_b", "valor_l", "base", "large"):   # MGC on every group (only tiny skips T-A)
        assert load_config(name).loss.mgc_groups == "", name
        assert load_config(name).loss.mga_group_weights == "", name   # MGA: the plain mean


def test_default_run_smoke_and_identical_to_named_tiny(tmp_path):
    """CI-sized run of the embedded default (the same recipe, a small synthetic set, 3 steps):
    checks the wiring (no --config == --config tiny, the report written and printed), not the number."""
    from valor_fast.cli import main
    from valor_fast.data.synth import generate
    root = tmp_path / "ds"
    generate(str(root), seed=3, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    small = ["--data.root", str(root), "--data.synth", "false", "--model.image_size", "32", "--train.steps", "3",
             "--train.batch_size", "8", "--train.log_every", "1", "--eval.max_len", "6", "--eval.beam", "2",
             "--train.out_dir", str(tmp_path / "runs"), "--train.deterministic", "true", "--train.threads", "1"]
    assert main(["pretrain", "--train.run_name", "default"] + small) == 0
    assert main(["pretrain", "--config", "tiny", "--train.run_name", "named"] + small) == 0
    runs = tmp_path / "runs"
    hist = [json.loads((runs / r / "history.json").read_text()) for r in ("default", "named")]
    strip = [[{k: v for k, v in h.items() if not k.startswith(("time", "perf", "sps", "tflops", "mem"))}
              for h in x] for x in hist]
    assert strip[0] == strip[1]
    m = [json.loads((runs / r / "metrics.json").read_text()) for r in ("default", "named")]
    for k in ("retrieval/t2av/R@1", "caption/CIDEr", "train/final_loss"):
        assert m[0][k] == m[1][k], k
    d = runs / "default"
    summary = (d / "summary.md").read_text()
    assert "recipe **tiny (the default)**" in summary and "retrieval" in summary
    assert "distinct tokens" in summary and "| prediction | reference |" in summary
    caps = json.loads((d / "test_captions.json").read_text())
    assert caps and all(set(v) == {"prediction", "references"} for v in caps.values())
    from valor_fast.utils import deps
    if deps.HAS_MATPLOTLIB:
        assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
