"""Tasks (valor_fast/tasks): the registry, host-side draws that do not depend on how the global
batch is split over ranks, fixed loss keys whatever the batch holds, and a step whose batch has
no audio at all."""
import pytest
import torch

from valor_fast.config import LossConfig, load_config, model_config
from valor_fast.model.valor import build_model
from valor_fast.tasks import TASKS, Task, build_task, get_task, register_task
from valor_fast.tasks.base import masked_mean, sample_generators
from valor_fast.data.tokenizer import CLS_ID, SEP_ID
from valor_fast.tasks.mgc import mask_plan, masking_draws
from valor_fast.tasks.pretrain import PretrainTask, mga_weights_of, pretrain_step_losses
from valor_fast.tasks.qa import QATask

SMALL = dict(image_size=32, vision_width=64, vision_heads=2, text_width=64, text_heads=2, text_ffn=128,
             audio_width=64, audio_heads=2, contra_dim=32, audio_frames=128)
KEYS = {"loss", "mga/tv", "mga/ta", "mga/tav", "mgc/tv", "mgc/ta", "mgc/tav"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(model_config("tiny", **SMALL))


def _batch(B=6, L=12, frames=2, seed=0, has_audio=None):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, L + 1, (B,), generator=g)
    lens[0] = L
    mask = torch.arange(L)[None] < lens[:, None]
    ids = torch.randint(2000, 3000, (B, L), generator=g)
    ids[:, 0] = CLS_ID
    ids[torch.arange(B), lens - 1] = SEP_ID
    ids[~mask] = 0
    return {"video": torch.randn(B, frames, 3, 32, 32, generator=g), "audio": torch.randn(B, 1, 128, 64, generator=g),
            "has_audio": torch.ones(B, dtype=torch.bool) if has_audio is None else has_audio,
            "text_ids": ids, "text_mask": mask, "index": torch.arange(100, 100 + B),
            "qa": [[{"question": "what shape?", "answer": "circle"}, {"question": "what colour?", "answer": "red"},
                    {"question": "how high is the tone?", "answer": "very high"}] for _ in range(B)]}


def _rows(b, sl):
    out = {k: (v[sl] if torch.is_tensor(v) else v[sl]) for k, v in b.items()}
    L = int(out["text_mask"].sum(1).max())        # each rank pads to its own longest caption
    out["text_ids"], out["text_mask"] = out["text_ids"][:, :L], out["text_mask"][:, :L]
    return out


def test_registry_builds_each_task_and_takes_plugins(model):
    assert {"pretrain", "retrieval", "caption", "qa", "scst"} <= set(TASKS)
    for name, ev in (("pretrain", "caption"), ("retrieval", "retrieval"), ("caption", "caption"), ("qa", "qa")):
        cfg = load_config(None, {"train.task": name})
        task = build_task(model, cfg)
        assert isinstance(task, Task) and task.name == name and task.evaluation == ev
        assert task.loss_keys()[0] == "loss" and len(set(task.loss_keys())) == len(task.loss_keys())
    with pytest.raises(ValueError, match="train.task must be one of"):
        get_task("nosuch")
    with pytest.raises(ValueError, match="mga_weight"):
        build_task(model, load_config(None, {"train.task": "retrieval", "loss.mga_weight": "0"}))

    @register_task("_test_plugin")
    class Plugin(PretrainTask):
        evaluation = "retrieval"
    try:
        assert get_task("_test_plugin") is Plugin and Plugin.name == "_test_plugin"
        with pytest.raises(ValueError, match="already registered"):
            register_task("_test_plugin")(type("Other", (PretrainTask,), {}))
        with pytest.raises(ValueError, match="evaluation"):
            register_task("_test_bad")(type("Bad", (PretrainTask,), {"evaluation": "bleu"}))
    finally:
        TASKS.pop("_test_plugin")


