"""The training loop: one process, several CPU processes (gloo) or GPUs (NCCL) under torchrun.

`Trainer` (torchtitan's shape) holds the run's state in attributes; each step is a few short
methods:

    fit() -> while step < steps: train_step() -> after_step()   (log / validate / checkpoint)
    train_step() = grad_accum x (next_batch() + forward_backward_step()) + clip + non-finite
                   policy + optimiser step

Order of construction: distributed init -> model (same seed on every rank) -> task ->
parallelize (activation checkpointing, compile, FSDP2/DDP) -> optimiser -> resume -> loader.
Every random draw of a step (data order, per-sample augmentation, the task's draws) is a
function of (seed, step), so resuming replays the exact uninterrupted run and the loss
trajectory does not depend on the number of ranks.

Components: checkpointing (train/checkpoint.py), metric records / history / TensorBoard
(train/metrics.py), the loader (data/loader.py), the task (tasks/), the evaluation (eval/).
"""
from __future__ import annotations

import glob
import json
import os
import signal
import sys
import time
import weakref
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import Config, ConfigError, dump, to_dict, validate
from ..data.annotations import check_splits, run_splits
from ..data.loader import build_loader
from ..data.media import BadMediaError, BadMediaTracker
from ..data.sampler import step_generator
from ..data.synth import prepare_data
from ..eval.dispatch import evaluate_task
from ..model.family import build_model, count_parameters
from ..runtime import autocast_ctx, seed_all
from ..tasks import build_task
from ..tasks.pretrain import move_batch
from ..utils.flops import device_peak_tflops
from ..utils.log import get_logger
from .checkpoint import (CheckpointManager, NonFiniteCheckpointError, app_state, export_model_state,
                         full_model_state, resume_training, write_json)
from .dist import DistInfo, all_reduce_, barrier, broadcast_object, init_distributed, shutdown
from .metrics import MetricLogger, log_line, memory_str
from .optim import build_optimizer, lr_factor, set_lr
from .parallelize import parallelize
from .resume_check import check_resume_config
from .runlock import RunLock, run_identity

log = get_logger(__name__)


class NonFiniteError(FloatingPointError):
    pass


class Preempted(RuntimeError):
    """SIGTERM (preemption) or Ctrl-C, taken between steps; `signum` sets the exit code 128 + it."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}: {signal.Signals(signum).name}")
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExportError(OSError):
    """The final export could not be written (a full disk): the last checkpoint holds the state."""


class RunExistsError(RuntimeError):
    """A fresh run (no train.resume) pointed at a run folder that already holds a trained state."""


def _runs_with_checkpoints(out_dir: str) -> List[str]:
    """Run folders under out_dir holding committed checkpoints, newest first."""
    cands = [c for c in glob.glob(os.path.join(out_dir, "*", "checkpoints", "step_*")) if c[-8:].isdigit()]
    runs = sorted({os.path.dirname(os.path.dirname(c)) for c in cands}, key=os.path.getmtime, reverse=True)
    return [os.path.basename(r) for r in runs]


def find_run_dir(cfg: Config) -> str:
    """The run folder: out_dir/run_name, else a new timestamped one.  resume=auto needs the name:
    it never adopts another run's folder (ConfigError listing the candidates)."""
    if cfg.train.run_name:
        return os.path.abspath(os.path.join(cfg.train.out_dir, cfg.train.run_name))
    if cfg.train.resume == "auto":
        runs = _runs_with_checkpoints(cfg.train.out_dir)
        hint = f" (run folders with checkpoints in {cfg.train.out_dir}, newest first: {', '.join(runs[:5])})" if runs else ""
        raise ConfigError(f"train.resume=auto needs train.run_name: name the run folder to resume, e.g. "
                          f"--train.run_name {runs[0] if runs else 'NAME'}{hint}")
    return os.path.abspath(os.path.join(cfg.train.out_dir, time.strftime("pretrain-%Y%m%d-%H%M%S")))


