"""The pretraining loop: one process, several CPU processes (gloo) or GPUs (NCCL) under torchrun.

Order of construction: distributed init -> model (same seed on every rank) -> parallelize
(activation checkpointing, compile, FSDP2/DDP) -> optimiser -> resume -> loop.  Every random
draw of a step (data order, per-sample augmentation, MGC masking) is a function of
(seed, step), so resuming replays the exact uninterrupted run and the loss trajectory does not
depend on the number of ranks.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import signal
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch

from ..config import Config, dump
from ..model.valor import build_model, count_parameters
from ..tasks.pretrain import PretrainTask, move_batch
from ..model.flops import training_flops_per_sample
from ..utils.flops import device_peak_tflops
from ..utils.log import get_logger, log_once
from .checkpoint import CheckpointManager, set_rng_state, write_json
from .dist import DistInfo, all_reduce_, barrier, broadcast_object, init_distributed, shutdown
from .optim import build_optimizer, lr_factor, set_lr
from .parallelize import parallelize
from .sampler import GlobalBatchSampler, step_generator

log = get_logger(__name__)


class NonFiniteError(FloatingPointError):
    pass


class Preempted(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is visible")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision must be auto|bf16|fp16|fp32, got {precision!r}")
    return precision


def autocast_ctx(precision: str, device: torch.device):
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def find_run_dir(cfg: Config) -> str:
    """The run folder: out_dir/run_name, or with resume=auto and no name the newest run folder
    holding checkpoints, else a new timestamped one."""
    if cfg.train.run_name:
        return os.path.abspath(os.path.join(cfg.train.out_dir, cfg.train.run_name))
    if cfg.train.resume == "auto":
        cands = sorted(glob.glob(os.path.join(cfg.train.out_dir, "*", "checkpoints", "step_*")), key=os.path.getmtime)
        cands = [c for c in cands if not c.endswith(".tmp")]
        if cands:
            return os.path.abspath(os.path.dirname(os.path.dirname(cands[-1])))
    return os.path.abspath(os.path.join(cfg.train.out_dir, time.strftime("pretrain-%Y%m%d-%H%M%S")))


def make_run_dir(cfg: Config) -> str:
    path = find_run_dir(cfg)
    os.makedirs(path, exist_ok=True)
    return path


def prepare_data(cfg: Config) -> None:
    """Generate the synthetic dataset into data.root when it is missing and data.synth is on."""
    ann = os.path.join(cfg.data.root, cfg.data.train_ann)
    fmt, sep, rest = cfg.data.train_ann.partition(":")
    if sep and not os.path.isabs(cfg.data.train_ann):
        # <format>:<file>[,<file>] (a benchmark's own annotations) or shards:<glob>
        import glob as _glob
        first = rest.split(",")[0]
        hits = _glob.glob(first if os.path.isabs(first) else os.path.join(cfg.data.root, first))
        if hits:
            return
        ann = os.path.join(cfg.data.root, first)
    meta = os.path.join(cfg.data.root, "meta.json")
    if os.path.exists(ann) and cfg.data.synth and os.path.exists(meta):
        # a synthetic folder written by another generator version or with other settings is
        # regenerated, not silently reused
        from ..data.synth import VERSION
        with open(meta) as f:
            m = json.load(f)
        want = {"version": VERSION, "seed": cfg.data.synth_seed, "clips_per_combo": cfg.data.synth_clips_per_combo}
        have = {k: m.get(k) for k in want}
        if have != want:
            log.warning("synthetic dataset in %s was generated with %s, the config asks for %s: regenerating",
                        cfg.data.root, have, want)
            import shutil
            shutil.rmtree(cfg.data.root)
    if os.path.exists(ann):
        return
    if not cfg.data.synth:
        raise FileNotFoundError(f"no training annotations at {ann!r} (set data.root, or data.synth=true "
                                f"to generate the synthetic dataset)")
    from ..data.synth import generate
    log.info("generating the synthetic audiovisual dataset into %s", cfg.data.root)
    generate(cfg.data.root, seed=cfg.data.synth_seed, clips_per_combo=cfg.data.synth_clips_per_combo)


def _memory_str(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    try:
        import resource
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB rss"
    except Exception:
        return "n/a"


class _TB:
    """TensorBoard scalars when tensorboard is installed (logged once when it is not)."""

    def __init__(self, path: Optional[str]):
        self.w = None
        if path:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.w = SummaryWriter(path)
            except Exception as e:
                log_once("tb", f"TensorBoard scalars off ({e}); install: pip install tensorboard")

    def add(self, scalars: dict, step: int):
        if self.w:
            for k, v in scalars.items():
                self.w.add_scalar(k, v, step)

    def close(self):
        if self.w:
            self.w.close()


def _app_state(task, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(task, opt)
    return {"model": msd, "optim": osd}


def _load_app_state(task, opt, state):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(task, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state(task, info: DistInfo) -> Dict[str, torch.Tensor]:
    """Unsharded model weights (rank 0 gets them all) for the safetensors export."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(task, options=opts)
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}