def test_draws_do_not_depend_on_the_rank_split(model):
    """The mask plan (pretraining) and the QA pair + mask plan of every sample are the same
    whether the global micro-batch is prepared whole or as two ranks' halves, padded to their
    own lengths; and they follow the step's generator."""
    b = _batch(B=6, L=12)
    step = lambda: torch.Generator().manual_seed(1234)
    for task, ids_key, mask_key in ((PretrainTask(model, LossConfig()), "text_ids", "text_mask"),
                                    (QATask(model, LossConfig(groups="tav"), 16), "qa_ids", "qa_mask")):
        whole = task.prepare(b, step())
        halves = [task.prepare(_rows(b, sl), step()) for sl in (slice(0, 3), slice(3, 6))]
        rows = [(h, r) for h in halves for r in range(3)]
        for i, (h, r) in enumerate(rows):
            m = whole[mask_key][i]
            n = int(m.sum())
            assert torch.equal(h[ids_key][r, :n], whole[ids_key][i, :n])
            assert torch.equal(h["mgc_input"][r, :n], whole["mgc_input"][i, :n]), (type(task).__name__, i)
        assert sum(int(h["mgc_counts"].sum()) for h in halves) == int(whole["mgc_counts"].sum())
        other = task.prepare(b, torch.Generator().manual_seed(99))
        assert not torch.equal(other["mgc_input"], whole["mgc_input"])


def test_masking_draws_fit_the_real_tokens():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    gens = sample_generators(torch.Generator().manual_seed(0), torch.tensor([7, 8]))
    d = masking_draws(mask, gens)
    assert d.shape == (2, 4, 3) and (d[~mask] == 1.0).all() and (d[mask] < 1.0).all()
    # a sample's draws are its own: the same index gives the same draws in another batch
    d2 = masking_draws(mask[1:], sample_generators(torch.Generator().manual_seed(0), torch.tensor([8])))
    assert torch.equal(d2[0], d[1])
    plan = mask_plan(torch.tensor([[101, 5, 6, 0], [101, 5, 0, 0]]), mask, "tv,ta", 0.6, draws=d,
                     has_audio=torch.tensor([True, False]))
    # T-A of the clip without audio predicts nothing; every caption predicts >= 1 token in T-V
    assert plan["mgc_counts"][0] >= 2 and plan["mgc_counts"][1] >= 1
    with pytest.raises(ValueError, match="at least one token"):
        mask_plan(torch.tensor([[101, 0]]), torch.tensor([[True, False]]), "tv", draws=torch.rand(1, 2, 3))


@pytest.mark.parametrize("audio", ["all", "some", "none"])
def test_fixed_keys_and_a_batch_without_audio(model, audio):
    has = {"all": torch.ones(6, dtype=torch.bool), "some": torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool),
           "none": torch.zeros(6, dtype=torch.bool)}[audio]
    every = LossConfig(mgc_groups="")     # MGC on all three groups
    task = PretrainTask(model, every)
    b = task.prepare(_batch(has_audio=has, seed=3), torch.Generator().manual_seed(5))
    model.zero_grad(set_to_none=True)
    out = pretrain_step_losses(model, b, every)
    assert set(out) == KEYS == set(task.loss_keys())
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    audio_grad = sum(float(p.grad.abs().sum()) for p in model.audio.parameters() if p.grad is not None)
    if audio == "none":
        # T-A terms are masked zeros, left out of both means; no gradient reaches the audio encoder
        for k in ("mga/ta", "mga/tav", "mgc/ta"):
            assert float(out[k].detach()) == 0.0, k
        want = 1.5 * out["mga/tv"] + 1.0 * (out["mgc/tv"] + out["mgc/tav"]) / 2
        torch.testing.assert_close(out["loss"], want)
        assert audio_grad == 0.0
    else:
        assert all(float(out[k].detach()) > 0 for k in KEYS)
        assert audio_grad > 0


def test_masked_mean():
    x = torch.tensor([2.0, 5.0, 7.0])
    assert float(masked_mean(x, torch.tensor([True, False, True]))) == 4.5
    assert float(masked_mean(x, torch.zeros(3, dtype=torch.bool))) == 0.0
    assert float(masked_mean(list(x), [torch.tensor(True)] * 3)) == pytest.approx(14 / 3)


