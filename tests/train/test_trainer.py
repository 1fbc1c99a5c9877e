"""End-to-end: a short pretraining run on a small synthetic set — the loss falls, the run
folder holds config, weights, history and metrics, and eval reloads the checkpoint."""
import json
import os

import pytest
import torch

from valor_fast.config import load_config


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    from valor_fast.data.synth import generate
    root = tmp_path_factory.mktemp("synth")
    generate(str(root / "ds"), seed=3, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    return str(root / "ds")


def _cfg(root, out, **over):
    o = {"data.root": root, "model.image_size": "32", "model.patch_size": "8", "train.steps": "30", "train.batch_size": "16",
         "train.lr": "1e-3", "train.out_dir": out, "train.run_name": "t", "train.log_every": "10",
         "eval.max_len": "8", "eval.beam": "2", "data.synth": "false"}
    o.update(over)
    return load_config(None, o)


@pytest.mark.slow
def test_short_pretraining_loss_falls(small_synth, tmp_path):
    from valor_fast.train.trainer import train
    cfg = _cfg(small_synth, str(tmp_path))
    m = train(cfg)
    run = tmp_path / "t"
    for f in ("config.yaml", "model.safetensors", "history.json", "metrics.json"):
        assert (run / f).exists(), f
    hist = json.loads((run / "history.json").read_text())
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first - 0.5, (first, last)
    metrics = json.loads((run / "metrics.json").read_text())
    for k in ("retrieval/t2av/R@1", "retrieval/t2v/R@1", "retrieval/t2a/R@1", "retrieval/av2t/R@1",
              "caption/CIDEr", "caption/BLEU-4", "caption/ROUGE-L"):
        assert k in metrics
        if "R@" in k:
            assert 0.0 <= metrics[k] <= 1.0
    # eval through the CLI reloads the checkpoint and reproduces the retrieval numbers
    from valor_fast.cli import main
    out = tmp_path / "m.json"
    assert main(["eval", "--ckpt", str(run / "model.safetensors"), "--no-caption", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["retrieval/t2av/R@1"] == pytest.approx(metrics["retrieval/t2av/R@1"])


def test_missing_data_is_a_clear_error(tmp_path):
    from valor_fast.data.synth import prepare_data
    cfg = _cfg(str(tmp_path / "nothing"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.synth"):
        prepare_data(cfg)


def test_stale_synthetic_folder_is_regenerated(tmp_path, monkeypatch):
    """A synthetic folder of ours with other settings is regenerated; one without our owner
    marker is never touched (tests/data/test_synth.py has the refusals)."""
    import valor_fast.data.synth as synth
    from valor_fast.data.synth import prepare_data
    from valor_fast.utils.fs import ForeignContentError, write_owner_marker
    root = tmp_path / "ds"
    root.mkdir()
    (root / "train.jsonl").write_text("{}\n")
    (root / "meta.json").write_text(json.dumps({"version": synth.VERSION - 1, "seed": 0, "clips_per_combo": 4}))
    calls = []
    monkeypatch.setattr(synth, "generate", lambda r, **kw: calls.append((r, kw)))
    cfg = _cfg(str(root), str(tmp_path), **{"data.synth": "true"})
    with pytest.raises(ForeignContentError):
        prepare_data(cfg)
    assert calls == [] and (root / "train.jsonl").exists()
    write_owner_marker(str(root), synth.KIND)
    prepare_data(cfg)
    assert len(calls) == 1
    # a folder from the same generator and settings is reused
    (root / "meta.json").write_text(json.dumps({"version": synth.VERSION, "seed": 0, "clips_per_combo": 4}))
    prepare_data(cfg)
    assert len(calls) == 1 and (root / "train.jsonl").exists()


# -- the Trainer: host syncs, fixed keys, a finished run resumed, periodic validation ----------
@pytest.fixture(scope="module")
def partial_audio(small_synth, tmp_path_factory):
    """The small set with every third clip's audio file removed (data.allow_missing_audio: such
    a clip trains its video groups only)."""
    import glob
    import shutil
    root = str(tmp_path_factory.mktemp("partial") / "ds")
    shutil.copytree(small_synth, root, ignore=shutil.ignore_patterns(".cache"))
    for f in sorted(glob.glob(root + "/audios/*.wav"))[::3]:
        os.remove(f)
    return root


# Value reads that run on CPU tensors only (each gated on the device type, skipped on CUDA): a
# CPU test sees them, a GPU step never makes them.
CPU_ONLY_CHECKS = {"_check_labels": "valor_fast.kernels.lm_head_ce"}


class _SyncCounter:
    """Counts aten._local_scalar_dense (what .item(), bool(), int() and float() on a tensor
    dispatch to) outside the phases allowed to read values.  Not counted: the optimiser's step
    counters (torch keeps them on the host unless capturable; fused AdamW on CUDA reads none) and
    CPU_ONLY_CHECKS."""

    def __init__(self, opt):
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self
        self.opt, self.paused, self.calls = opt, 0, []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and not counter.paused:
                    steps = {s["step"].data_ptr() for s in counter.opt.state.values() if torch.is_tensor(s.get("step"))}
                    import traceback
                    stack = traceback.extract_stack()
                    if args[0].data_ptr() not in steps and not any(f.name in CPU_ONLY_CHECKS for f in stack):
                        counter.calls.append("".join(traceback.format_list(stack[-14:-2])))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def allow(self, fn):
        def wrapped(*a, **k):
            self.paused += 1
            try:
                return fn(*a, **k)
            finally:
                self.paused -= 1
        return wrapped


def test_training_steps_make_no_host_syncs(partial_audio, tmp_path):
    """Between log points a step reads no value back from the device: several pretraining steps
    on batches where some clips lack audio, counted with a TorchDispatchMode.  Allowed: the host
    side of a batch (decoding, the task's prepare), and the log / checkpoint / non-finite checks."""
    import importlib
    import inspect
    from valor_fast.train.dist import DistInfo
    from valor_fast.train.trainer import Trainer
    for fn, mod in CPU_ONLY_CHECKS.items():   # the exemption holds only while the read is CPU-gated
        assert 'device.type == "cpu"' in inspect.getsource(getattr(importlib.import_module(mod), fn)), fn
    cfg = _cfg(partial_audio, str(tmp_path), **{"train.steps": "3", "train.log_every": "3", "train.batch_size": "8",
                                               "train.final_eval": "false", "train.tensorboard": "false",
                                               "train.grad_accum": "2", "data.cache": "false",
                                               "loss.mgc_groups": ""})   # every group, T-A's masked zeros too
    t = Trainer(cfg, DistInfo())
    c = _SyncCounter(t.opt)
    audio = []
    nb = t.next_batch
    def next_batch(mi):
        b = nb(mi)
        audio.append(b["has_audio"].clone())
        return b
    t.next_batch = c.allow(next_batch)
    for name in ("check_finite", "judge_media", "checkpoint", "_export", "log"):
        setattr(t, name, c.allow(getattr(t, name)))
    t.metrics.flush = c.allow(t.metrics.flush)
    with c.mode:
        t.fit()
    assert c.calls == [], f"{len(c.calls)} host syncs in the steps; the first from:\n{c.calls[0]}"
    assert len(audio) == 6 and any(not bool(a.all()) for a in audio), "no batch with a clip lacking audio"
    hist = json.loads((tmp_path / "t" / "history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert all(set(h) == set(hist[0]) for h in hist)
    assert set(hist[0]) == {"step", "loss", "grad_norm", "mga/tv", "mga/ta", "mga/tav", "mgc/tv", "mgc/ta", "mgc/tav"}


def test_metric_records_have_fixed_keys():
    from valor_fast.train.metrics import MetricLogger
    ml = MetricLogger(("loss", "mga/tv"))
    assert ml.flush() is None                                   # nothing pending: no record, no error
    ml.record(1, {"loss": torch.tensor(1.0), "mga/tv": torch.tensor(2.0)}, torch.tensor(3.0))
    with pytest.raises(KeyError, match="mga/ta"):
        ml.record(2, {"loss": torch.tensor(1.0), "mga/ta": torch.tensor(2.0)}, torch.tensor(3.0))
    assert ml.flush() == {"loss": 1.0, "mga/tv": 2.0, "grad_norm": 3.0, "step": 1}
    ml.add(1, {"val/x": 0.5})
    assert ml.history == [{"loss": 1.0, "mga/tv": 2.0, "grad_norm": 3.0, "step": 1, "val/x": 0.5}]


def test_validation_every_n_steps_and_a_finished_run_resumed(small_synth, tmp_path, capsys):
    """train.eval_every records val/... metrics in the history; resuming the finished run trains
    nothing, says so, and leaves the run folder as it was."""
    from valor_fast.train.trainer import train
    over = {"train.steps": "2", "train.log_every": "1", "train.eval_every": "1", "train.final_eval": "false",
            "train.batch_size": "8", "eval.max_len": "4", "eval.beam": "1", "data.cache": "false"}
    m = train(_cfg(small_synth, str(tmp_path), **over))
    run = tmp_path / "t"
    hist = json.loads((run / "history.json").read_text())
    val = [h for h in hist if "val/retrieval/t2av/R@1" in h]
    assert [h["step"] for h in val] == [1, 2]
    assert all("val/caption/CIDEr" in h and 0.0 <= h["val/retrieval/t2av/R@1"] <= 1.0 for h in val)
    files = lambda: {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")
                     if p.is_file() and p.name != "config.yaml"}
    before = files()
    capsys.readouterr()
    again = train(_cfg(small_synth, str(tmp_path), **dict(over, **{"train.resume": "auto"})))
    assert "already complete" in capsys.readouterr().err
    assert again == m
    assert files() == before


def test_sigterm_checkpoints_the_step_reached(small_synth, tmp_path):
    """A SIGTERM (preemption) between steps: the step reached is checkpointed, complete, and its
    record kept in the history before the run stops."""
    import signal
    from valor_fast.train.dist import DistInfo
    from valor_fast.train.trainer import Preempted, Trainer
    cfg = _cfg(small_synth, str(tmp_path), **{"train.steps": "5", "train.batch_size": "8", "train.final_eval": "false",
                                             "data.cache": "false", "train.tensorboard": "false"})
    t = Trainer(cfg, DistInfo())
    after = t.after_step
    def after_step():
        after()
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # delivered to the trainer's handler
    t.after_step = after_step
    with pytest.raises(Preempted, match="signal"):
        t.fit()
    assert [s for s, _ in t.ckpts.complete()] == [2]
    assert [h["step"] for h in json.loads((tmp_path / "t" / "history.json").read_text())] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) != t._on_signal   # the handler is restored