def build_train_loader(cfg: Config, info: DistInfo, start_batch: int, device=None):
    """(dataset, loader) of this rank's training micro-batches through data.backend (cpu: worker
    processes over `_SeededDataset`; dali: `DaliLoader` in the main process)."""
    from ..data import VideoAudioTextDataset, collate
    from ..data.dataset import resolve_backend
    backend = resolve_backend(cfg.data.backend, device)
    ds = VideoAudioTextDataset(cfg.data, "train", cfg.model.image_size, train=True, seed=cfg.train.seed,
                               cache=False if backend == "dali" else None, mel_bins=cfg.model.audio_mel_bins)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    sampler = GlobalBatchSampler(len(ds), micro, info.rank, info.world, cfg.train.seed, start_batch=start_batch)
    if backend == "dali":
        from ..data.dali_loader import DaliLoader
        seed = cfg.train.seed
        batches = ([(i, sample_generator(seed, k, i)) for i, k in keys] for keys in _KeyedBatches(sampler))
        return ds, DaliLoader(ds, batches, device=device, num_threads=cfg.data.num_workers or 2,
                              batch_size=micro // info.world)
    seeded = _SeededDataset(ds, sampler, cfg.train.seed)
    loader = torch.utils.data.DataLoader(seeded, batch_sampler=_KeyedBatches(sampler), collate_fn=collate,
                                         num_workers=cfg.data.num_workers,
                                         persistent_workers=cfg.data.num_workers > 0)
    return ds, loader


def sample_generator(seed: int, batch: int, index: int) -> torch.Generator:
    """The generator of one training sample: a function of (seed, global batch, index) only,
    whatever the backend, worker or rank that loads it."""
    return torch.Generator().manual_seed((seed * 7919 + batch) * 1_000_003 + index)


class _KeyedBatches(torch.utils.data.Sampler):
    """Tags every index with its global batch number, so per-sample randomness can be seeded by
    (seed, batch, index) whatever the worker or rank that loads it."""

    def __init__(self, sampler: GlobalBatchSampler):
        self.s = sampler

    def __iter__(self):
        k = self.s.start_batch
        for idx in self.s:
            yield [(i, k) for i in idx]
            k += 1

    def __len__(self):
        return len(self.s)


class _SeededDataset(torch.utils.data.Dataset):
    def __init__(self, ds, sampler, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, k = key
        g = sample_generator(self.seed, k, i)
        return self.ds.get(i, g) if hasattr(self.ds, "get") else self.ds[i]


TASKS = ("pretrain", "retrieval", "caption", "qa", "scst")


def build_task(model, cfg: Config) -> torch.nn.Module:
    """The training objective of `train.task` as the module FSDP/DDP wrap."""
    task = cfg.train.task
    if task not in TASKS:
        raise ValueError(f"train.task must be one of {TASKS}, got {task!r}")
    if task == "qa":
        from ..tasks.qa import QATask
        return QATask(model, cfg.loss, cfg.data.max_text_len)
    if task == "scst":
        from ..tasks.scst import SCSTTask
        return SCSTTask(model, cfg.loss, cfg.loss.scst_samples, cfg.eval.max_len)
    if task == "retrieval" and not cfg.loss.mga_weight:
        raise ValueError("train.task=retrieval needs loss.mga_weight > 0 (configs/finetune_retrieval.yaml)")
    if task == "caption" and not cfg.loss.mgc_weight:
        raise ValueError("train.task=caption needs loss.mgc_weight > 0 (configs/finetune_caption.yaml)")
    return PretrainTask(model, cfg.loss)


def evaluate_task(model, loader, cfg: Config, device, amp) -> Dict[str, float]:
    """The test metrics of the task: retrieval only, captioning (+ retrieval), or QA."""
    from ..eval.evaluate import evaluate
    if cfg.train.task == "qa":
        from ..eval.qa import evaluate_qa
        from ..data.annotations import read_annotations
        train_answers = [str(q["answer"]) for r in read_annotations(cfg.data.root, cfg.data.train_ann) for q in r["qa"]]
        return evaluate_qa(model, loader, cfg, device, autocast=amp, train_answers=train_answers,
                           max_answer_len=cfg.eval.qa_max_answer_len)
    return evaluate(model, loader, cfg, device, captions=cfg.train.task != "retrieval", autocast=amp)


def train(cfg: Config, run_dir: Optional[str] = None) -> Dict[str, float]:
    tc = cfg.train
    info = init_distributed(tc.device, tc.hsdp_replicas)
    try:
        return _train(cfg, info, run_dir)
    finally:
        shutdown()


def _train(cfg: Config, info: DistInfo, run_dir: Optional[str]) -> Dict[str, float]:
    from ..eval.evaluate import format_table
    tc = cfg.train
    if tc.batch_size % (info.world * tc.grad_accum):
        raise ValueError(f"train.batch_size={tc.batch_size} must divide by world ({info.world}) x "
                         f"grad_accum ({tc.grad_accum})")
    run_dir = broadcast_object(run_dir or (make_run_dir(cfg) if info.is_main else None))
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        dump(cfg, os.path.join(run_dir, "config.yaml"))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_all(tc.seed)   # identical initial weights on every rank, before sharding
    device = info.device
    amp, precision = autocast_ctx(tc.precision, device)
    if info.is_main:
        prepare_data(cfg)
    barrier()

    model = build_model(cfg.model)
    if tc.init:
        from ..model.convert import load_init
        load_init(model, tc.init)   # before sharding: every rank loads the same full weights
    counts = count_parameters(model)
    model.to(device)
    task = build_task(model, cfg)
    prepare = getattr(task, "prepare", None)   # host-side batch transform (QA tokenisation)
    task = parallelize(task, model, info, tc.parallel, tc.activation_checkpointing, tc.compile, precision)
    opt = build_optimizer(task, tc, device)
    ckpts = CheckpointManager(os.path.join(run_dir, "checkpoints"), tc.keep_ckpts, info.rank, info.world,
                              tc.async_ckpt)

    start = 0
    if tc.resume:
        if tc.resume == "auto":
            res = ckpts.load_latest(lambda: _app_state(task, opt))
        else:
            st = _app_state(task, opt)
            extra = ckpts.load(tc.resume, st)
            res = (extra["meta"]["step"], st, extra)
        if res is None:
            log.info("resume=auto: no complete checkpoint in %s, starting fresh", ckpts.root)
        else:
            start, st, extra = res
            _load_app_state(task, opt, st)
            set_rng_state(extra["rng"])
            if info.is_main:
                print(f"resumed at step {start} from {ckpts.root}", flush=True)

    ds, loader = build_train_loader(cfg, info, start_batch=start * tc.grad_accum, device=device)
    from ..data.media import BadMediaError, BadMediaTracker
    tracker = BadMediaTracker(cfg.data.max_bad_rate, len(ds), "train")
    tracker.add_scan(ds.scan_bad, ds.scanned)   # data.cache decoded every clip: judged at once
    micro = tc.batch_size // (info.world * tc.grad_accum)
    steps = tc.steps
    frames = cfg.data.frames_train
    # the groups the task trains (scst's sampled decoding is not counted: MFU there is a lower bound)
    groups = [g.strip() for g in cfg.loss.groups.split(",") if g.strip()]
    by_weight = tc.task in ("pretrain", "retrieval", "caption")   # PretrainTask: MGA, MGC by their weights
    mga = groups if by_weight and cfg.loss.mga_weight else ()
    mgc = groups if tc.task == "qa" or (by_weight and cfg.loss.mgc_weight) else ()
    flops_sample = training_flops_per_sample(cfg.model, frames=frames, text_len=cfg.data.max_text_len,
                                             audio_slices=cfg.data.audio_slices, mga_groups=mga, mgc_groups=mgc,
                                             mask_prob=cfg.loss.mask_prob)
    peak = device_peak_tflops(device)
    tb = _TB(os.path.join(run_dir, "tb") if tc.tensorboard and info.is_main else None)
    if info.is_main:
        log.info("model %s: %.2fM parameters; %d rank(s) on %s, %s; global batch %d = %d ranks x %d micro x %d accum",
                 cfg.model.size, counts["total"] / 1e6, info.world, device, precision, tc.batch_size,
                 info.world, micro, tc.grad_accum)

    stop = {"sig": None}

    def _on_signal(signum, frame):
        stop["sig"] = signum

    old_handler = signal.signal(signal.SIGTERM, _on_signal) if info.is_main or True else None
    prof = None
    if tc.profile:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = profile(activities=acts, schedule=schedule(wait=1, warmup=2, active=tc.profile_steps, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(os.path.join(run_dir, "profile"),
                                                                worker_name=f"rank{info.rank}"),
                       record_shapes=True, profile_memory=True)
        prof.start()
        if device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100000)

    history = []
    pending = []

    def flush(keys):
        if pending:
            # every rank's records averaged: per-rank MGC terms are shares of the global mean
            st = all_reduce_(torch.stack([p[1] for p in pending])) / info.world
            vals = st.cpu().tolist()
            for (s_, _), v in zip(pending, vals):
                history.append(dict(zip(keys, v), step=s_))
            pending.clear()

    step = start
    skipped = 0
    bad = torch.zeros((), device=device)         # device-side non-finite flag: no host sync a step
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    last_good_ckpt = ckpts.complete()[0][1] if ckpts.complete() else None
    t_start = time.time()
    t_log, n_log = time.time(), 0
    it = iter(loader)
    ckpt_path = os.path.join(run_dir, "model.safetensors")

    def save_ckpt(s):
        nonlocal last_good_ckpt
        last_good_ckpt = ckpts.save(s, _app_state(task, opt), {"step": s})

    def save_on_stop():
        """A stop whose weights are sound (preemption, too much bad media): log what is pending,
        checkpoint the step reached, wait for the write, keep the history."""
        if pending:
            flush(list(logs.keys()) + ["grad_norm"])
        save_ckpt(step)
        ckpts.wait()
        if info.is_main:
            write_json(os.path.join(run_dir, "history.json"), history)

    def check_finite():
        flag = all_reduce_(bad.clone())
        if float(flag) > 0:
            fb = int(all_reduce_(first_bad.clone().clamp(min=0), op=torch.distributed.ReduceOp.MAX)
                     if torch.distributed.is_initialized() else first_bad)
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {fb}; stopping (train.nan_policy=stop). "
                f"The last good checkpoint is {last_good_ckpt or '(none written yet)'}; resume from it with "
                f"--train.resume auto, perhaps with a lower --train.lr or --train.nan_policy skip")

    try:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc=tc.task, unit="step", dynamic_ncols=True,
                   disable=not info.is_main, mininterval=2.0)
        task.train()
        while step < steps:
            if stop["sig"] is not None:
                raise Preempted(f"signal {stop['sig']}")
            set_lr(opt, lr_factor(step, steps, tc.warmup))
            logs = {}
            for mi in range(tc.grad_accum):
                host = next(it)
                tracker.update(host, judge=False)   # judged over all ranks at log steps
                # masking draws of the whole global micro-batch, this rank's rows
                g = step_generator(tc.seed, step, mi)
                if prepare is not None:
                    host = prepare(host, g)
                batch = move_batch(host, device)
                draws = torch.rand(micro * info.world, cfg.data.max_text_len + 2, 3, generator=g)
                batch["mask_rand"] = draws[info.rank * micro:(info.rank + 1) * micro]
                sync = mi == tc.grad_accum - 1
                if hasattr(task, "set_requires_gradient_sync"):
                    task.set_requires_gradient_sync(sync)
                with amp():
                    losses = task(batch)
                loss = losses["loss"]
                if tc.fail_at_step == step:
                    loss = loss * float("nan")
                (loss / tc.grad_accum).backward()
                for k, v in losses.items():
                    logs[k] = logs.get(k, 0.0) + v.detach() / tc.grad_accum
            gn = torch.nn.utils.clip_grad_norm_(task.parameters(), tc.grad_clip or float("inf"))
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            nonfinite = (~torch.isfinite(logs["loss"])) | (~torch.isfinite(gn))
            if tc.nan_policy == "skip":
                # opt-in policy: one host sync a step to decide
                if bool(all_reduce_(nonfinite.float()) > 0):
                    skipped += 1
                    opt.zero_grad(set_to_none=True)
                    log.warning("step %d: non-finite loss/grad, skipped (%d/%d)", step, skipped, tc.max_skips)
                    if skipped > tc.max_skips:
                        raise NonFiniteError(f"{skipped} steps skipped for non-finite values (max {tc.max_skips})")
                    step += 1
                    bar.update(1)
                    continue
            elif tc.nan_policy == "stop":
                first_bad = torch.where((first_bad < 0) & nonfinite, torch.full_like(first_bad, step), first_bad)
                bad = torch.maximum(bad, nonfinite.float())
            else:
                raise ValueError(f"train.nan_policy must be stop or skip, got {tc.nan_policy!r}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_log += tc.batch_size
            if prof is not None:
                prof.step()
            rec_due = step % max(1, tc.log_every) == 0 or step == steps
            ckpt_due = tc.ckpt_every and step % tc.ckpt_every == 0
            if rec_due:
                # the bad-media rate over every rank's samples: one small all-reduce a log interval
                counts = all_reduce_(torch.tensor([tracker.seen, tracker.replaced], dtype=torch.float64,
                                                  device=device))
                bad_total = int(counts[1])
                tracker.judge(int(counts[0]), bad_total)
            if rec_due or ckpt_due or tc.nan_policy == "skip":
                check_finite()   # a bad step is never logged as good nor checkpointed
            # per-step records stay on the device and reach the host in one transfer a log interval
            keys = list(logs.keys()) + ["grad_norm"]
            pending.append((step, torch.stack([v.float() for v in logs.values()] + [gn.float()])))
            if rec_due or ckpt_due:
                flush(keys)
                rec = history[-1]
            if rec_due:
                dt = time.time() - t_log
                sps = n_log / max(dt, 1e-9)
                tflops = sps * flops_sample / 1e12
                mfu = f"{100 * tflops / (peak * info.world):.1f}%" if peak else "n/a (no GPU peak)"
                scal = {k: v for k, v in rec.items() if k != "step"}
                scal.update({"lr": opt.param_groups[0]["lr"], "samples_per_s": sps,
                             "tokens_per_s": sps * cfg.data.max_text_len, "data/bad_media": bad_total})
                if info.is_main:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{sps:.1f}")
                    log.info("step %d/%d loss %.4f (%s) grad %.2f lr %.2e | %.1f samples/s %.0f tok/s "
                             "%.2f TFLOP/s MFU %s | mem %s%s", step, steps, rec["loss"],
                             " ".join(f"{k}={v:.3f}" for k, v in rec.items() if "/" in k), rec["grad_norm"],
                             scal["lr"], sps, scal["tokens_per_s"], tflops, mfu, _memory_str(device),
                             f" | bad media replaced {bad_total}" if bad_total else "")
                    tb.add(scal, step)
                t_log, n_log = time.time(), 0
            if ckpt_due and step < steps:
                save_ckpt(step)
            if info.is_main:
                bar.update(1)
            if tc.sleep_per_step:
                time.sleep(tc.sleep_per_step)
        bar.close()
        check_finite()
    except NonFiniteError as e:
        # weights after a bad step are not worth keeping: nothing is saved over the last good one
        pending.clear()
        ckpts.wait()
        if info.is_main:
            write_json(os.path.join(run_dir, "history.json"), history)
            print(f"\nSTOPPED: {e}", file=sys.stderr, flush=True)
        raise
    except BadMediaError as e:
        # too much bad data: the weights are fine, so the step reached is checkpointed first
        save_on_stop()
        if info.is_main:
            write_json(os.path.join(run_dir, f"bad_media_rank{info.rank}.json"), e.report)
            print(f"\nSTOPPED at step {step}: {e}\ncheckpoint {last_good_ckpt}; report "
                  f"{os.path.join(run_dir, f'bad_media_rank{info.rank}.json')}", file=sys.stderr, flush=True)
        raise
    except (KeyboardInterrupt, Preempted) as e:
        # preemption / Ctrl-C: write a resumable checkpoint of the step reached, then exit
        save_on_stop()
        if info.is_main:
            print(f"\ninterrupted at step {step} ({e}); checkpoint {last_good_ckpt}; "
                  f"resume with --train.resume auto --train.run_name {os.path.basename(run_dir)}",
                  file=sys.stderr, flush=True)
        raise
    except torch.cuda.OutOfMemoryError:
        if device.type == "cuda" and info.is_main:
            snap = os.path.join(run_dir, f"oom_snapshot_rank{info.rank}.pickle")
            torch.cuda.memory._dump_snapshot(snap)
            log.error("CUDA out of memory: memory snapshot written to %s (view at pytorch.org/memory_viz)", snap)
        raise
    finally:
        if prof is not None:
            prof.stop()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    train_s = time.time() - t_start
    flush(keys)
    save_ckpt(step)
    ckpts.wait()
    sd = full_model_state(task, info)
    if info.is_main:
        from safetensors.torch import save_file
        tmp = ckpt_path + ".tmp"
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"step": str(step), "size": cfg.model.size})
        os.replace(tmp, ckpt_path)
        write_json(os.path.join(run_dir, "history.json"), history)

    metrics: Dict[str, float] = {}
    if not tc.final_eval:
        metrics.update({"train/steps": float(step), "train/seconds": train_s})
        if info.is_main:
            write_json(os.path.join(run_dir, "metrics.json"), metrics)
            print(f"\nrun folder: {run_dir}", flush=True)
        tb.close()
        return metrics
    # final evaluation on the held-out test split (every rank runs it: FSDP gathers collectively)
    from ..data import build_loader
    test_loader = build_loader(cfg.data, "test", cfg.model.image_size, cfg.eval.batch_size, False, tc.seed,
                               device=device, mel_bins=cfg.model.audio_mel_bins)
    if hasattr(task, "unshard"):
        task.unshard()
    core = task.module.model if hasattr(task, "module") else task.model
    metrics.update(evaluate_task(core, test_loader, cfg, device, amp))
    if hasattr(task, "reshard"):
        task.reshard()
    metrics["train/steps"] = float(step)
    metrics["train/seconds"] = train_s
    metrics["train/samples_per_s"] = (step - start) * tc.batch_size / max(train_s, 1e-9)
    metrics["train/final_loss"] = float(np.mean([h["loss"] for h in history[-20:]])) if history else float("nan")
    metrics["train/first_loss"] = history[0]["loss"] if history else float("nan")
    if info.is_main:
        write_json(os.path.join(run_dir, "metrics.json"), metrics)
        print("\nTest split (held-out attribute combinations):")
        print(format_table(metrics))
        print(f"\nrun folder: {run_dir}", flush=True)
    tb.close()
    return metrics
