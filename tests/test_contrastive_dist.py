"""Distributed negatives: two gloo CPU processes vs one process on the concatenated batch.

Both paths go through valor_fast.ops.distributed, the one way negatives cross ranks:
full gather (what tasks/mga.py does): each rank gathers every input (text token axes padded to the
longest over ranks, valid masks included) and computes the full-batch loss; local
(`negatives=gather_negatives(...)`): rank r scores its own rows against all gathered columns and
the mean over ranks is the full-batch loss.  In both, the gradient a rank receives for its own
features is N x the single-process gradient of that slice (so DDP / FSDP averaging over ranks
gives exactly the single-process parameter gradient), and the temperature gradient averaged over
ranks equals the single-process one.  Rank texts have different token counts (5 and 7), so the
token-axis padding before the gather is exercised; T-A / T-AV carry a valid mask (clips without
audio) that differs per rank, so the masked counts must be global too.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch / triton are imported

import socket  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from valor_fast.ops import contrastive as C  # noqa: E402
from valor_fast.ops import distributed as D  # noqa: E402
from valor_fast.utils.deps import HAS_TRITON  # noqa: E402

N, B, DIM, T_RANK, MV, MA = 2, 3, 16, (5, 7), 3, 1
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else [])
CASES = [(b, mode, local) for b in BACKENDS for mode in ("coarse", "fine", "fine_floor") for local in (False, True)]


def _inputs(seed: int):
    """Global batch (N*B rows, text padded to max(T_RANK)); rank r's texts have T_RANK[r] tokens."""
    g = torch.Generator().manual_seed(seed)
    T = max(T_RANK)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(text=r(N * B, T, DIM), tw=r(N * B, T), v=r(N * B, MV, DIM), wv=r(N * B, MV), a=r(N * B, MA, DIM),
             wa=r(N * B, MA), tp=r(N * B, DIM), vp=r(N * B, DIM), ap=r(N * B, DIM), tau=torch.tensor(0.2))
    tm = torch.rand(N * B, T, generator=g) > 0.3
    tm[:, 0] = True
    for k in range(N):
        tm[k * B:(k + 1) * B, T_RANK[k]:] = False  # tokens beyond this rank's length are padding
    x["tm"] = tm
    x["mv"] = torch.rand(N * B, MV, generator=g) > 0.2
    x["mv"][:, 0] = True
    # audio present on 2 of rank 0's clips and 1 of rank 1's: >= 2 globally, < 2 on rank 1
    x["has_a"] = torch.tensor([True, False, True, False, True, False])
    # "fine_floor": upstream's padded max on texts 1 and 4 (one per rank); text 1 has one real
    # token and clip 0's first frame opposite it, so its floor bites
    x["floor"] = torch.tensor([False, True, False, False, True, False])
    x["tm"][1] = False
    x["tm"][1, 0] = True
    x["v"][0, 0] = -x["text"][1, 0]
    return x


def _local(x, k):
    """Rank k's slice, text cut to its own token count."""
    sl = slice(k * B, (k + 1) * B)
    out = {n: (v if n == "tau" else v[sl]) for n, v in x.items()}
    for n in ("text", "tw", "tm"):
        out[n] = out[n][:, :T_RANK[k]]
    return out


GRAD_KEYS = {"coarse": ("tp", "vp", "ap", "tau"), "fine": ("text", "tw", "v", "wv", "a", "wa", "tau")}
GRAD_KEYS["fine_floor"] = GRAD_KEYS["fine"]


def _args(x, mode):
    """(text, groups, text kwargs, valid) of the op for inputs x."""
    va = x["has_a"]
    if mode == "coarse":
        return x["tp"], {"v": x["vp"], "a": x["ap"]}, {}, {"a": va}
    groups = {"v": (x["v"], x["wv"], x["mv"]), "a": (x["a"], x["wa"], None), "av": ("v", "a")}
    kw = dict(text_weight=x["tw"], text_mask=x["tm"])
    if mode == "fine_floor":
        kw["text_floor"] = x["floor"]
    return x["text"], groups, kw, {"a": va, "av": va}