class Trainer:
    """One training run of `cfg` on this process's rank (`info`).  `fit()` trains and returns the
    final metrics; the run folder gets config.yaml, checkpoints/, model.safetensors,
    history.json, metrics.json, summary.md and curves.png (the report, eval/report.py; the PNG with
    matplotlib) (and tb/, profile/ when enabled).  `recipe`: the recipe's name or path, for the
    summary.

    Attributes other components read: cfg, info, device, run_dir, objective (the Task, unwrapped),
    task (the module that trains: the Task after FSDP / DDP), opt, ckpts, loader, metrics,
    step (optimiser steps done), start (the step the run started or resumed at)."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Optional[str] = None, recipe: str = ""):
        self.cfg, self.tc, self.info, self.recipe = cfg, cfg.train, info, recipe
        self._check_config()
        self.device = info.device
        self.run_dir = self._setup_run_dir(run_dir)   # locked from here on: close() releases it
        try:
            self._init_run()
        except BaseException:
            self.close()
            raise

    def _init_run(self) -> None:
        cfg, info = self.cfg, self.info
        self._setup_runtime()
        check_splits(cfg.data, run_splits(cfg))   # every split's annotations readable before any work
        self._build()
        self.step = self.start = self._resume()
        self._build_loader()
        self.metrics = MetricLogger(self.objective.loss_keys(), info.world,
                                    os.path.join(self.run_dir, "tb") if self.tc.tensorboard and info.is_main else None)
        self.metrics.history = self._prior_history()
        self.micro = self.tc.batch_size // (info.world * self.tc.grad_accum)
        self.flops_sample = self.objective.flops_per_sample(cfg)   # the task counts its model's FLOPs
        self.peak = device_peak_tflops(self.device)
        self.skipped, self.bad_total = 0, 0
        self.bad = torch.zeros((), device=self.device)   # device-side non-finite flag: no host sync a step
        self.first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        done = self.ckpts.complete()
        self.last_good_ckpt = self.resumed_from or (done[0][1] if done else None)
        self.stop_signal: Optional[int] = None
        self.prof = None
        self.bar = None
        self._eval_loaders: Dict[str, object] = {}
        if info.is_main:
            log.info("model %s: %.2fM parameters; %d rank(s) on %s, %s; global batch %d = %d ranks x %d micro x %d accum",
                     cfg.model.size, self.n_params / 1e6, info.world, self.device, self.precision,
                     self.tc.batch_size, info.world, self.micro, self.tc.grad_accum)

    # -- construction ---------------------------------------------------------------------------
    def _check_config(self) -> None:
        validate(self.cfg, self.info.world)   # every field (config.RULES) with this run's world size

    def _setup_run_dir(self, run_dir: Optional[str]) -> str:
        """Claim the run folder on rank 0 (lock, resume config check, run id, config.yaml)
        before anything writes into it; every rank gets the folder and run id, or the error."""
        claimed, err = None, None
        if self.info.is_main:
            try:
                claimed = self._claim_run_dir(run_dir)
            except Exception as e:   # every rank must reach the broadcast below
                err = e
        claimed, failed = broadcast_object((claimed, None if err is None else (type(err), str(err))))
        if err is not None:
            raise err
        if failed is not None:
            cls, msg = failed
            raise (cls if issubclass(cls, (ConfigError, RuntimeError)) else RuntimeError)(msg)
        run_dir, self.run_id, self.resume_partial = claimed
        return run_dir

    def _claim_run_dir(self, run_dir: Optional[str]) -> tuple:
        path = os.path.abspath(run_dir or find_run_dir(self.cfg))
        lock = RunLock(path).acquire()
        self.lock = lock
        self._release = weakref.finalize(self, lock.release)   # a Trainer dropped unfinished frees it
        try:
            partial = self._check_resume(path)
            rid = run_identity(path)
            dump(self.cfg, os.path.join(path, "config.yaml"))
        except BaseException:
            self.close()
            raise
        return path, rid, partial

    def _check_resume(self, path: str) -> bool:
        """A fresh run never writes over a trained run's folder; a resume is refused when the
        model / loss / task differ from the config.yaml the checkpoint was trained with (True:
        they differ and train.resume_partial accepts it)."""
        tc = self.tc
        trained = os.path.basename(path) in _runs_with_checkpoints(os.path.dirname(path))
        if not tc.resume:
            if trained or os.path.exists(os.path.join(path, "model.safetensors")):
                raise RunExistsError(f"run folder {path} already holds a trained run (checkpoints or "
                                     f"model.safetensors): resume it with --train.resume auto, or start a new run "
                                     f"with another --train.run_name")
            return False
        if tc.resume == "auto" and not trained:
            return False   # nothing to resume yet (a first launch of a requeued job): a fresh start
        saved = path if tc.resume == "auto" else os.path.dirname(os.path.dirname(os.path.abspath(tc.resume)))
        return check_resume_config(os.path.join(saved, "config.yaml"), to_dict(self.cfg), self.cfg.model.size,
                                   allow_partial=tc.resume_partial)

    def close(self) -> None:
        """Release the run folder (the end of fit(), or a failed construction)."""
        fin = getattr(self, "_release", None)
        if fin is not None:
            fin()

    def _setup_runtime(self) -> None:
        tc = self.tc
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_all(tc.seed)   # identical initial weights on every rank, before sharding
        self.amp, self.precision = autocast_ctx(tc.precision, self.device)
        if self.info.is_main:
            prepare_data(self.cfg)
        barrier()

    def _build(self) -> None:
        cfg, tc, info = self.cfg, self.tc, self.info
        model = build_model(cfg.model)
        if tc.init:
            self._load_init(model)   # before sharding: every rank loads the same full weights
        self.n_params = count_parameters(model)["total"]
        model.to(self.device)
        self.objective = build_task(model, cfg)
        self.task = parallelize(self.objective, model, info, tc.parallel, tc.activation_checkpointing, tc.compile,
                                self.precision)
        self.opt = build_optimizer(self.task, tc, self.device)
        self.ckpts = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), tc.keep_ckpts, info.rank,
                                       info.world, tc.async_ckpt, run_id=self.run_id)

    def _load_init(self, model) -> None:
        """train.init: what did not load is never silent -- every tensor left at its initial
        value, every unused one and every shape mismatch is logged and written to
        init_report.json in the run folder."""
        from ..model.convert import load_init
        rep = load_init(model, self.tc.init)
        gaps = {k: rep.get(k) for k in ("missing", "unused", "shape_mismatch") if rep.get(k)}
        if gaps and self.info.is_main:
            for k, v in gaps.items():
                log.warning("train.init %s: %s (%d): %s", self.tc.init, k.replace("_", " "), len(v),
                            ", ".join(map(str, v)))
            write_json(os.path.join(self.run_dir, "init_report.json"), dict(rep, init=self.tc.init))

    def _resume(self) -> int:
        """The step to start at: 0 for a fresh run (or resume=auto with nothing that loads: the
        initial weights); else the resumed checkpoint's step."""
        self.resumed_from = None
        if not self.tc.resume:
            return 0
        res = resume_training(self.ckpts, self.task, self.opt, self.tc.resume, partial=self.resume_partial)
        if res is None:
            if self.info.is_main and self.ckpts.set_aside:
                print(f"no checkpoint of {self.run_dir} loads ({len(self.ckpts.set_aside)} set aside as "
                      f"step_N.corrupt-<reason>): starting from the initial weights at step 0", flush=True)
            return 0
        step, self.resumed_from = res
        if self.info.is_main:
            print(f"resumed at step {step} from {self.resumed_from}", flush=True)
        return step

    def _prior_history(self) -> list:
        """history.json records of the steps before the resume point (kept across resumes;
        records after it belong to the timeline the resume discards)."""
        path = os.path.join(self.run_dir, "history.json")
        if not self.start or not os.path.exists(path):
            return []
        try:
            with open(path) as f:
                hist = json.load(f)
            if not isinstance(hist, list):
                raise ValueError("not a list of records")
        except (OSError, ValueError) as e:
            if self.info.is_main:
                aside = f"{path}.unreadable-{int(time.time())}"
                log.warning("history.json of %s is unreadable (%s): kept as it is under %s; the new history starts "
                            "at step %d", self.run_dir, e, aside, self.start)
                os.replace(path, aside)
            return []
        return [h for h in hist if isinstance(h, dict) and isinstance(h.get("step"), int) and h["step"] <= self.start]

    def _build_loader(self) -> None:
        cfg, tc, info = self.cfg, self.tc, self.info
        self.loader = build_loader(cfg.data, "train", cfg.model.image_size, tc.batch_size // tc.grad_accum,
                                   train=True, seed=tc.seed, device=self.device, rank=info.rank,
                                   world=info.world, start_batch=self.start * tc.grad_accum,
                                   mel_bins=cfg.model.audio_mel_bins)
        ds = self.loader.dataset
        self.tracker = BadMediaTracker(cfg.data.max_bad_rate, len(ds), "train")
        self.tracker.add_scan(ds.scan_bad, ds.scanned)   # data.cache decoded every clip: judged at once
        self.it = iter(self.loader)

    # -- one step -------------------------------------------------------------------------------
    def next_batch(self, micro: int) -> dict:
        """Micro-batch `micro` of the step on the device.  Host side first: bad-media counts, then
        the task's `prepare` with the step's generator (a function of (seed, step, micro) only,
        the same on every rank: the task derives per-sample generators from it)."""
        host = next(self.it)
        self.tracker.update(host, judge=False)   # judged over all ranks at log steps
        host = self.objective.prepare(host, step_generator(self.tc.seed, self.step, micro))
        return move_batch(host, self.device)

    def forward_backward_step(self, batch: dict, sync: bool = True) -> Dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch (the loss scaled by 1 / grad_accum); `sync`:
        reduce gradients over ranks after this backward (the last micro-batch of a step)."""
        if hasattr(self.task, "set_requires_gradient_sync"):
            self.task.set_requires_gradient_sync(sync)
        with self.amp():
            losses = self.task(batch)
        loss = losses["loss"]
        if self.tc.fail_at_step == self.step:
            loss = loss * float("nan")
        (loss / self.tc.grad_accum).backward()
        return losses

    def clip_gradients(self) -> torch.Tensor:
        gn = torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.tc.grad_clip or float("inf"))
        return gn.full_tensor() if hasattr(gn, "full_tensor") else gn

    def train_step(self) -> bool:
        """One optimiser step over grad_accum micro-batches; False when the non-finite policy
        skipped it.  Host syncs: none under nan_policy=stop (the flag stays on the device)."""
        tc = self.tc
        set_lr(self.opt, lr_factor(self.step, tc.steps, tc.warmup))
        logs: Dict[str, torch.Tensor] = {}
        for mi in range(tc.grad_accum):
            losses = self.forward_backward_step(self.next_batch(mi), sync=mi == tc.grad_accum - 1)
            for k, v in losses.items():
                logs[k] = logs.get(k, 0.0) + v.detach() / tc.grad_accum
        gn = self.clip_gradients()
        if not self._finite_or_skip(logs["loss"], gn):
            self.step += 1
            return False
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.metrics.record(self.step, logs, gn)
        return True

    def _finite_or_skip(self, loss: torch.Tensor, gn: torch.Tensor) -> bool:
        nonfinite = (~torch.isfinite(loss)) | (~torch.isfinite(gn))
        if self.tc.nan_policy == "skip":
            # opt-in policy: one host sync a step to decide
            if bool(all_reduce_(nonfinite.float()) > 0):
                self.skipped += 1
                self.opt.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite loss/grad, skipped (%d/%d)", self.step, self.skipped, self.tc.max_skips)
                if self.skipped > self.tc.max_skips:
                    raise NonFiniteError(f"{self.skipped} steps skipped for non-finite values (max {self.tc.max_skips})")
                return False
            return True
        self.first_bad = torch.where((self.first_bad < 0) & nonfinite, torch.full_like(self.first_bad, self.step),
                                     self.first_bad)
        self.bad = torch.maximum(self.bad, nonfinite.float())
        return True

    def check_finite(self) -> None:
        """Raise NonFiniteError if any step since the last check was non-finite (a host sync:
        log, checkpoint and evaluation steps only)."""
        flag = all_reduce_(self.bad.clone())
        if float(flag) > 0:
            fb = int(all_reduce_(self.first_bad.clone().clamp(min=0), op=torch.distributed.ReduceOp.MAX)
                     if torch.distributed.is_initialized() else self.first_bad)
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {fb}; stopping (train.nan_policy=stop). "
                f"The last good checkpoint is {self.last_good_ckpt or '(none written yet)'}; resume from it with "
                f"{self._resume_hint()}, perhaps with a lower --train.lr or --train.nan_policy skip")

    # -- between steps --------------------------------------------------------------------------
    def after_step(self) -> None:
        """Profiler, bad-media judging, the non-finite check, logging, validation and
        checkpoints of the step just taken."""
        tc, step = self.tc, self.step
        self.n_log += tc.batch_size
        if self.prof is not None:
            self.prof.step()
        rec_due = step % max(1, tc.log_every) == 0 or step == tc.steps
        ckpt_due = bool(tc.ckpt_every) and step % tc.ckpt_every == 0
        eval_due = bool(tc.eval_every) and step % tc.eval_every == 0
        if rec_due:
            self.judge_media()
        if rec_due or ckpt_due or eval_due or tc.nan_policy == "skip":
            self.check_finite()   # a bad step is never logged as good nor checkpointed
        if rec_due or ckpt_due or eval_due:
            rec = self.metrics.flush()
            if rec_due:
                self.log(rec)
        if eval_due:
            self.validate()
        if ckpt_due and step < tc.steps:
            self.checkpoint()
        if self.info.is_main:
            self.bar.update(1)
        if tc.sleep_per_step:
            time.sleep(tc.sleep_per_step)

    def judge_media(self) -> None:
        """The bad-media rate over every rank's samples: one small all-reduce a log interval."""
        counts = all_reduce_(torch.tensor([self.tracker.seen, self.tracker.replaced], dtype=torch.float64,
                                          device=self.device))
        self.bad_total = int(counts[1])
        self.tracker.judge(int(counts[0]), self.bad_total)

    def log(self, rec: dict) -> None:
        """The metrics line, the progress bar and TensorBoard of a log step."""
        dt = time.time() - self.t_log
        sps = self.n_log / max(dt, 1e-9)
        tflops = sps * self.flops_sample / 1e12
        mfu = f"{100 * tflops / (self.peak * self.info.world):.1f}%" if self.peak else "n/a (no GPU peak)"
        scal = {k: v for k, v in rec.items() if k != "step"}
        scal.update({"lr": self.opt.param_groups[0]["lr"], "samples_per_s": sps,
                     "tokens_per_s": sps * self.cfg.data.max_text_len, "data/bad_media": self.bad_total})
        if self.info.is_main:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{sps:.1f}")
            log.info("%s", log_line(self.step, self.tc.steps, rec, scal["lr"], sps, scal["tokens_per_s"], tflops,
                                    mfu, memory_str(self.device), self.bad_total))
            self.metrics.tb.add(scal, self.step)
        self.t_log, self.n_log = time.time(), 0

    def checkpoint(self) -> None:
        """A resumable sharded checkpoint of the step reached (collective)."""
        if self.info.is_main:
            # history.json before every checkpoint, so a kill -9 after the checkpoint is
            # committed keeps the records a resume continues (a resume keeps those up to its
            # step and replays the later ones)
            self.metrics.write(self.run_dir)
        self.last_good_ckpt = self.ckpts.save(self.step, app_state(self.task, self.opt), {"step": self.step})

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, split: str, captions_out: Optional[dict] = None) -> Dict[str, float]:
        """The task's metrics on `split` (every rank runs it: FSDP gathers collectively);
        `captions_out`: filled with {video_id: (prediction, references)} when it captions."""
        if split not in self._eval_loaders:
            self._eval_loaders[split] = build_loader(self.cfg.data, split, self.cfg.model.image_size,
                                                     self.cfg.eval.batch_size, False, self.tc.seed,
                                                     device=self.device, mel_bins=self.cfg.model.audio_mel_bins)
        if hasattr(self.task, "unshard"):
            self.task.unshard()
        metrics = evaluate_task(self.objective.model, self._eval_loaders[split], self.cfg, self.device, self.amp,
                                source=f"the model of {self.run_dir} at step {self.step}", captions_out=captions_out)
        if hasattr(self.task, "reshard"):
            self.task.reshard()
        return metrics

    def validate(self) -> None:
        """train.eval_every: the task's metrics on the val split, recorded as val/... in the
        history and TensorBoard."""
        t0 = time.time()
        val = {f"val/{k}": v for k, v in self.evaluate("val").items()}
        self.metrics.add(self.step, val)
        if self.info.is_main:
            self.metrics.tb.add(val, self.step)
            shown = " ".join(f"{k[4:]} {v:.3f}" for k, v in val.items() if k.endswith(("t2av/R@1", "CIDEr", "accuracy")))
            log.info("step %d validation (%.1fs): %s", self.step, time.time() - t0, shown)
        self.t_log += time.time() - t0   # validation time is not training throughput

    # -- the run --------------------------------------------------------------------------------
    def fit(self) -> Dict[str, float]:
        """Train from `start` to train.steps, export, evaluate; returns the final metrics.  The
        run folder's lock is released however it ends."""
        try:
            if self.start >= self.tc.steps and self.start > 0:
                return self._already_complete()
            self._train_loop()
            return self._finish()
        finally:
            self.close()

    def _train_loop(self) -> None:
        from tqdm import tqdm
        import threading
        on_main = threading.current_thread() is threading.main_thread()   # handlers: main thread only
        old = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS} if on_main else {}
        self._start_profiler()
        self.t_start = self.t_log = time.time()
        self.n_log = 0
        try:
            self.bar = tqdm(total=self.tc.steps, initial=self.start, desc=self.tc.task, unit="step",
                            dynamic_ncols=True, disable=not self.info.is_main, mininterval=2.0)
            self.task.train()
            while self.step < self.tc.steps:
                if self.stop_signal is not None:
                    raise Preempted(self.stop_signal)
                if self.train_step():
                    self.after_step()
                elif self.info.is_main:
                    self.bar.update(1)
            self.bar.close()
            self.check_finite()
        except NonFiniteError as e:
            self._on_nonfinite(e)
            raise
        except BadMediaError as e:
            self._on_bad_media(e)
            raise
        except (KeyboardInterrupt, Preempted) as e:
            self._on_interrupt(e)
            raise
        except torch.cuda.OutOfMemoryError:
            self._on_oom()
            raise
        finally:
            if self.prof is not None:
                self.prof.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        self.train_s = time.time() - self.t_start

    def _on_signal(self, signum, frame) -> None:
        """Stop between steps (the step in flight completes, then a checkpoint); a second
        Ctrl-C stops at once."""
        if signum == signal.SIGINT and self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signum

    def _start_profiler(self) -> None:
        tc = self.tc
        if not tc.profile:
            return
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=acts, schedule=schedule(wait=1, warmup=2, active=tc.profile_steps, repeat=1),
                            on_trace_ready=tensorboard_trace_handler(os.path.join(self.run_dir, "profile"),
                                                                     worker_name=f"rank{self.info.rank}"),
                            record_shapes=True, profile_memory=True)
        self.prof.start()
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100000)

    # -- stops ----------------------------------------------------------------------------------
    def _save_on_stop(self) -> Optional[str]:
        """A stop (preemption, Ctrl-C, too much bad media): checkpoint the step reached, wait for
        the write, keep the history.  Never a non-finite state: when a step since the last check
        was non-finite (or the weights are), nothing is saved and the reason is returned
        (None: saved as self.last_good_ckpt)."""
        try:
            self.check_finite()   # collective: every rank takes the same branch
        except NonFiniteError as e:
            self.metrics.discard()   # steps after a non-finite value are never logged as good
            why = str(e).split("; stopping")[0]
        else:
            self.metrics.flush()
            try:
                self.checkpoint()
                why = None
            except NonFiniteCheckpointError as e:
                why = str(e)
        self.ckpts.wait()
        if self.info.is_main:
            self.metrics.write(self.run_dir)
        return why

    def _resume_hint(self) -> str:
        return f"--train.resume auto --train.run_name {os.path.basename(self.run_dir)} (out_dir {self.tc.out_dir})"

    def _stop_note(self, why: Optional[str]) -> str:
        """What a stop left behind, for its message."""
        if why is None:
            return f"checkpoint {self.last_good_ckpt}; resume with {self._resume_hint()}"
        last = self.last_good_ckpt or "(none written yet: a resume starts from the initial weights)"
        return f"NOT checkpointed ({why}); the last good checkpoint is {last}; resume from it with {self._resume_hint()}"

    def _on_nonfinite(self, e: NonFiniteError) -> None:
        # weights after a bad step are not worth keeping: nothing is saved over the last good one
        self.metrics.discard()
        self.ckpts.wait()
        if self.info.is_main:
            self.metrics.write(self.run_dir)
            print(f"\nSTOPPED: {e}", file=sys.stderr, flush=True)
        e.reported = True

    def _on_bad_media(self, e: BadMediaError) -> None:
        # too much bad data: the weights are fine (unless a step was non-finite), so the step
        # reached is checkpointed first
        why = self._save_on_stop()
        if self.info.is_main:
            report = os.path.join(self.run_dir, f"bad_media_rank{self.info.rank}.json")
            write_json(report, e.report)
            print(f"\nSTOPPED at step {self.step}: {e}\n{self._stop_note(why)}; report {report}",
                  file=sys.stderr, flush=True)
        e.reported = True

    def _on_interrupt(self, e: BaseException) -> None:
        # preemption / Ctrl-C: write a resumable checkpoint of the step reached, then exit
        why = self._save_on_stop()
        if self.info.is_main:
            print(f"\ninterrupted at step {self.step} ({e}); {self._stop_note(why)}", file=sys.stderr, flush=True)
        try:
            e.reported = True
        except AttributeError:
            pass

    def _on_oom(self) -> None:
        if self.device.type == "cuda" and self.info.is_main:
            snap = os.path.join(self.run_dir, f"oom_snapshot_rank{self.info.rank}.pickle")
            torch.cuda.memory._dump_snapshot(snap)
            log.error("CUDA out of memory: memory snapshot written to %s (view at pytorch.org/memory_viz)", snap)

    # -- the end --------------------------------------------------------------------------------
    def _already_complete(self) -> Dict[str, float]:
        """Resumed at or past train.steps: nothing is trained, written or overwritten -- except
        a missing model.safetensors (an export that failed), written from the checkpoint."""
        self.metrics.close()
        export = os.path.join(self.run_dir, "model.safetensors")
        if broadcast_object(not os.path.exists(export) if self.info.is_main else None):
            sd = full_model_state(self.task)   # collective
            if self.info.is_main:
                export_model_state(sd, export, {"step": str(self.start), "size": self.cfg.model.size})
                print(f"{export} was missing: written from checkpoint {self.resumed_from}", file=sys.stderr, flush=True)
        path = os.path.join(self.run_dir, "metrics.json")
        if self.info.is_main:
            print(f"run already complete: {self.run_dir} resumed at step {self.start} (checkpoint "
                  f"{self.resumed_from}) and train.steps={self.tc.steps}; nothing trained, nothing written. Raise "
                  f"--train.steps to continue it, or start a new run with another --train.run_name",
                  file=sys.stderr, flush=True)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {"train/steps": float(self.start)}

    def _export(self) -> None:
        """The final checkpoint, then the unsharded safetensors weights + history (rank 0), each
        written atomically: a failed export (a full disk) leaves the final checkpoint and any
        previous file intact and raises ExportError naming both."""
        self.metrics.flush()
        try:
            self.checkpoint()
            self.ckpts.wait()
        except OSError as e:
            raise ExportError(e.errno, f"the final checkpoint was not written ({e.strerror or e}); the last good "
                                       f"checkpoint is {self.last_good_ckpt}") from None
        sd = full_model_state(self.task)
        if self.info.is_main:
            path = os.path.join(self.run_dir, "model.safetensors")
            try:
                export_model_state(sd, path, {"step": str(self.step), "size": self.cfg.model.size})
                self.metrics.write(self.run_dir)
            except OSError as e:
                raise ExportError(e.errno, f"{e.strerror or e}; the trained state is safe in checkpoint "
                                           f"{self.last_good_ckpt} (after freeing space, --train.resume auto "
                                           f"--train.run_name {os.path.basename(self.run_dir)} writes the export "
                                           f"from it)") from None

    def _finish(self) -> Dict[str, float]:
        from ..eval.evaluate import format_table
        self._export()
        metrics: Dict[str, float] = {}
        captions: Dict[str, tuple] = {}
        if self.tc.final_eval:
            # the held-out test split (every rank runs it: FSDP gathers collectively)
            metrics.update(self.evaluate("test", captions))
        metrics.update(self._train_summary())
        if self.info.is_main:
            write_json(os.path.join(self.run_dir, "metrics.json"), metrics)
            report = self._write_report(metrics, captions)
            if self.tc.final_eval:
                print("\nTest split (held-out attribute combinations):")
                print(format_table(metrics))
            print(f"\nrun folder: {self.run_dir}", flush=True)
            for what, path in report.items():
                print(f"{what}: {path}", flush=True)
        self.metrics.close()
        return metrics

    def _write_report(self, metrics: Dict[str, float], captions: Dict[str, tuple]) -> Dict[str, str]:
        """summary.md and curves.png (eval/report.py); the test captions beside them as
        test_captions.json.  Written after the export: a failure here is logged, the run stands."""
        from ..eval.report import write_report
        try:
            if captions:
                write_json(os.path.join(self.run_dir, "test_captions.json"),
                           {k: {"prediction": p, "references": list(r)} for k, (p, r) in captions.items()})
            tc = self.tc   # the schedule's lr of each recorded step (set before the step's update)
            hist = [dict(h, lr=tc.lr * lr_factor(h["step"] - 1, tc.steps, tc.warmup)) if "loss" in h else h
                    for h in self.metrics.history]
            out = write_report(self.run_dir, hist, metrics, to_dict(self.cfg),
                               list(captions.values()), self.recipe, self.train_s, metrics.get("train/samples_per_s"))
        except Exception as e:   # noqa: BLE001 - the model and metrics are already written
            log.warning("run report not written (%s: %s); model.safetensors and metrics.json are", type(e).__name__, e)
            return {}
        return {k: v for k, v in out.items() if v}

    def _train_summary(self) -> Dict[str, float]:
        out = {"train/steps": float(self.step), "train/seconds": self.train_s}
        if self.tc.final_eval:
            hist = [h for h in self.metrics.history if "loss" in h]
            out["train/samples_per_s"] = (self.step - self.start) * self.tc.batch_size / max(self.train_s, 1e-9)
            out["train/final_loss"] = float(np.mean([h["loss"] for h in hist[-20:]])) if hist else float("nan")
            out["train/first_loss"] = hist[0]["loss"] if hist else float("nan")
        return out


def train(cfg: Config, run_dir: Optional[str] = None, recipe: str = "") -> Dict[str, float]:
    """Train `cfg` (one process, or this rank under torchrun) and return the final metrics;
    `recipe` names the recipe in the run's summary.md."""
    info = init_distributed(cfg.train.device, cfg.train.hsdp_replicas)
    try:
        return Trainer(cfg, info, run_dir, recipe).fit()
    finally:
        shutdown()
