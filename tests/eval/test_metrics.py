import pytest
import torch

from valor_fast.eval.metrics import caption_metrics, retrieval_metrics, retrieval_ranks


def test_ranks_hand_case():
    sim = torch.tensor([[0.9, 0.1, 0.3],
                        [0.5, 0.4, 0.6],    # correct (1) is third
                        [0.2, 0.2, 0.2]])   # all tied: pessimistic rank 3
    r = retrieval_ranks(sim, [[0], [1], [2]])
    assert r.tolist() == [1, 3, 3]
    m = retrieval_metrics(sim, [0, 1, 2], "v")
    assert m["retrieval/t2v/R@1"] == pytest.approx(1 / 3)
    assert m["retrieval/t2v/R@5"] == 1.0
    assert m["retrieval/t2v/MdR"] == 3.0
    assert m["retrieval/t2v/MnR"] == pytest.approx(7 / 3)
    # reverse: columns as queries.  col0: [0.9,.5,.2] -> text0 rank1; col1: [.1,.4,.2] -> text1 rank1;
    # col2: [.3,.6,.2] -> text2 rank 3
    assert m["retrieval/v2t/R@1"] == pytest.approx(2 / 3)


def test_multiple_captions_per_clip():
    # 4 captions of 2 clips; clip->text counts a hit if any of its captions ranks first
    sim = torch.tensor([[0.9, 0.0], [0.1, 0.2], [0.0, 0.8], [0.3, 0.1]])
    m = retrieval_metrics(sim, [0, 0, 1, 1], "av")
    assert m["retrieval/t2av/R@1"] == pytest.approx(0.5)   # captions 1 and 3 miss
    assert m["retrieval/av2t/R@1"] == 1.0


def test_caption_metrics_perfect_and_wrong():
    refs = {"a": ["a red circle moves", "a red round shape moves"], "b": ["a low tone beeps", "a deep beep"],
            "c": ["a green square slides down", "green box goes down"]}
    perfect = caption_metrics({k: v[0] for k, v in refs.items()}, refs, meteor=False)
    wrong = caption_metrics({k: "the cat sat on the mat" for k in refs}, refs, meteor=False)
    assert perfect["caption/BLEU-4"] > 0.9 and wrong["caption/BLEU-4"] < 0.1
    assert perfect["caption/CIDEr"] > wrong["caption/CIDEr"] + 1.0
    assert perfect["caption/ROUGE-L"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different ids"):
        caption_metrics({"a": "x"}, refs, meteor=False)