def _gathered(x, mode):
    """Every input of this rank all-gathered through valor_fast.ops.distributed (as MGA does)."""
    g = {}
    for k, v in x.items():
        if k == "tau":
            g[k] = v
        elif k in ("text", "tw", "tm"):  # token axes differ per rank
            g[k] = D.gather_features(v, pad_dim=1, pad_value=False if k == "tm" else 0)
        else:
            g[k] = D.gather_features(v)
    return g


def _loss(x, mode, how):
    """how: "single" (this process's batch as is), "gather" (full gather first), "local"."""
    if how == "gather":
        x = _gathered(x, mode)
    text, groups, kw, valid = _args(x, mode)
    neg = D.gather_negatives(text, groups, valid=valid, **kw) if how == "local" else None
    return C.grouped_contrastive_loss(text, groups, x["tau"], mode="coarse" if mode == "coarse" else "fine",
                                      valid=valid, negatives=neg, **kw)


def _run(x, backend, mode, how):
    x = {k: (v.clone().requires_grad_(k in GRAD_KEYS[mode]) if v.is_floating_point() else v) for k, v in x.items()}
    with C.use_backend(backend):
        res = _loss(x, mode, how)
    total = sum((i + 1.0) * v for i, v in enumerate(res.values()))
    total.backward()
    return {k: v.detach() for k, v in res.items()}, {k: x[k].grad for k in GRAD_KEYS[mode]}


def _worker(rank, init, seed, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=N)
    try:
        x = _local(_inputs(seed), rank)
        results = {}
        for case in CASES:
            backend, mode, local = case
            results[case] = _run(x, backend, mode, "local" if local else "gather")
        results["count"] = D.all_reduce_sum(torch.tensor([rank + 1.0], requires_grad=True))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results():
    seed = int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory() as d:
        init = f"tcp://127.0.0.1:{_free_port()}"
        mp.spawn(_worker, args=(init, seed, d), nprocs=N, join=True)
        per_rank = [torch.load(os.path.join(d, f"rank{k}.pt"), weights_only=False) for k in range(N)]
    return seed, per_rank


@pytest.mark.parametrize("backend,mode,local", CASES)
def test_distributed_equals_single_process(dist_results, backend, mode, local):
    seed, per_rank = dist_results
    full = _inputs(seed)
    ref_loss, ref_grad = _run(full, backend, mode, "single")
    tol = dict(rtol=2e-5, atol=2e-6)
    losses = [per_rank[k][(backend, mode, local)][0] for k in range(N)]
    grads = [per_rank[k][(backend, mode, local)][1] for k in range(N)]
    assert all(float(ref_loss[n]) > 0 for n in ref_loss), f"seed {seed}: a degenerate reference"
    for name, ref in ref_loss.items():
        if local:  # mean of the per-rank local losses is the full-batch loss
            torch.testing.assert_close(sum(l[name] for l in losses) / N, ref, **tol)
        else:  # every rank computes the full-batch loss
            for l in losses:
                torch.testing.assert_close(l[name], ref, **tol)
    for name, ref in ref_grad.items():
        if name == "tau":  # replicated parameter: the rank average is the single-process gradient
            torch.testing.assert_close(sum(g["tau"] for g in grads) / N, ref, **tol)
            continue
        for k in range(N):
            want = ref[k * B:(k + 1) * B]
            if name in ("text", "tw"):
                want = want[:, :T_RANK[k]]
            torch.testing.assert_close(grads[k][name] / N, want, **tol,
                                       msg=lambda m: f"seed {seed}, rank {k} grad {name}: {m}")


def test_all_reduce_sum_counts_over_ranks(dist_results):
    """MGC's token counts: the same sum on every rank, outside autograd."""
    _, per_rank = dist_results
    for k in range(N):
        got = per_rank[k]["count"]
        assert float(got) == N * (N + 1) / 2 and not got.requires_grad
    one = torch.tensor([2.0, 3.0])
    assert torch.equal(D.all_reduce_sum(one), one)  # identity in one process
