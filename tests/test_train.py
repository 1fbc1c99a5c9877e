"""End-to-end: a short pretraining run on a small synthetic set — the loss falls, the run
folder holds config, weights, history and metrics, and eval reloads the checkpoint."""
import json

import pytest

from valor_fast.config import load_config


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    from valor_fast.data.synth import generate
    root = tmp_path_factory.mktemp("synth")
    generate(str(root / "ds"), seed=3, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    return str(root / "ds")


def _cfg(root, out, **over):
    o = {"data.root": root, "model.image_size": "32", "model.patch_size": "8", "train.steps": "30", "train.batch_size": "16",
         "train.lr": "1e-3", "train.out_dir": out, "train.run_name": "t", "train.log_every": "10",
         "eval.max_len": "8", "eval.beam": "2", "data.synth": "false"}
    o.update(over)
    return load_config(None, o)


@pytest.mark.slow
def test_short_pretraining_loss_falls(small_synth, tmp_path):
    from valor_fast.train.trainer import train
    cfg = _cfg(small_synth, str(tmp_path))
    m = train(cfg)
    run = tmp_path / "t"
    for f in ("config.yaml", "model.safetensors", "history.json", "metrics.json"):
        assert (run / f).exists(), f
    hist = json.loads((run / "history.json").read_text())
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first - 0.5, (first, last)
    metrics = json.loads((run / "metrics.json").read_text())
    for k in ("retrieval/t2av/R@1", "retrieval/t2v/R@1", "retrieval/t2a/R@1", "retrieval/av2t/R@1",
              "caption/CIDEr", "caption/BLEU-4", "caption/ROUGE-L"):
        assert k in metrics
        if "R@" in k:
            assert 0.0 <= metrics[k] <= 1.0
    # eval through the CLI reloads the checkpoint and reproduces the retrieval numbers
    from valor_fast.cli import main
    out = tmp_path / "m.json"
    assert main(["eval", "--ckpt", str(run / "model.safetensors"), "--no-caption", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["retrieval/t2av/R@1"] == pytest.approx(metrics["retrieval/t2av/R@1"])


def test_missing_data_is_a_clear_error(tmp_path):
    from valor_fast.data.synth import prepare_data
    cfg = _cfg(str(tmp_path / "nothing"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.synth"):
        prepare_data(cfg)


def test_stale_synthetic_folder_is_regenerated(tmp_path, monkeypatch):
    import valor_fast.data.synth as synth
    from valor_fast.data.synth import prepare_data
    root = tmp_path / "ds"
    root.mkdir()
    (root / "train.jsonl").write_text("{}\n")
    (root / "meta.json").write_text(json.dumps({"version": synth.VERSION - 1, "seed": 0, "clips_per_combo": 4}))
    calls = []
    monkeypatch.setattr(synth, "generate", lambda r, **kw: calls.append((r, kw)))
    cfg = _cfg(str(root), str(tmp_path), **{"data.synth": "true"})
    prepare_data(cfg)
    assert len(calls) == 1 and not (root / "train.jsonl").exists()
    # a folder from the same generator and settings is reused
    root.mkdir()
    (root / "train.jsonl").write_text("{}\n")
    (root / "meta.json").write_text(json.dumps({"version": synth.VERSION, "seed": 0, "clips_per_combo": 4}))
    prepare_data(cfg)
    assert len(calls) == 1 and (root / "train.jsonl").exists()
