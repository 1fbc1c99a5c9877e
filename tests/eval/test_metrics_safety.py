"""A broken model is never scored: NaN embeddings are an error naming the checkpoint, ties are
never resolved in the model's favour, duplicate ids are reported."""
import numpy as np
import pytest
import torch

from valor_fast.eval.metrics import (NonFiniteScoresError, check_finite, duplicate_ids, require_unique_ids,
                                     retrieval_metrics, retrieval_ranks)


def _ranks_before(sim, gt):
    """The implementation this change replaced (main 57d72d8), for comparison."""
    sim = sim.float().cpu()
    ranks = []
    for q, cols in enumerate(gt):
        row = sim[q]
        best = row[list(cols)].max()
        others = torch.ones_like(row, dtype=torch.bool)
        others[list(cols)] = False
        ranks.append(int((row[others] >= best).sum()) + 1)
    return np.asarray(ranks)


def test_nan_model_is_refused_naming_the_checkpoint():
    n = 6
    sim = torch.randn(n, n)
    sim[2, 4] = float("nan")
    nan_model = torch.full((n, n), float("nan"))
    # the class of failure: with NaN every `>=` is False, so the old ranks say "perfect"
    assert (_ranks_before(nan_model, [[i] for i in range(n)]) == 1).all()
    with pytest.raises(NonFiniteScoresError) as ei:
        retrieval_metrics(nan_model, list(range(n)), "v", source="runs/x/model.safetensors")
    msg = str(ei.value)
    assert "runs/x/model.safetensors" in msg and "t2v similarity" in msg and "\n" not in msg
    with pytest.raises(NonFiniteScoresError, match=r"first at index \(2, 4\)"):
        retrieval_ranks(sim, [[i] for i in range(n)], source="ck")
    inf = torch.randn(n, n)
    inf[0, 0] = float("inf")
    with pytest.raises(NonFiniteScoresError):
        retrieval_metrics(inf, list(range(n)), "a")
    emb = torch.randn(3, 8)
    emb[1, 5] = float("nan")
    with pytest.raises(NonFiniteScoresError, match="text embeddings of step_8"):
        check_finite(emb, "text embeddings", "step_8")


@pytest.mark.parametrize("n", [1, 7, 40])
def test_constant_model_never_beats_chance(n):
    feats_t, feats_c = torch.ones(n, 16), torch.ones(n, 16)     # a model that outputs one vector
    sim = feats_t @ feats_c.t()
    pess = retrieval_metrics(sim, list(range(n)), "v")
    exp = retrieval_metrics(sim, list(range(n)), "v", ties="expected")
    for d in ("t2v", "v2t"):
        assert pess[f"retrieval/{d}/R@1"] == (1.0 if n == 1 else 0.0)   # every rank is n
        assert pess[f"retrieval/{d}/MnR"] == n
        assert exp[f"retrieval/{d}/R@1"] == pytest.approx(1 / n)       # exactly chance
        assert exp[f"retrieval/{d}/R@5"] == pytest.approx(min(5, n) / n)
        assert exp[f"retrieval/{d}/MnR"] == pytest.approx((n + 1) / 2)


def test_ordinary_model_ranks_unchanged():
    g = torch.Generator().manual_seed(0)
    n_clip, caps = 23, 3
    text_to_clip = [c for c in range(n_clip) for _ in range(caps)]
    clip = torch.randn(n_clip, 32, generator=g)
    text = clip.repeat_interleave(caps, 0) + 1.5 * torch.randn(n_clip * caps, 32, generator=g)
    sim = text @ clip.t()
    t2c = [[c] for c in text_to_clip]
    owners = [[t for t, c in enumerate(text_to_clip) if c == k] for k in range(n_clip)]
    np.testing.assert_array_equal(retrieval_ranks(sim, t2c), _ranks_before(sim, t2c))
    np.testing.assert_array_equal(retrieval_ranks(sim.t(), owners), _ranks_before(sim.t(), owners))
    r = retrieval_ranks(sim, t2c)
    assert 1 < r.max() and (r == 1).mean() > 0.2          # a real spread: neither chance nor perfect
    # ties: quantised scores agree with the old pessimistic loop too
    q = (sim * 2).round()
    np.testing.assert_array_equal(retrieval_ranks(q, t2c), _ranks_before(q, t2c))
    # without ties the two tie rules give the same numbers
    a, b = retrieval_metrics(sim, text_to_clip, "v"), retrieval_metrics(sim, text_to_clip, "v", ties="expected")
    assert a == pytest.approx(b)


def test_duplicate_ids_reported():
    assert duplicate_ids(["a", "b", "c"]) == {}
    assert duplicate_ids(["a", "b", "a", "c", "b", "a"]) == {"a": 3, "b": 2}
    require_unique_ids(["a", "b"], "test")
    with pytest.raises(ValueError, match=r"split 'test' \(test.jsonl\) lists 2 id\(s\) more than once: 'a' x3, 'b' x2"):
        require_unique_ids(["a", "b", "a", "c", "b", "a"], "test", "test.jsonl")


def test_bad_ground_truth_named():
    with pytest.raises(ValueError, match="query 1 has no ground-truth item"):
        retrieval_ranks(torch.randn(2, 3), [[0], []])
    with pytest.raises(ValueError, match="outside the 3 candidates"):
        retrieval_ranks(torch.randn(2, 3), [[0], [5]])