def test_mgc_on_a_subset_of_the_groups(model):
    """loss.mgc_groups captions only its groups (the embedded default: tav) while MGA keeps all
    three; the total is 1.5 x mean(MGA) + 1.0 x the one MGC term, and the keys say so."""
    cfg = LossConfig(mgc_groups="tav", mga_group_weights="")
    task = PretrainTask(model, cfg)
    assert task.loss_keys() == ("loss", "mga/tv", "mga/ta", "mga/tav", "mgc/tav")
    assert task.flop_groups() == (("tv", "ta", "tav"), ("tav",))
    b = task.prepare(_batch(seed=4), torch.Generator().manual_seed(6))
    assert b["mgc_counts"].shape == (1,)          # one group planned
    out = pretrain_step_losses(model, b, cfg)
    assert set(out) == set(task.loss_keys())
    want = 1.5 * (out["mga/tv"] + out["mga/ta"] + out["mga/tav"]) / 3 + out["mgc/tav"]
    torch.testing.assert_close(out["loss"], want)
    # the same draws captioning all groups: its tav term is the one this step computed
    every = LossConfig(mgc_groups="", mga_group_weights="")
    ref = pretrain_step_losses(model, PretrainTask(model, every).prepare(_batch(seed=4), torch.Generator().manual_seed(6)),
                               every)
    torch.testing.assert_close(out["mgc/tav"], ref["mgc/tav"])
    torch.testing.assert_close(out["mga/tv"], ref["mga/tv"])
    # the groups of loss.groups that mgc_groups also lists, in loss.groups' order
    assert PretrainTask(model, LossConfig(groups="tav,tv", mgc_groups="tv,tav")).mgc_groups == ["tav", "tv"]
    assert PretrainTask(model, LossConfig(groups="tv", mgc_groups="tv,tav")).loss_keys() == ("loss", "mga/tv", "mgc/tv")


def test_mga_group_weights(model):
    """loss.mga_group_weights: MGA = 1.5 x sum(w_g L_g) / sum(w_g) over the present groups; a group
    it does not list weighs 1; the terms themselves do not change; a group without an eligible
    sample leaves the weighted mean of the others."""
    cfg = LossConfig(mgc_weight=0.0, mga_group_weights="tv:2,ta:0.5")
    b = _batch(seed=5)
    out = pretrain_step_losses(model, b, cfg)
    want = 1.5 * (2 * out["mga/tv"] + 0.5 * out["mga/ta"] + 1.0 * out["mga/tav"]) / 3.5
    torch.testing.assert_close(out["loss"], want)
    plain = pretrain_step_losses(model, b, LossConfig(mgc_weight=0.0, mga_group_weights=""))
    for g in ("tv", "ta", "tav"):
        torch.testing.assert_close(out[f"mga/{g}"], plain[f"mga/{g}"])
    torch.testing.assert_close(plain["loss"], 1.5 * (plain["mga/tv"] + plain["mga/ta"] + plain["mga/tav"]) / 3)
    assert not torch.allclose(out["loss"], plain["loss"])
    torch.testing.assert_close(masked_mean(torch.tensor([2.0, 5.0, 7.0]), torch.tensor([True, False, True]), (2.0, 9.0, 0.5)),
                               torch.tensor((2 * 2.0 + 0.5 * 7.0) / 2.5))
    assert float(masked_mean(torch.tensor([2.0, 5.0]), torch.zeros(2, dtype=torch.bool), (1.0, 2.0))) == 0.0
    # the embedded default's weights, in loss.groups' order; unlisted groups 1, untrained ignored
    assert mga_weights_of(LossConfig()) == (2.0, 0.5, 0.5)
    assert mga_weights_of(LossConfig(groups="tav,tv", mga_group_weights="tv:3,ta:0.25")) == (1.0, 3.0)
