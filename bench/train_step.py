"""One VALOR pretraining step: the engine (`--impl fast`) against the way it is usually trained
(`--impl eager`), same weights, same batch.

    python bench/train_step.py --size base --batch 32                 # both impls, bf16 on CUDA
    python bench/train_step.py --size base --find-max-batch           # + the largest batch that fits
    python bench/train_step.py --size tiny --batch 4 --device cpu --steps 3   # CI: harness + parity

eager  the same architecture run unfused, as upstream VALOR trains it: attention by explicit
       matmul -> softmax -> matmul (`ops.attention` backend "math", no flash kernel), nn.Linear +
       F.gelu and add-then-nn.LayerNorm (fused backend "eager"), the LM head materialising the
       (N, V) logits before F.cross_entropy, the contrastive losses from full B x B (x T x M)
       similarity tensors (contrastive backend "torch"), one decoder pass per MGC group each
       projecting the memory K/V again, bf16 autocast (fp32 on CPU), torch.optim.AdamW with
       foreach=False and fused=False.
fast   the engine's choice for the device: attention / fused / contrastive dispatchers on "auto"
       (flash kernels, Triton fused ops on CUDA), the three MGC groups in one decoder pass with
       memory K/V projected once, fused AdamW on CUDA; --compile adds torch.compile per block
       (--compile-mode reduce-overhead for CUDA graphs).

Before anything is timed, both impls run `--parity-steps` optimiser steps from the same weights on
the same batch and their losses must agree (relative tolerance --tol; default 1e-4 in fp32, 3e-2
under bf16 autocast); otherwise the script exits 1 and reports nothing.  Then per impl: median
step time over --steps, samples/s, peak memory, a forward-phase breakdown (h2d copy, encoders,
MGA, decoder + MGC, backward, optimiser; from a separately synchronised step), model TFLOP/s
(valor_fast.model.flops) and MFU over the device's bf16 matmul peak measured in the same run.
Rows are appended as JSON lines to bench/results/train_step.jsonl (with device, versions, git
commit and command line) unless --no-save.
"""
import argparse
import contextlib
import copy
import dataclasses
import math
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from bench.common import append_result, env_info, measure_peaks, time_ms  # noqa: E402
from valor_fast.config import LossConfig, TrainConfig  # noqa: E402
from valor_fast.model.args import model_config  # noqa: E402
from valor_fast.model.valor import build_model  # noqa: E402
from valor_fast.ops import attention as attn_ops  # noqa: E402
from valor_fast.ops import contrastive as con_ops  # noqa: E402
from valor_fast.ops import fused as fused_ops  # noqa: E402
from valor_fast.data.tokenizer import CLS_ID, FIRST_WORD_ID, SEP_ID  # noqa: E402
from valor_fast.tasks.mgc import mask_plan  # noqa: E402
from valor_fast.tasks.pretrain import mgc_groups_of, move_batch, pretrain_step_losses  # noqa: E402
from valor_fast.train.optim import param_groups  # noqa: E402
from valor_fast.train.parallelize import apply_compile  # noqa: E402
from valor_fast.model.flops import training_flops_per_sample  # noqa: E402

