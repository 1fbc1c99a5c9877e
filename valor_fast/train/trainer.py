"""Single-process pretraining loop (FSDP2 / torchrun arrive with the training-at-scale issue).

AdamW (0.9, 0.98), warmup + linear decay, grad clipping, bf16 autocast on CUDA, a progress bar
with loss and samples/s, periodic validation, final test metrics, an atomic checkpoint at the
end (and on Ctrl-C / SIGTERM / a crash, so nothing is lost)."""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch

from ..config import Config, dump, to_dict
from ..model.valor import VALOR, build_model, count_parameters
from ..tasks.pretrain import move_batch, pretrain_step_losses
from ..utils.log import get_logger
from .checkpoint import save_model, write_json
from .optim import build_optimizer, lr_factor, set_lr

log = get_logger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is visible")
    return torch.device(name)


def autocast_ctx(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"train.precision must be auto|bf16|fp16|fp32, got {precision!r}")
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(cfg: Config) -> str:
    name = cfg.train.run_name or time.strftime("pretrain-%Y%m%d-%H%M%S")
    path = os.path.abspath(os.path.join(cfg.train.out_dir, name))
    os.makedirs(path, exist_ok=True)
    return path


def prepare_data(cfg: Config) -> None:
    """Generate the synthetic dataset into data.root when it is missing and data.synth is on."""
    ann = os.path.join(cfg.data.root, cfg.data.train_ann)
    if os.path.exists(ann):
        return
    if not cfg.data.synth:
        raise FileNotFoundError(f"no training annotations at {ann!r} (set data.root, or data.synth=true "
                                f"to generate the synthetic dataset)")
    from ..data.synth import generate
    log.info("generating the synthetic audiovisual dataset into %s", cfg.data.root)
    generate(cfg.data.root, seed=cfg.data.synth_seed, clips_per_combo=cfg.data.synth_clips_per_combo)


class _Stop(Exception):
    pass


def train(cfg: Config, run_dir: Optional[str] = None) -> Dict[str, float]:
    from ..data import build_loader
    from ..eval.evaluate import evaluate, format_table

    run_dir = run_dir or make_run_dir(cfg)
    dump(cfg, os.path.join(run_dir, "config.yaml"))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_all(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    amp, precision = autocast_ctx(cfg.train.precision, device)
    prepare_data(cfg)

    model = build_model(cfg.model).to(device)
    counts = count_parameters(model)
    log.info("model %s: %.2fM parameters on %s, precision %s", cfg.model.size, counts["total"] / 1e6,
             device, precision)
    opt = build_optimizer(model, cfg.train, device)
    size = cfg.model.image_size
    train_loader = build_loader(cfg.data, "train", size, cfg.train.batch_size, True, cfg.train.seed)
    val_loader = (build_loader(cfg.data, "val", size, cfg.eval.batch_size, False, cfg.train.seed)
                  if cfg.train.eval_every else None)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)   # masking draws

    stop = {"sig": None}

    def _on_signal(signum, frame):
        stop["sig"] = signum

    old = signal.signal(signal.SIGTERM, _on_signal)
    steps, bs = cfg.train.steps, cfg.train.batch_size
    history = []
    step = 0
    t_start = time.time()
    ckpt = os.path.join(run_dir, "model.safetensors")
    try:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=None if sys.stderr.isatty() else False, mininterval=2.0)
        it = iter(train_loader)
        model.train()
        t_log, n_log = time.time(), 0
        while step < steps:
            if stop["sig"] is not None:
                raise _Stop(f"signal {stop['sig']}")
            try:
                batch = next(it)
            except StopIteration:
                it = iter(train_loader)
                batch = next(it)
            batch = move_batch(batch, device)
            set_lr(opt, lr_factor(step, steps, cfg.train.warmup))
            with amp():
                losses = pretrain_step_losses(model, batch, cfg.loss, gen)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}: "
                                         + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
            opt.step()
            step += 1
            n_log += batch["text_ids"].shape[0]
            rec = {k: float(v.detach()) for k, v in losses.items()}
            rec["grad_norm"] = float(gn)
            rec["temperature"] = float(model.temperature.detach())
            history.append(rec)
            if step % max(1, cfg.train.log_every) == 0 or step == steps:
                dt = time.time() - t_log
                sps = n_log / max(dt, 1e-9)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{sps:.1f}")
                log.info("step %d/%d loss %.4f (%s) grad %.2f lr %.2e temp %.4f  %.1f samples/s",
                         step, steps, rec["loss"],
                         " ".join(f"{k}={v:.3f}" for k, v in rec.items() if "/" in k), rec["grad_norm"],
                         opt.param_groups[0]["lr"], rec["temperature"], sps)
                t_log, n_log = time.time(), 0
            bar.update(1)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
                m = evaluate(model, val_loader, cfg, device, captions=False, autocast=amp)
                log.info("val @%d: t2av R@1 %.3f  t2v %.3f  t2a %.3f", step, m["retrieval/t2av/R@1"],
                         m["retrieval/t2v/R@1"], m["retrieval/t2a/R@1"])
        bar.close()
    except (KeyboardInterrupt, _Stop, Exception) as e:
        # keep what was learnt: write the weights before reporting the failure
        save_model(model, ckpt, {"step": step, "interrupted": type(e).__name__})
        write_json(os.path.join(run_dir, "history.json"), history)
        log.error("training stopped at step %d (%s: %s); weights saved to %s", step, type(e).__name__, e, ckpt)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    train_s = time.time() - t_start
    save_model(model, ckpt, {"step": step, "size": cfg.model.size})
    write_json(os.path.join(run_dir, "history.json"), history)

    log.info("evaluating on the held-out test split")
    test_loader = build_loader(cfg.data, "test", size, cfg.eval.batch_size, False, cfg.train.seed)
    metrics = evaluate(model, test_loader, cfg, device, captions=True, autocast=amp)
    metrics["train/steps"] = float(step)
    metrics["train/seconds"] = train_s
    metrics["train/samples_per_s"] = step * bs / max(train_s, 1e-9)
    metrics["train/final_loss"] = float(np.mean([h["loss"] for h in history[-20:]])) if history else float("nan")
    metrics["train/first_loss"] = history[0]["loss"] if history else float("nan")
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    print("\nTest split (held-out attribute combinations):")
    print(format_table(metrics))
    print(f"\nrun folder: {run_dir}")
    return metrics
