"""Evaluation pieces of the family models: CoAVT's caption stepper (beam search over a plain
next-token decoder: greedy equals the model's own greedy decoding, the KV cache changes
nothing), the matching-head re-ranking (top-k re-scored as match logit + S, BLIP-2's rule, the
rest kept below in contrastive order), retrieval between two clip sets (V<->A), and a family
training step without host syncs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from valor_fast.eval.family import rerank_scores
from valor_fast.eval.metrics import cross_retrieval_metrics, retrieval_metrics
from valor_fast.model.coavt import CoAVT, coavt_args
from valor_fast.model.decoding import NextTokenStepper, beam_search


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _coavt(**over):
    torch.manual_seed(0)
    kw = dict(image_size=32, max_frames=2, audio_mel_bins=32, audio_frames=32, width=64, heads=2,
              vocab_size=1000, query_count=4, contra_dim=32)
    kw.update(over)
    return CoAVT(coavt_args("tiny", **kw)).eval()


def _av(m, B, g):
    video, audio = torch.randn(B, 2, 3, 32, 32, generator=g), torch.randn(B, 1, 32, 32, generator=g)
    s = m.encode_av(video, audio)
    return video, audio, s


IDS = dict(bos_id=101, eos_id=102, mask_id=103)


def test_greedy_beam_search_with_the_next_token_stepper_is_the_models_greedy_decoding():
    m = _coavt()
    g = torch.Generator().manual_seed(1)
    video, audio, s = _av(m, 3, g)
    q = m.queries(s["av"])
    ids = {**IDS, "eos_id": -1}                                  # never produced: 6 tokens each
    got = beam_search(m, q, None, beam=1, max_len=6, stepper=NextTokenStepper, **ids)
    assert got == m.generate(video, audio, max_len=6, eos=-1)
    # beam 3: the cache does not change the hypotheses, and every caption stays within max_len
    cached = beam_search(m, q, None, beam=3, max_len=5, stepper=NextTokenStepper, **IDS)
    plain = beam_search(m, q, None, beam=3, max_len=5, stepper=NextTokenStepper, use_cache=False, **IDS)
    assert cached == plain and all(len(c) <= 5 for c in cached)


@torch.no_grad()
def test_rerank_rescores_the_top_k_by_the_matching_head():
    m = _coavt()
    g = torch.Generator().manual_seed(2)
    Nc, Nt, L, k = 5, 6, 5, 2
    _, _, s = _av(m, Nc, g)
    av, av_mask = s["av"], torch.ones(s["av"].shape[:2], dtype=torch.bool)
    ids = torch.randint(200, 999, (Nt, L), generator=g)
    tmask = torch.ones(Nt, L, dtype=torch.bool)
    tmask[1, 3:] = False
    th = m.encode_text(ids, tmask)
    S = torch.randn(Nt, Nc, generator=g)
    t2c, c2t = rerank_scores(m, S, k, av, av_mask, th, tmask, torch.device("cpu"))

    def itm(t, c):
        n = int(tmask[t].sum())
        return float(m.match_logits(av[c:c + 1], None, th[t:t + 1, :n], tmask[t:t + 1, :n])[0, 1])

    for scores, got, by_text in ((S, t2c, True), (S.t(), c2t.t(), False)):
        top = scores.topk(k, dim=1).indices
        for q in range(scores.shape[0]):
            for j in range(scores.shape[1]):
                t, c = (q, j) if by_text else (j, q)
                if j in top[q].tolist():
                    want = float(scores[q, j]) + itm(t, c)
                else:
                    want = float(scores[q, j]) - 1e4
                assert got[q, j].item() == pytest.approx(want, abs=1e-4 if j in top[q].tolist() else 2e-3), (by_text, q, j)
            # every re-ranked candidate ranks above every other one
            assert got[q, top[q]].min() > got[q][[j for j in range(scores.shape[1]) if j not in top[q].tolist()]].max()


def test_cross_retrieval_names_both_directions():
    sim = torch.eye(4) + 0.01 * torch.randn(4, 4)
    got = cross_retrieval_metrics(sim, [0, 1, 2, 3], "v", "a")
    assert got["retrieval/v2a/R@1"] == 1.0 and got["retrieval/a2v/R@1"] == 1.0
    perm = cross_retrieval_metrics(sim[:, [1, 0, 3, 2]], [0, 1, 2, 3], "v", "a")
    assert perm["retrieval/v2a/R@1"] == 0.0
    # text retrieval is the same function with rows named "t"
    owners = [0, 0, 1, 2, 3, 3]
    tsim = torch.randn(6, 4)
    assert retrieval_metrics(tsim, owners, "av") == cross_retrieval_metrics(tsim, owners, "t", "av")


# -- host syncs -----------------------------------------------------------------------------------
# value reads gated on CPU tensors (a GPU step skips them; the task's prepare checked on the host)
CPU_ONLY = ("mine_negatives",)


class _Syncs(TorchDispatchMode):
    """Counts aten._local_scalar_dense (what .item(), bool(), int(), float() of a tensor
    dispatch to) outside CPU_ONLY."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            import traceback
            stack = traceback.extract_stack()
            if not any(f.name in CPU_ONLY for f in stack):
                self.calls.append("".join(traceback.format_list(stack[-10:-1])))
        return func(*args, **(kwargs or {}))


def test_family_steps_make_no_host_syncs():
    """Forward + backward of a prepared batch (clips without audio included) reads no value from
    the device: every data-dependent shape was planned by prepare on the host."""
    import test_coavt as C
    import test_vlsa as V
    from valor_fast.tasks.coavt import CoAVTTask
    from valor_fast.tasks.vlsa import VLSATask
    g = torch.Generator().manual_seed(4)
    cb = C._batch(4, lengths=[7, 5, 6, 7])
    cb["has_audio"] = torch.tensor([True, False, True, True])
    vb = V._clip_batch(4, g)
    vb["has_audio"] = torch.tensor([True, True, False, True])
    for task, b in ((CoAVTTask(C._model()), cb), (VLSATask(V._model()), vb)):
        p = task.prepare(b, g)
        with _Syncs() as mode:
            task(p)["loss"].backward()
        assert mode.calls == [], f"{type(task).__name__}: {len(mode.calls)} host syncs, the first from:\n{mode.calls[0]}"