DEFAULT_OUT = os.path.join(_HERE, "results", "train_step.jsonl")
IMPLS = ("eager", "fast")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="both", choices=IMPLS + ("both",))
    p.add_argument("--size", default="base", help="model size from valor_fast.model.args.SIZES")
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch (clips)")
    p.add_argument("--frames", type=int, default=4, help="frames a clip")
    p.add_argument("--audio-slices", type=int, default=1)
    p.add_argument("--text-len", type=int, default=40)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--parity-steps", type=int, default=2, help="optimiser steps compared before timing")
    p.add_argument("--tol", type=float, default=None, help="relative loss tolerance of the parity check")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--compile", action="store_true", help="fast impl: torch.compile each block")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (reduce-overhead = CUDA graphs)")
    p.add_argument("--find-max-batch", action="store_true", help="search the largest batch that fits (CUDA)")
    p.add_argument("--max-batch-limit", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--skip-parity", action="store_true", help="time without the parity check (not for results)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# the two impls: dispatcher settings, optimiser and loss config
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def impl_context(impl: str):
    if impl == "eager":
        with attn_ops.use_backend("math"), fused_ops.use_backend("eager"), con_ops.use_backend("torch"):
            yield
    else:
        with attn_ops.use_backend(None), fused_ops.use_backend(None), con_ops.use_backend(None):
            yield


def make_optimizer(model, impl: str, device) -> torch.optim.Optimizer:
    tc = TrainConfig(lr=1e-4)
    kw = dict(lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)
    if impl == "eager":
        kw.update(foreach=False, fused=False)   # one small kernel chain per parameter tensor
    elif device.type == "cuda":
        kw.update(fused=True)
    else:
        kw.update(foreach=True)
    return torch.optim.AdamW(param_groups(model, tc), **kw)


def make_batch(mcfg, B: int, frames: int, slices: int, text_len: int, seed: int) -> dict:
    """A fixed random batch of the model's shapes on the host (pinned when CUDA is there):
    captions of random length in [text_len/2, text_len], [CLS] ... [SEP] + padding."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, frames, 3, mcfg.image_size, mcfg.image_size, generator=g)
    audio = torch.randn(B, slices, mcfg.audio_frames, mcfg.audio_mel_bins, generator=g)
    lengths = torch.randint(max(3, text_len // 2), text_len + 1, (B,), generator=g)
    ids = torch.randint(FIRST_WORD_ID, mcfg.vocab_size, (B, text_len), generator=g)
    pos = torch.arange(text_len)[None]
    mask = pos < lengths[:, None]
    ids[:, 0] = CLS_ID
    ids[pos == (lengths[:, None] - 1)] = SEP_ID
    ids[~mask] = 0
    batch = {"video": video, "audio": audio, "text_ids": ids, "text_mask": mask,
             "has_audio": torch.ones(B, dtype=torch.bool),
             "mask_rand": torch.rand(B, text_len, 3, generator=g)}
    if torch.cuda.is_available():
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


class Step:
    """One impl's model, optimiser and step function over a host batch."""

    def __init__(self, impl: str, model, loss_cfg: LossConfig, device, amp_dtype, args):
        self.impl, self.model, self.device, self.amp_dtype = impl, model, device, amp_dtype
        self.loss_cfg = dataclasses.replace(loss_cfg, grouped_decoder=(impl == "fast"))
        if impl == "fast" and args.compile:
            apply_compile(model, args.compile_mode)
        self.opt = make_optimizer(model, impl, device)

    def __call__(self, host_batch: dict, mark=None) -> dict:
        mark = mark or (lambda _p: None)
        with impl_context(self.impl):
            # the MGC mask plan on the host, as the trainer's task.prepare makes it
            cfg, hb = self.loss_cfg, host_batch
            plan = mask_plan(hb["text_ids"], hb["text_mask"], mgc_groups_of(cfg), cfg.mask_prob, self.model.cfg.vocab_size,
                             hb["has_audio"], draws=hb["mask_rand"])
            batch = move_batch(dict(host_batch, **plan), self.device)
            mark("h2d")
            ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
            with ctx:
                losses = pretrain_step_losses(self.model, batch, self.loss_cfg, mark=mark)
            losses["loss"].backward()
            mark("backward")
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            mark("optimizer")
        return losses


def phase_breakdown(step: Step, host_batch: dict, device, reps: int = 3) -> dict:
    """Milliseconds per phase, each phase ended by a device sync (so the sum exceeds the
    unsynchronised step time a little); median over `reps` steps."""
    rows = []
    for _ in range(reps):
        marks = []

        def mark(phase):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append((phase, time.perf_counter()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(host_batch, mark)
        prev, row = t0, {}
        for phase, t in marks:
            row[phase] = (t - prev) * 1e3
            prev = t
        rows.append(row)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def parity(steps: dict, host_batch: dict, n: int, tol: float) -> dict:
    """Run n optimiser steps of every impl from the same weights on the same batch and compare
    the losses step by step (relative difference of each term)."""
    hist = {}
    for impl, st in steps.items():
        hist[impl] = []
        for _ in range(n):
            losses = st(host_batch)
            hist[impl].append({k: float(v.detach()) for k, v in losses.items()})
    out = {"steps": n, "tol": tol, "ok": True, "max_rel": 0.0, "losses": hist}
    if len(hist) == 2:
        for a, b in zip(hist["eager"], hist["fast"]):
            for k in a:
                rel = abs(a[k] - b[k]) / max(abs(a[k]), 1e-6)
                out["max_rel"] = max(out["max_rel"], rel)
                if not (rel <= tol) or not math.isfinite(b[k]):
                    out["ok"] = False
    return out


def fits(impl: str, args, mcfg, loss_cfg, device, amp_dtype, B: int) -> bool:
    try:
        torch.manual_seed(args.seed)
        model = build_model(mcfg).to(device)
        st = Step(impl, model, loss_cfg, device, amp_dtype, args)
        hb = make_batch(mcfg, B, args.frames, args.audio_slices, args.text_len, args.seed)
        for _ in range(2):
            st(hb)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        st = model = hb = None  # noqa: F841 - drop references before emptying the cache
        torch.cuda.empty_cache()


def find_max_batch(impl, args, mcfg, loss_cfg, device, amp_dtype) -> int:
    """Doubling then bisection over the batch: the largest B whose two steps run without OOM."""
    lo, hi = 0, 8
    while hi <= args.max_batch_limit and fits(impl, args, mcfg, loss_cfg, device, amp_dtype, hi):
        lo, hi = hi, hi * 2
    hi = min(hi, args.max_batch_limit + 1)
    while hi - lo > max(1, lo // 16):   # ~6% resolution is enough to compare impls
        mid = (lo + hi) // 2
        if fits(impl, args, mcfg, loss_cfg, device, amp_dtype, mid):
            lo = mid
        else:
            hi = mid
    return lo


def main(argv=None) -> int:
    args = parse(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and args.device != "cpu":
        sys.exit("train_step.py: TRITON_INTERPRET=1 is set; unset it for timings (or pass --device cpu)")
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("train_step.py --device cuda: torch.cuda.is_available() is False")
    device = torch.device(dev)
    precision = args.precision if args.precision != "auto" else ("bf16" if dev == "cuda" else "fp32")
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    tol = args.tol if args.tol is not None else (1e-4 if precision == "fp32" else 3e-2)
    impls = IMPLS if args.impl == "both" else (args.impl,)

    mcfg = model_config(args.size)
    if args.text_len > mcfg.max_positions:
        sys.exit(f"train_step.py --text-len {args.text_len} exceeds the model's {mcfg.max_positions} positions")
    loss_cfg = LossConfig(mgc_groups="", mga_group_weights="")   # the step as VALOR trains it: MGC on every group, MGA a plain mean
    torch.manual_seed(args.seed)
    base = build_model(mcfg)
    state = copy.deepcopy(base.state_dict())
    host_batch = make_batch(mcfg, args.batch, args.frames, args.audio_slices, args.text_len, args.seed)

    def fresh(impl):
        m = build_model(mcfg)
        m.load_state_dict(state)
        return Step(impl, m.to(device), loss_cfg, device, amp_dtype, args)

    print(f"train_step: size={args.size} batch={args.batch} frames={args.frames} text_len={args.text_len} "
          f"device={dev} precision={precision} impls={','.join(impls)}", flush=True)
    par = None
    if not args.skip_parity:
        par = parity({i: fresh(i) for i in impls}, host_batch, args.parity_steps, tol)
        for impl, h in par["losses"].items():
            print(f"  parity {impl:5s} loss per step: " + ", ".join(f"{r['loss']:.6f}" for r in h))
        if len(impls) == 2:
            print(f"  parity max relative difference {par['max_rel']:.2e} (tol {tol:.0e}): "
                  f"{'ok' if par['ok'] else 'FAILED'}", flush=True)
        if not par["ok"]:
            print("train_step: the impls disagree; no timing reported", file=sys.stderr)
            return 1

    peaks = measure_peaks(device)
    groups = loss_cfg.groups.split(",")
    flops = training_flops_per_sample(mcfg, frames=args.frames, text_len=args.text_len, audio_slices=args.audio_slices,
                                      mga_groups=groups, mgc_groups=mgc_groups_of(loss_cfg).split(","), mask_prob=loss_cfg.mask_prob)
    info = env_info()
    rows = []
    for impl in impls:
        st = fresh(impl)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = time_ms(lambda: st(host_batch), device, warmup=args.warmup, iters=args.steps)
        med = statistics.median(ms)
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
        breakdown = phase_breakdown(st, host_batch, device)
        sps = args.batch / (med * 1e-3)
        tflops = flops * sps / 1e12
        row = {"bench": "train_step", "impl": impl, "size": args.size, "batch": args.batch,
               "frames": args.frames, "audio_slices": args.audio_slices, "text_len": args.text_len,
               "precision": precision, "compile": bool(args.compile and impl == "fast"),
               "compile_mode": args.compile_mode if impl == "fast" else None,
               "step_ms_median": med, "step_ms": ms, "samples_per_s": sps, "peak_mem_gb": peak_gb,
               "breakdown_ms": breakdown, "model_flops_per_sample": flops, "model_tflops": tflops,
               "mfu": tflops / peaks["matmul_tflops"], "peaks": peaks,
               "parity": None if par is None else {k: par[k] for k in ("steps", "tol", "ok", "max_rel")}}
        if args.find_max_batch and dev == "cuda":
            del st
            torch.cuda.empty_cache()
            row["max_batch"] = find_max_batch(impl, args, mcfg, loss_cfg, device, amp_dtype)
        row.update(info)
        rows.append(row)
        if not args.no_save:
            append_result(args.out, row)
    print_table(rows, peaks)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {args.out}")
    return 0


def print_table(rows, peaks) -> None:
    print(f"device peaks (measured): matmul {peaks['matmul_tflops']:.1f} TFLOP/s ({peaks['matmul_dtype']}), "
          f"copy {peaks['copy_gbps']:.0f} GB/s")
    hdr = f"{'impl':6s} {'batch':>5s} {'step ms':>9s} {'samples/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GB':>8s} {'max B':>6s}"
    print(hdr)
    for r in rows:
        pk = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        print(f"{r['impl']:6s} {r['batch']:5d} {r['step_ms_median']:9.1f} {r['samples_per_s']:10.2f} "
              f"{r['model_tflops']:8.3f} {100 * r['mfu']:5.1f}% {pk:>8s} {str(r.get('max_batch', '-')):>6s}")
        print("       breakdown ms: " + ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown_ms"].items()))
    if len(rows) == 2:
        e, f = rows
        print(f"fast / eager: {f['samples_per_s'] / e['samples_per_s']:.2f}x samples/s"
              + (f", {f['max_batch'] / max(1, e['max_batch']):.2f}x max batch" if "max_batch" in e else ""))


if __name__ == "__main__":
    sys.exit(main())
