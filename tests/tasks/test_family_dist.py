"""Data parallelism of the CoAVT and VLSA objectives: two gloo CPU processes, each on its half of
a global batch, against one process on the whole batch (float64 models).  Checked: the hard
negatives each rank mines from the gathered similarities are the ones the single process mines
for those rows (both rules); the host-side draws (patch masks, word masks, matching partners)
do not depend on the split; every rank's share of each loss averages to the single-process
loss; and the rank-averaged parameter gradients (what DDP / FSDP hand the optimiser) equal the
single-process gradients.  Rank texts are padded to different lengths (5 and 7 tokens) and only
rank 1 holds a clip without audio, so the padding and mask gathers are exercised.  One spawn
serves both models (process start-up is most of the cost)."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import test_coavt as C
import test_vlsa as V
from valor_fast.tasks.coavt import CoAVTLossArgs, CoAVTTask
from valor_fast.tasks.vlsa import VLSALossArgs, VLSATask

WORLD, LOCAL, LENS = 2, 3, ((5, 4, 5), (4, 7, 6))
TOL = dict(rtol=1e-7, atol=1e-9)


def _global_batch():
    b = C._batch(WORLD * LOCAL, dtype=torch.float64, lengths=[n for r in LENS for n in r],
                 g=torch.Generator().manual_seed(5))
    v = V._clip_batch(WORLD * LOCAL, torch.Generator().manual_seed(6))
    b["vlsa_audio"] = v["audio"].double()           # the VLSA test model reads 64-frame slices
    b["has_audio"][4] = False                       # rank 1 holds a clip without audio, rank 0 none
    return b


def _rank_batch(b, r):
    out = {k: v[r * LOCAL:(r + 1) * LOCAL] for k, v in b.items()}
    L = max(LENS[r])
    out["text_ids"], out["text_mask"] = out["text_ids"][:, :L], out["text_mask"][:, :L]
    return out


def _run(task, b, seed):
    p = task.prepare(b, torch.Generator().manual_seed(seed))
    out = task(p)
    task.zero_grad()
    out["loss"].backward()
    grads = {n: p_.grad.detach().clone() for n, p_ in task.named_parameters() if p_.grad is not None}
    draws = {k: v for k, v in p.items() if k.startswith(("vlsa_", "coavt_"))}
    return {k: v.detach() for k, v in out.items()}, getattr(task, "mined", None), grads, draws


def _cases():
    coavt = {rule: (lambda rule=rule: CoAVTTask(C._model(dtype=torch.float64), CoAVTLossArgs(hard_negatives=rule)))
             for rule in ("hardest", "sample")}
    vlsa = {"vlsa": lambda: VLSATask(V._model(torch.float64), VLSALossArgs())}
    return {**coavt, **vlsa}


def _for(name, b):
    if name == "vlsa":
        b = dict(b, audio=b["vlsa_audio"])
    return {k: v for k, v in b.items() if k != "vlsa_audio"}


def _worker(r, init, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=r, world_size=WORLD)
    try:
        res = {name: _run(make(), _for(name, _rank_batch(_global_batch(), r)), seed=11)
               for name, make in _cases().items()}
        torch.save(res, os.path.join(out_dir, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(f"tcp://127.0.0.1:{_free_port()}", d), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _check(name, ranks, full_keys, share_keys):
    torch.set_num_threads(1)
    ref_loss, ref_mined, ref_grad, ref_draws = _run(_cases()[name](), _for(name, _global_batch()), seed=11)
    got = [x[name] for x in ranks]
    for r in range(WORLD):
        sl = slice(r * LOCAL, (r + 1) * LOCAL)
        for k, v in ref_draws.items():
            assert torch.equal(got[r][3][k], v[sl]), f"{name} rank {r} draw {k}"
        if ref_mined is not None:
            assert got[r][1][0].tolist() == ref_mined[0][sl].tolist(), f"{name} rank {r} AV negatives"
            assert got[r][1][1].tolist() == ref_mined[1][sl].tolist(), f"{name} rank {r} text negatives"
        for k in full_keys:                       # every rank scores the global batch
            torch.testing.assert_close(got[r][0][k], ref_loss[k], **TOL)
    for k in share_keys:                          # rank shares: their mean is the global loss
        torch.testing.assert_close(sum(x[0][k] for x in got) / WORLD, ref_loss[k], **TOL)
    assert set(ref_grad) == set(got[0][2])
    for n, want in ref_grad.items():
        torch.testing.assert_close(sum(x[2][n] for x in got) / WORLD, want, **TOL,
                                   msg=lambda s: f"{name} grad {n}: {s}")


@pytest.mark.parametrize("rule", ["hardest", "sample"])
def test_coavt_two_processes_equal_one(ranks, rule):
    _check(rule, ranks, ("coavt/avt", "coavt/at", "coavt/vt"), ("coavt/match", "coavt/lm", "loss"))


def test_vlsa_two_processes_equal_one(ranks):
    _check("vlsa", ranks, ("vlsa/tv", "vlsa/ta", "vlsa/va"),
           ("vlsa/mm_video", "vlsa/mm_audio", "vlsa/mm_text", "vlsa/gam_av", "vlsa/gam_at", "loss"))
