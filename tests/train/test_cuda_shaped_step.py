"""The CUDA configuration of a pretraining step, run on the CPU (issue #17, item 1).

A GPU run trains under bf16 autocast with every dispatcher on its Triton kernel: flash attention
(`ops.attention`), add + LayerNorm, bias + GELU and the LM head + cross-entropy (`ops.fused`), the
fine contrastive kernels (`ops.contrastive`), the grouped decoder (three MGC groups in one pass),
fused AdamW, and on several GPUs DDP or FSDP2 with bf16 parameters and fp32 gradient reduction.
Here the same step runs on the CPU: backends forced to Triton under TRITON_INTERPRET=1 (with
tests/_triton_interp.py making the interpreter round fp32 -> bf16 to nearest even, as the GPU
does), autocast on the CPU in bf16, torch's fused AdamW on the CPU, gloo for two ranks -- one
process, two-process DDP and two-process FSDP2 -- and every loss and gradient is compared with
the fp32 eager path (unfused model, math attention, torch contrastive, one decoder pass per
group, plain AdamW) from the same weights on the same global batch.

Tolerance, and why: bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3), so even a
perfect kernel set leaves an error of a few u after a forward and backward through the matmuls.
The yardstick is measured, not guessed: the same step under bf16 autocast on the eager backends
(what stock PyTorch on a GPU would compute) gives each loss term's and each gradient tensor's
error against fp32 (for a loss term and the gradient norm: the largest over the steps, since a
term's rounding noise is set by its sensitivity, not the step, and one sample a step varies ~5x).
The Triton path must stay within twice that error plus a floor (the
Standards' bound for kernels, applied to the whole step), summed over the model (the relative L2
error of all gradients together, and each loss term), and every single gradient tensor within a
looser per-tensor bound (8 x eager's, plus the floor) so one wrong kernel output cannot hide in a
large model.  Floors: 2 u relative for a loss term, and 0.05 relative plus 2 u of the model's
RMS gradient for a tensor (a tensor whose gradient is all rounding noise has no useful relative
error).  NaN or Inf never passes.  After the first optimiser step the trajectories part: Adam's
first update is lr * g / |g| = lr * sign(g) per element, so wherever rounding flips the sign of a
noise-level gradient element the weights differ by 2 lr, whichever path rounded; the step-2 grad
norm was seen 2-4% off fp32 on the Triton path while eager bf16 happened to land 0.2% off.  So
losses and grad norms from the second step on get a further 5% relative floor: they check that
the fused-AdamW trajectory stays finite and close, not bit-level agreement (the gradients, all
compared at step 1, carry the kernel check).  Fine MGA's gradient is discontinuous (argmaxes over
tokens): a seed where the path under test picked another token than fp32 at a near-tie (a gap
within bf16 noise) and misses a bound is not comparable and xfails naming the pick; a pick that parts from
fp32 at a clear margin fails (see `fine_branch_check`).

Sizes are tiny (width 32, 1 layer per tower, 16 px frames, 8-token captions, a global batch of
4 clips, one of them without audio so the T-A / T-AV masks cross ranks, 2 optimiser steps) to keep
the three variants near a minute under the interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch / triton are imported

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import _triton_interp  # noqa: E402  (tests/ is on sys.path under pytest)
from valor_fast.config import LossConfig, TrainConfig  # noqa: E402
from valor_fast.data.tokenizer import CLS_ID, FIRST_WORD_ID, SEP_ID  # noqa: E402
from valor_fast.model.args import model_config  # noqa: E402
from valor_fast.model.valor import build_model  # noqa: E402
from valor_fast.ops import attention as attn_ops  # noqa: E402
from valor_fast.ops import contrastive as con_ops  # noqa: E402
from valor_fast.ops import fused as fused_ops  # noqa: E402
from valor_fast.runtime import autocast_ctx  # noqa: E402
from valor_fast.tasks.mgc import mask_plan  # noqa: E402
from valor_fast.tasks.pretrain import PretrainTask  # noqa: E402
from valor_fast.train.optim import build_optimizer, param_groups  # noqa: E402
from valor_fast.utils.deps import HAS_TRITON  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAS_TRITON, reason="triton not installed: the Triton path cannot run")]

SMALL = dict(image_size=16, patch_size=8, vision_width=32, vision_heads=2, vision_layers=1,
             text_width=32, text_heads=2, text_ffn=64, text_layers=1,
             audio_width=32, audio_heads=2, audio_layers=1, audio_mel_bins=32, audio_frames=32,
             contra_dim=16, vocab_size=1100, max_positions=16)
GLOBAL_B, FRAMES, TEXT_LEN, STEPS, WORLD = 4, 2, 8, 2, 2
NO_AUDIO = 3            # global index of the clip without audio (rank 1's second clip)
U = 2.0 ** -8           # bf16 unit roundoff
LATER_STEP_FLOOR = 0.05  # relative, for losses / grad norms after the first optimiser step (docstring)
TRAIN = TrainConfig(lr=1e-4, grad_clip=5.0)


# ---------------------------------------------------------------------------------------------
# the data: one fixed random global batch per step, each rank taking its contiguous slice
# ---------------------------------------------------------------------------------------------
def _global_batch(mcfg, step: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    B, L = GLOBAL_B, TEXT_LEN
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    ids = torch.randint(FIRST_WORD_ID, mcfg.vocab_size, (B, L), generator=g)
    pos = torch.arange(L)[None]
    mask = pos < lengths[:, None]
    ids[:, 0] = CLS_ID
    ids[pos == (lengths[:, None] - 1)] = SEP_ID
    ids[~mask] = 0
    has_audio = torch.ones(B, dtype=torch.bool)
    has_audio[NO_AUDIO] = False
    audio = torch.randn(B, 1, mcfg.audio_frames, mcfg.audio_mel_bins, generator=g)
    audio[~has_audio] = 0.0          # what the loaders give a clip without audio
    batch = {"video": torch.randn(B, FRAMES, 3, mcfg.image_size, mcfg.image_size, generator=g),
             "audio": audio, "text_ids": ids, "text_mask": mask, "has_audio": has_audio}
    draws = torch.rand(B, L, 3, generator=g)
    return batch, draws


def _rank_batch(mcfg, loss_cfg, step: int, seed: int, rank: int, world: int) -> dict:
    """Rank `rank`'s slice of the step's global batch with its MGC mask plan (made host-side from
    per-sample draws, as the trainer's task.prepare does, so the split changes nothing)."""
    full, draws = _global_batch(mcfg, step, seed)
    n = GLOBAL_B // world
    sl = slice(rank * n, (rank + 1) * n)
    b = {k: v[sl] for k, v in full.items()}
    plan = mask_plan(b["text_ids"], b["text_mask"], loss_cfg.groups, loss_cfg.mask_prob, mcfg.vocab_size,
                     b["has_audio"], draws=draws[sl])
    return dict(b, **plan)


# ---------------------------------------------------------------------------------------------
# the two paths
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _backends(path: str):
    if path == "triton":
        with attn_ops.use_backend("triton"), fused_ops.use_backend("triton"), con_ops.use_backend("triton"):
            yield
    else:   # the unfused eager model: math attention, plain nn.LayerNorm / F.gelu / full logits
        with attn_ops.use_backend("math"), fused_ops.use_backend("eager"), con_ops.use_backend("torch"):
            yield


def _clean(name: str) -> str:
    for w in ("module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(w, "")
    return name


def _global_losses(losses: dict, world: int) -> dict:
    """The loss terms of the global batch: a rank's MGC terms are its share (local sum x world /
    global count), so the mean over ranks is the global value (as the trainer's metrics log it)."""
    v = torch.stack([x.detach().float() for x in losses.values()])
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(v)
        v = v / world
    return dict(zip(losses, v.tolist()))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()


def run_steps(path: str, precision: str, seed: int, rank: int = 0, world: int = 1, parallel: str = "none",
              mga_mode: str = "fine") -> dict:
    """STEPS optimiser steps of the pretraining task on `path` ("triton": the GPU configuration;
    "eager": the unfused baseline) in `precision`; returns per-step loss terms and gradient norms
    and the first step's full (unsharded) gradients by parameter name."""
    from valor_fast.train.dist import DistInfo
    from valor_fast.train.parallelize import parallelize
    mcfg = model_config("tiny", **SMALL)
    loss_cfg = dataclasses.replace(LossConfig(), mga_mode=mga_mode, grouped_decoder=(path == "triton"))
    torch.manual_seed(seed)
    model = build_model(mcfg)
    task = PretrainTask(model, loss_cfg)
    info = DistInfo(rank=rank, world=world)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        info.mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    root = parallelize(task, model, info, parallel if world > 1 else "fsdp", "none", False, precision)
    dev = torch.device("cpu")
    if path == "triton":
        opt = build_optimizer(root, TRAIN, dev, fused=True)
    else:
        opt = torch.optim.AdamW(param_groups(root, TRAIN), betas=tuple(TRAIN.betas), eps=TRAIN.eps,
                                foreach=False, fused=False)
    amp, _ = autocast_ctx(precision, dev)
    out = {"losses": [], "grad_norm": [], "grads": {}, "fused_adamw": bool(opt.defaults.get("fused")),
           "fine_sims": []}
    with _backends(path):
        for step in range(STEPS):
            batch = _rank_batch(mcfg, loss_cfg, step, seed, rank, world)
            with amp(), (_recording_fine_sims(out["fine_sims"]) if step == 0 else contextlib.nullcontext()):
                losses = root(batch)
            losses["loss"].backward()
            gn = torch.nn.utils.clip_grad_norm_(root.parameters(), TRAIN.grad_clip)
            out["grad_norm"].append(float(_full(gn)))
            out["losses"].append(_global_losses(losses, world))
            if step == 0:
                out["grads"] = {_clean(n): _full(p.grad) for n, p in root.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------------------------------------
# fine MGA's maxima: a near-tie makes the step-1 gradients incomparable
# ---------------------------------------------------------------------------------------------
# Fine MGA routes each gradient through argmaxes (a slot's best text token, a token's best slot,
# and text_floor's max(0, .)), so its gradient is discontinuous in the features.  Near-ties are
# common at these sizes: the fp32 reference's smallest top-2 gap among the step-1 maxima was
# 1.8e-4 .. 3.7e-3 over seeds 1-11 and 42942, while bf16 moves the similarities by ~1e-3 (seed
# 42942: text 2's tokens 0 and 5 against clip 0's frame 0 at 0.28994 / 0.28828 in one process,
# 0.28879 / 0.28956 under FSDP2's bf16 parameters).  Where the path under test took another token
# than fp32 did, its step-1 gradients differ from fp32 by O(1) in the affected rows (seed 42942,
# FSDP2: 13% over the model, 17% of d vision features) whatever the kernels: the torch
# contrastive in fp32 in the same FSDP2 step lands on the same branch and is as far off, and the
# Triton fine kernels' gradients on those inputs are 2e-7 off float64.  So the decisions are
# recomputed (float64, from the op's inputs, not from any kernel) in the reference and the path
# under test; a seed where they part only at near-ties is not comparable (xfail, naming the
# decisions) if it misses a bound; a decision that parts at a clear margin is a real difference and
# fails.
TIE_TOL = 16 * U   # a "near-tie": the reference's gap <= 16 u x the largest |similarity| (~0.06 x 0.8)


@contextlib.contextmanager
def _recording_fine_sims(sink: list):
    """Record, for every fine-similarity call, the float64 token similarities over the real
    tokens (Bt, Bm, T, M), the real (text token, slot) pairs and the floored texts."""
    orig = con_ops._fine_sims

    def rec(backend, text, text_weight, text_mask, parts, text_floor=None):
        with torch.no_grad():
            modal = torch.cat([p[0] for p in parts], 1).double()
            mm = torch.cat([torch.ones(p[0].shape[:2], dtype=torch.bool) if p[2] is None else p[2]
                            for p in parts], 1)
            tm = torch.ones(text.shape[:2], dtype=torch.bool) if text_mask is None else text_mask
            t_real = int(tm.any(0).nonzero().max()) + 1  # the token axis may be padded further (ranks)
            tm = tm[:, :t_real]
            sim = torch.einsum("atd,bmd->abtm", text[:, :t_real].double(), modal)
            sink.append(dict(sim=sim, real=tm[:, None, :, None] & mm[None, :, None, :],
                             floor=None if text_floor is None else text_floor.clone(),
                             groups=[p[0].shape[1] for p in parts]))
        return orig(backend, text, text_weight, text_mask, parts, text_floor)
    con_ops._fine_sims = rec
    try:
        yield
    finally:
        con_ops._fine_sims = orig


def _pick(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.amax(-1) > float("-inf"), x.argmax(-1), -1)  # first index on ties, as the kernels


def _decisions(r: dict):
    """[(what, the index each max chose (-1: nothing real), the values it chose among)]."""
    s = r["sim"].masked_fill(~r["real"], float("-inf"))  # (Bt, Bm, T, M)
    ends = torch.tensor(r["groups"]).cumsum(0).tolist()
    spans = list(zip([0] + ends[:-1], ends)) + ([(0, ends[-1])] if len(ends) > 1 else [])
    out = [(f"token->slot {a}:{b}", _pick(s[..., a:b]), s[..., a:b]) for a, b in spans]
    m2t = s.transpose(2, 3)  # (Bt, Bm, M, T): each slot's best text token
    if r["floor"] is not None:  # a floored text's max is max(0, .): the 0 as one more candidate, last
        zero = torch.where(r["floor"], 0.0, float("-inf")).double()
        m2t = torch.cat([m2t, zero[:, None, None, None].expand(*m2t.shape[:3], 1)], -1)
    out.append(("slot->token", _pick(m2t), m2t))
    return out


def fine_branch_check(got: dict, ref: dict, label: str):
    """None when `got` took every fine max's decision as `ref` did at step 1; a message naming
    the near-tie decisions where it did not.  A decision that parts at more than TIE_TOL fails."""
    assert len(got["fine_sims"]) == len(ref["fine_sims"]), "fine-similarity calls differ"
    ties = []
    for g, r in zip(got["fine_sims"], ref["fine_sims"]):
        scale = float(r["sim"][r["real"]].abs().max())
        for (what, pg, _), (_, pr, sr) in zip(_decisions(g), _decisions(r)):
            for idx in (pg != pr).nonzero().tolist():
                vals = sr[tuple(idx)]
                gap = float(vals[pr[tuple(idx)]] - vals[pg[tuple(idx)]]) if int(pg[tuple(idx)]) >= 0 else float("inf")
                where = f"{what} text {idx[0]} clip {idx[1]} #{idx[2]}: {int(pr[tuple(idx)])} -> {int(pg[tuple(idx)])}"
                assert gap <= TIE_TOL * scale, (f"{label}: a fine max parts from fp32 at a clear margin ({where}, "
                                                f"fp32 gap {gap:.3g} > {TIE_TOL * scale:.3g})")
                ties.append(f"{where} (fp32 gap {gap:.2g})")
    return None if not ties else f"{label}: fine MGA took another token at a near-tie, " + "; ".join(ties)


# ---------------------------------------------------------------------------------------------
# two ranks (gloo): DDP, then FSDP2, in the same two processes
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, port: int, seed: int, out_dir: str, variants) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _triton_interp.install()
    from valor_fast.train.dist import init_distributed, shutdown
    init_distributed("cpu")
    try:
        for parallel, mode in variants:
            res = run_steps("triton", "bf16", seed, rank, WORLD, parallel, mode)
            torch.save(res, os.path.join(out_dir, f"{parallel}_{mode}_rank{rank}.pt"))
            if parallel == "fsdp":   # the yardstick under the same bf16-parameter policy
                res = run_steps("eager", "bf16", seed, rank, WORLD, parallel, mode)
                torch.save(res, os.path.join(out_dir, f"{parallel}_{mode}_eager_rank{rank}.pt"))
    finally:
        shutdown()


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _errors(got: dict, ref: dict) -> dict:
    """Loss-term and gradient errors of `got` against `ref` (both from run_steps)."""
    names = sorted(ref["grads"])
    assert sorted(got["grads"]) == names, set(got["grads"]) ^ set(names)
    rms = math.sqrt(sum(float(ref["grads"][n].double().square().sum()) for n in names)
                    / sum(ref["grads"][n].numel() for n in names))
    per = {n: float((got["grads"][n].double() - ref["grads"][n].double()).norm()) for n in names}
    total = math.sqrt(sum(e * e for e in per.values())) / math.sqrt(
        sum(float(ref["grads"][n].double().square().sum()) for n in names))
    loss = [{k: abs(g[k] - r[k]) for k in r} for g, r in zip(got["losses"], ref["losses"])]
    gn = [abs(g - r) / r for g, r in zip(got["grad_norm"], ref["grad_norm"])]
    return {"per": per, "total": total, "loss": loss, "grad_norm": gn, "rms": rms}


def bound_ratios(got: dict, ref: dict, yard: dict) -> list:
    """[(error / tolerance, what)] for every bound of the module docstring: `got` (the Triton bf16
    path) against `ref` (fp32 eager), the tolerances scaled by `yard` (stock bf16 autocast on
    the eager backends).  A ratio above 1 fails; NaN / Inf give an infinite ratio."""
    e, y = _errors(got, ref), _errors(yard, ref)
    # a loss term's rounding noise is a property of the term (its sensitivity to the features:
    # an MGA term sees them through 1 / temperature, ~14x), not of the step; one eager sample a
    # step is a noisy estimate of it (seen: 3.2e-3 at step 1, 1.5e-2 at step 2 for the same
    # term), so the yardstick of a term is its largest eager bf16 error over the steps
    y_loss = {k: max(s[k] for s in y["loss"]) for k in ref["losses"][0]}
    y_gn = max(y["grad_norm"])
    out = []
    for step, (gl, rl) in enumerate(zip(got["losses"], ref["losses"])):
        assert gl.keys() == rl.keys(), (step, gl.keys(), rl.keys())
        for k in rl:
            tol = 2 * y_loss[k] + 2 * U * abs(rl[k]) + LATER_STEP_FLOOR * bool(step) * abs(rl[k])
            r = e["loss"][step][k] / tol if math.isfinite(gl[k]) else math.inf
            out.append((r, f"step {step + 1} {k}: {gl[k]:.6f} vs fp32 {rl[k]:.6f} (eager bf16 |err| "
                           f"{y['loss'][step][k]:.2e}, largest {y_loss[k]:.2e})"))
    for step, g in enumerate(e["grad_norm"]):
        ok = math.isfinite(got["grad_norm"][step])
        out.append((g / (2 * y_gn + 2 * U + LATER_STEP_FLOOR * bool(step)) if ok else math.inf,
                    f"step {step + 1} grad norm rel err {g:.2e} "
                                                                f"(eager bf16 {y['grad_norm'][step]:.2e})"))
    out.append((e["total"] / (2 * y["total"] + 2 * U), f"all step-1 gradients: rel L2 err {e['total']:.2e} "
                                                       f"(eager bf16 {y['total']:.2e})"))
    for n, err in e["per"].items():
        g = got["grads"][n]
        scale = float(ref["grads"][n].double().norm())
        tol = 8 * y["per"][n] + 0.05 * scale + 2 * U * e["rms"] * math.sqrt(g.numel())
        r = err / tol if bool(torch.isfinite(g).all()) else math.inf
        out.append((r, f"gradient {n}: |err| {err:.2e}, |ref| {scale:.2e}, eager bf16 |err| {y['per'][n]:.2e}"))
    return out


def check_close(got: dict, ref: dict, yard: dict, label: str) -> str:
    """Assert every bound holds; returns a summary line with the tightest one."""
    ratios = bound_ratios(got, ref, yard)
    bad = [f"  {r:.2f} x tol: {what}" for r, what in ratios if not r <= 1.0]
    assert not bad, f"{label}: outside the bf16 bounds:\n" + "\n".join(bad)
    r, what = max(ratios, key=lambda x: x[0])
    e, y = _errors(got, ref), _errors(yard, ref)
    return (f"{label}: step-1 gradients rel L2 err {e['total']:.2e} (eager bf16 {y['total']:.2e}); tightest "
            f"bound at {r:.2f} of its tolerance: {what}")


def check_close_or_tie(got: dict, ref: dict, yard: dict, label: str) -> str:
    """`check_close`, except that a miss on a seed where fine MGA picked another token than fp32
    at a near-tie xfails (naming the pick and the miss): those step-1 gradients are not comparable.
    A pick that parts at a clear margin fails even when the bounds hold."""
    tie = fine_branch_check(got, ref, label)
    try:
        return check_close(got, ref, yard, label)
    except AssertionError as e:
        if tie:
            pytest.xfail(f"{tie}; {e}")
        raise


@pytest.fixture(scope="module")
def seed():
    """Fresh each run (printed in every result line); VALOR_FAST_STEP_SEED=N replays one."""
    return int(os.environ.get("VALOR_FAST_STEP_SEED") or int.from_bytes(os.urandom(4), "little") % 100000)


@pytest.fixture(scope="module")
def interp():
    return _triton_interp.install()


@pytest.fixture(scope="module")
def references(seed):
    """fp32 eager (the reference) and bf16 eager (the yardstick), in this process, per MGA mode."""
    return {mode: (run_steps("eager", "fp32", seed, mga_mode=mode), run_steps("eager", "bf16", seed, mga_mode=mode))
            for mode in ("fine", "coarse")}


# FSDP2 computes in bf16 *parameters* (MixedPrecisionPolicy(param_dtype=bf16)), which autocast
# never does: the weights, the temperature, the fusion and the projections are rounded before
# any kernel runs.  Its yardstick is therefore eager PyTorch under the same FSDP2 policy (two gloo
# ranks, same global batch), not the one-process autocast step: against that one, seed 80608
# missed model.temperature's bound at 1.03x (the temperature's gradient is a sum of cancelling
# terms over every logit, each scaled by the bf16-rounded 1 / temperature), an error eager FSDP2
# bf16 makes too.
DIST_VARIANTS = (("ddp", "coarse"), ("fsdp", "fine"))


@pytest.fixture(scope="module")
def dist_results(seed, interp):
    """DDP (coarse MGA) then FSDP2 (fine MGA) on two gloo ranks; {variant: [rank0, rank1]}."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(_free_port(), seed, d, DIST_VARIANTS), nprocs=WORLD, join=True)
        out = {v: [torch.load(os.path.join(d, f"{v[0]}_{v[1]}_rank{r}.pt"), weights_only=True) for r in range(WORLD)]
               for v in DIST_VARIANTS}
        out.update({v + ("eager",): [torch.load(os.path.join(d, f"{v[0]}_{v[1]}_eager_rank{r}.pt"), weights_only=True)
                                     for r in range(WORLD)] for v in DIST_VARIANTS if v[0] == "fsdp"})
        return out


class _OpRecorder:
    """Records the dtypes every valor_fast custom op (our kernels' entry points) is called with."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        seen = self.seen = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                if name.startswith("valor_fast."):
                    sig = tuple(str(a.dtype).replace("torch.", "") for a in args if torch.is_tensor(a))
                    seen.setdefault(name.split(".")[1], set()).add(sig)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


# the kernels a fine-MGA pretraining step runs on CUDA, forward and backward
STEP_KERNELS = ("flash_attention", "flash_attention_bwd", "add_layer_norm_fwd", "add_layer_norm_bwd",
                "bias_gelu_fwd", "bias_gelu_bwd", "lm_head_ce_fwd", "lm_head_ce_bwd", "fine_sim_fwd", "fine_sim_bwd")


@pytest.fixture(scope="module")
def one_process(seed, interp):
    rec = _OpRecorder()
    with rec.mode:
        got = run_steps("triton", "bf16", seed)
    return got, rec.seen


def test_one_process_bf16_triton_step_matches_fp32_eager(seed, interp, references, one_process):
    assert "bf16_rtne_casts" in interp, interp
    got, kernels = one_process
    assert got["fused_adamw"], "the GPU configuration's fused AdamW did not run"
    missing = [k for k in STEP_KERNELS if k not in kernels]
    assert not missing, f"kernels that did not run in the Triton-forced step: {missing}"
    # under autocast the attention, LayerNorm, GELU and LM-head kernels see bf16 activations
    for k in ("flash_attention", "add_layer_norm_fwd", "bias_gelu_fwd", "lm_head_ce_fwd"):
        assert all(sig[0] == "bfloat16" for sig in kernels[k]), (k, kernels[k])
    print("kernel input dtypes:", {k: sorted(v) for k, v in sorted(kernels.items())})
    ref, yard = references["fine"]
    print(check_close_or_tie(got, ref, yard, f"1 process (seed {seed})"))


def test_the_bounds_catch_small_errors(references, one_process):
    """The check can fail: each corruption below is twice the tolerance of the bound it targets
    (the tolerances scale with the measured eager bf16 noise, which varies with the draw: the
    step-1 gradients' rel L2 error of eager bf16 was 0.9% on one seed and 10% on another, the
    fine MGA projections' gradients cancelling), and a NaN anywhere fails (on the passing result
    above): every gradient scaled (the whole-model bound), the largest gradient tensor alone (its
    own bound), one loss term (its bound)."""
    import copy
    got, _ = one_process
    ref, yard = references["fine"]
    check_close_or_tie(got, ref, yard, "1 process")
    y = _errors(yard, ref)
    big = max(ref["grads"], key=lambda n: float(ref["grads"][n].norm()))
    big_ref = float(ref["grads"][big].double().norm())
    all_tol = 2 * y["total"] + 2 * U
    big_tol = (8 * y["per"][big] + 0.05 * big_ref
               + 2 * U * y["rms"] * math.sqrt(ref["grads"][big].numel())) / big_ref
    k = "mgc/tv"
    loss_tol = (2 * max(s[k] for s in y["loss"]) + 2 * U * abs(ref["losses"][0][k])) / abs(ref["losses"][0][k])

    def scale_all(g):
        for n, t in g["grads"].items():   # the corruption is relative to the reference gradient
            t.copy_(ref["grads"][n] * (1 + 2 * all_tol))

    def scale_big(g):
        g["grads"][big].copy_(ref["grads"][big] * (1 + 2 * big_tol))

    def scale_loss(g):
        g["losses"][0][k] = ref["losses"][0][k] * (1 + 2 * loss_tol)

    for name, edit in (("all grads", scale_all), ("largest grad", scale_big), ("loss term", scale_loss),
                       ("NaN", lambda g: g["grads"][big].view(-1)[0].fill_(float("nan")))):
        bad = copy.deepcopy(got)
        edit(bad)
        assert max(r for r, _ in bound_ratios(bad, ref, yard)) > 1.0, name


@pytest.mark.parametrize("variant", DIST_VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def test_two_rank_bf16_triton_step_matches_fp32_eager(seed, references, dist_results, variant):
    ref, yard = references[variant[1]]
    ranks = dist_results[variant]
    for r, got in enumerate(ranks):
        assert got["fused_adamw"]
        # DDP keeps fp32 parameters under autocast, as the one-process yardstick does; FSDP2's
        # bf16 parameters are measured against eager FSDP2 bf16 (see DIST_VARIANTS)
        y = dist_results[variant + ("eager",)][r] if variant[0] == "fsdp" else yard
        print(check_close_or_tie(got, ref, y, f"{variant[0]} rank {r} ({variant[1]} MGA, seed {seed})"))
    # every rank saw the same global losses and (reduced) gradients
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for n, g in ranks[0]["grads"].items():
        torch.testing.assert_close(ranks[1]["grads"][n], g, rtol=0, atol=0, msg=n)


def test_fine_branch_check_parts_ties_from_real_differences():
    """The near-tie gate: equal picks pass, a pick that parts within TIE_TOL is named (xfail), one
    that parts at a clear margin fails; the floor's 0 counts as a candidate of floored texts."""
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(2, 2, 3, 2, generator=g, dtype=torch.float64) * 0.5
    real = torch.ones(2, 2, 3, 2, dtype=torch.bool)
    real[1, :, 2] = False  # a caption's padding
    rec = lambda s, fl=None: {"fine_sims": [dict(sim=s, real=real, floor=fl, groups=[1, 1])]}  # noqa: E731
    assert fine_branch_check(rec(sim), rec(sim.clone()), "same") is None
    tie, far = sim.clone(), sim.clone()
    tie[0, 1, :, 0] = sim[0, 1, :, 0].max() + 0.5 * TIE_TOL * 0.5  # text 0's best token for slot 0 moves
    tie[0, 1, 1, 0] -= 1e-3
    ref_tie = tie.clone()
    ref_tie[0, 1, 1, 0] += 2e-3  # the reference prefers token 1 by 1e-3: a near-tie
    assert "near-tie" in fine_branch_check(rec(tie), rec(ref_tie), "tie")
    far[0, 1, 0, 0] = 5.0  # a clearly different best token
    with pytest.raises(AssertionError, match="clear margin"):
        fine_branch_check(rec(far), rec(sim), "far")
    neg = -sim  # every max below 0: with the floor the 0 wins, without it a token does
    fl = torch.tensor([True, False])
    assert fine_branch_check(rec(neg, fl), rec(neg.clone(), fl), "floor") is None
    with pytest.raises(AssertionError, match="clear margin"):
        fine_branch_check(rec(neg, fl), rec(neg.clone(), torch.tensor([False, False])), "floor")
