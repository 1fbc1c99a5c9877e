"""A broken model is never scored: NaN embeddings are an error naming the checkpoint, a constant
model scores chance or below through the evaluation driver, duplicate ids of a split are
reported with the annotation file, and eval / caption / embed refuse a random model unless
--random-init.  Batches are made in memory (no media decoding)."""
import logging

import pytest
import torch

import valor_fast.tasks  # noqa: F401
from valor_fast.cli import main
from valor_fast.config import load_config
from valor_fast.eval.dispatch import evaluate_task
from valor_fast.eval.metrics import NonFiniteScoresError
from valor_fast.model.valor import build_model

B, L = 4, 12


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, {"model.image_size": "32", "model.patch_size": "8", "model.audio_frames": "128",
                              "model.text_layers": "1", "model.vision_layers": "1", "model.audio_layers": "1",
                              "train.task": "retrieval", "data.root": "/nonexistent/ds"})


def _batches(n=3, ids=None):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        text = torch.randint(1000, 2000, (B, L), generator=g)
        text[:, 0] = 101
        out.append({"video": torch.randn(B, 4, 3, 32, 32, generator=g), "audio": torch.randn(B, 1, 128, 64, generator=g),
                    "text_ids": text, "text_mask": torch.ones(B, L, dtype=torch.bool),
                    "video_id": list(ids[i * B:(i + 1) * B]) if ids else [f"c{i}_{j}" for j in range(B)],
                    "captions": [[f"caption {i} {j}"] for j in range(B)], "has_audio": torch.ones(B, dtype=torch.bool)})
    return out


class _Loader(list):
    """An evaluation loader over in-memory batches that knows its split (as the real one does)."""

    class dataset:
        split = "test"


def test_constant_model_scores_chance_or_below(cfg):
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()             # every clip and caption maps to the same embedding: all scores tie
    m = evaluate_task(model, _Loader(_batches()), cfg, torch.device("cpu"))
    n = 3 * B
    for g in ("t2v", "t2a", "t2av", "v2t", "a2t", "av2t"):
        assert m[f"retrieval/{g}/R@1"] <= 1 / n and m[f"retrieval/{g}/R@5"] <= 5 / n, (g, m)
        assert m[f"retrieval/{g}/MdR"] >= (n + 1) / 2


def test_nan_model_is_refused_naming_the_checkpoint(cfg):
    model = build_model(cfg.model)
    with torch.no_grad():
        model.text_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteScoresError, match=r"text embeddings of runs/x/model\.safetensors.*'c0_0'"):
        evaluate_task(model, _Loader(_batches()), cfg, torch.device("cpu"), source="runs/x/model.safetensors")
    with pytest.raises(NonFiniteScoresError):   # refused without a name too
        evaluate_task(model, _Loader(_batches()), cfg, torch.device("cpu"))


@pytest.fixture
def eval_log():
    class Keep(logging.Handler):
        lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())
    h = Keep()
    lg = logging.getLogger("valor_fast.eval.evaluate")
    lg.addHandler(h)
    yield h.lines
    lg.removeHandler(h)


def test_duplicate_ids_are_reported_with_the_annotation_file(cfg, eval_log):
    ids = [f"v{i}" for i in range(3 * B)]
    ids[5], ids[9] = "v1", "v1"
    m = evaluate_task(build_model(cfg.model), _Loader(_batches(ids=ids)), cfg, torch.device("cpu"))
    assert m["eval/duplicate_ids"] == 1.0
    hit = [line for line in eval_log if "more than once" in line]
    assert hit and "'v1' x3" in hit[0] and "/nonexistent/ds/test.jsonl" in hit[0], eval_log


@pytest.mark.parametrize("argv", [["eval"], ["caption", "clip.mp4"], ["embed", "--out", "f.safetensors"]])
def test_no_checkpoint_no_score(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--random-init" in err and "Traceback" not in err
