"""MGA (fine and coarse) against references written independently here (tasks/mga.py, ops.contrastive_loss)."""
import math

import pytest
import torch

from valor_fast import ops


def fine_sim_loops(t, tw, tm, m, mw, mm):
    """Direct float64 loops over the definition: S(a,b) = 1/2 [sum_i sw_a_i max_j <a_i,b_j>
    + sum_j sw_b_j max_i <a_i,b_j>] over real tokens only."""
    Bt, Bm = t.shape[0], m.shape[0]
    rows = []
    for a in range(Bt):
        ti = [i for i in range(t.shape[1]) if tm[a, i]]
        row = []
        wa = torch.softmax(torch.stack([tw[a, i] for i in ti]).double(), 0)
        for b in range(Bm):
            mj = [j for j in range(m.shape[1]) if mm[b, j]]
            wb = torch.softmax(torch.stack([mw[b, j] for j in mj]).double(), 0)
            dots = torch.stack([torch.stack([t[a, i].double() @ m[b, j].double() for j in mj]) for i in ti])
            s1 = sum(wa[k] * dots[k].max() for k in range(len(ti)))
            s2 = sum(wb[k] * dots[:, k].max() for k in range(len(mj)))
            row.append(0.5 * (s1 + s2))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def infonce64(S, temp):
    logits = S / temp
    n = S.shape[0]
    lt = -torch.log_softmax(logits, 1)[range(n), range(n)].mean()
    lm = -torch.log_softmax(logits, 0)[range(n), range(n)].mean()
    return 0.5 * (lt + lm)


def _fine_inputs(B, T, M, D, dtype=torch.float64):
    t = torch.nn.functional.normalize(torch.randn(B, T, D, dtype=dtype), dim=-1)
    m = torch.nn.functional.normalize(torch.randn(B, M, D, dtype=dtype), dim=-1)
    tw, mw = torch.randn(B, T, dtype=dtype), torch.randn(B, M, dtype=dtype)
    tm = torch.rand(B, T) > 0.35
    tm[:, 0] = True
    tm[0, 1:] = False        # a caption with a single real token
    mm = torch.rand(B, M) > 0.3
    mm[:, 0] = True
    return t, tw, tm, m, mw, mm


@pytest.mark.parametrize("B,T,M,D", [(5, 7, 3, 16), (7, 9, 5, 8), (3, 4, 1, 32)])
def test_fine_similarity_matches_loops(B, T, M, D):
    t, tw, tm, m, mw, mm = _fine_inputs(B, T, M, D)
    S = ops.fine_similarity(t, tw, tm, m, mw, mm)
    assert S.shape == (B, B)
    torch.testing.assert_close(S.double(), fine_sim_loops(t, tw, tm, m, mw, mm), rtol=1e-5, atol=1e-6)


def test_fine_hand_case():
    # 1 text of 2 tokens vs 1 clip of 2 frames, uniform weights, D=2
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    m = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    z = torch.zeros(1, 2)
    on = torch.ones(1, 2, dtype=torch.bool)
    # dots: t0.m0=1, t0.m1=.6, t1.m0=0, t1.m1=.8; text side: mean(1, .8)=.9; modal side: mean(1, .8)=.9
    S = ops.fine_similarity(t, z, on, m, z, on)
    assert abs(float(S) - 0.9) < 1e-6


def test_fine_loss_and_grads_match_float64():
    B, T, M, D = 7, 6, 4, 12
    t, tw, tm, m, mw, mm = _fine_inputs(B, T, M, D)
    temp = torch.tensor(0.07, dtype=torch.float64)
    leaves64 = [x.clone().requires_grad_(True) for x in (t, tw, m, mw, temp)]
    ref = infonce64(fine_sim_loops(leaves64[0], leaves64[1], tm, leaves64[2], leaves64[3], mm), leaves64[4])
    ref.backward()
    leaves = [x.float().clone().requires_grad_(True) for x in (t, tw, m, mw, temp)]
    out = ops.contrastive_loss(leaves[0], leaves[2], leaves[4], mode="fine", text_weight=leaves[1],
                               text_mask=tm, modal_weight=leaves[3], modal_mask=mm)
    out.backward()
    assert abs(float(out) - float(ref)) < 1e-4 * max(1.0, abs(float(ref)))
    for name, a, b in zip(("text", "text_weight", "modal", "modal_weight", "temperature"), leaves, leaves64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-4, msg=name)
    assert leaves[4].grad.abs() > 0  # the temperature learns


@pytest.mark.parametrize("B", [1, 5, 13])
def test_coarse_loss_and_temperature_grad(B):
    D = 10
    t = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1).requires_grad_(True)
    m = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1).requires_grad_(True)
    temp = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = ops.contrastive_loss(t, m, temp, mode="coarse")
    # independent: per-row / per-column log-sum-exp written out
    S = (t @ m.t()).detach()
    rows = [math.log(sum(math.exp(float(S[i, j]) / 0.1) for j in range(B))) - float(S[i, i]) / 0.1 for i in range(B)]
    cols = [math.log(sum(math.exp(float(S[i, j]) / 0.1) for i in range(B))) - float(S[j, j]) / 0.1 for j in range(B)]
    assert abs(float(loss) - 0.5 * (sum(rows) / B + sum(cols) / B)) < 1e-9
    gt, gm, gtemp = torch.autograd.grad(loss, (t, m, temp))
    # temperature gradient by central finite difference
    eps = 1e-6
    lp = ops.contrastive_loss(t.detach(), m.detach(), torch.tensor(0.1 + eps, dtype=torch.float64), mode="coarse")
    lm = ops.contrastive_loss(t.detach(), m.detach(), torch.tensor(0.1 - eps, dtype=torch.float64), mode="coarse")
    assert abs(float(gtemp) - float(lp - lm) / (2 * eps)) < 1e-5
    assert torch.autograd.gradcheck(lambda a, b, c: ops.contrastive_loss(a, b, c, mode="coarse"),
                                    (t.detach().requires_grad_(), m.detach().requires_grad_(), temp))


def test_grouped_av_is_concatenation():
    B, T, D = 5, 6, 8
    t, tw, tm, v, vw, vm = _fine_inputs(B, T, 3, D, torch.float32)
    a = torch.nn.functional.normalize(torch.randn(B, 1, D), dim=-1)
    aw, am = torch.randn(B, 1), torch.ones(B, 1, dtype=torch.bool)
    temp = torch.tensor(0.05)
    res = ops.grouped_contrastive_loss(t, {"v": (v, vw, vm), "a": (a, aw, am), "av": ("v", "a")}, temp,
                                       mode="fine", text_weight=tw, text_mask=tm)
    direct = ops.contrastive_loss(t, torch.cat([v, a], 1), temp, mode="fine", text_weight=tw, text_mask=tm,
                                  modal_weight=torch.cat([vw, aw], 1), modal_mask=torch.cat([vm, am], 1))
    torch.testing.assert_close(res["av"], direct)
    assert set(res) == {"v", "a", "av"}


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="text_mask"):
        ops.fine_similarity(torch.randn(2, 3, 4), None, torch.ones(2, 5, dtype=torch.bool),
                            torch.randn(2, 2, 4), None, None)
    with pytest.raises(ValueError, match="mode"):
        ops.contrastive_loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor(0.1), mode="medium")
