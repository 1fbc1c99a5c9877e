"""Runs never lose or poison their state: a run folder is locked, a resume with another model is
refused, history survives a resume, an all-corrupt fallback starts from the initial weights and
prunes nothing new, SIGTERM after an undetected NaN names the last good checkpoint and writes
none, a full disk at export keeps the checkpoint, a NaN checkpoint is refused by eval; exit codes
2 / 1 / 130 / 143 with one line and no traceback.  Tiny runs (32 px, batch 8, 1-3 steps) through
the cli in this process, on a small synthetic set, with a one-layer model."""
import errno
import glob
import json
import logging
import os
import shutil
import signal

import pytest
import torch

import valor_fast.tasks  # noqa: F401
from valor_fast.cli import main
from valor_fast.config import dump, load_config
from valor_fast.train import checkpoint as ckmod
from valor_fast.train.runlock import RunLock
from valor_fast.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from valor_fast.data.synth import generate
    root = tmp_path_factory.mktemp("guard") / "ds"
    generate(str(root), seed=4, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    return str(root)


def _args(data_root, out, name="t", **over):
    o = {"data.root": data_root, "data.synth": "false", "data.cache": "false", "model.image_size": "32",
         "model.patch_size": "8", "train.lr": "1e-3", "train.out_dir": str(out),
         "train.run_name": name, "train.log_every": "1", "train.final_eval": "false", "train.tensorboard": "false",
         "train.steps": "2", "train.seed": "3", "train.batch_size": "4", "data.frames_train": "2",
         "data.frames_test": "2", "data.max_text_len": "16", "eval.max_len": "8", "eval.qa_max_answer_len": "4",
         "model.text_layers": "1", "model.vision_layers": "1", "model.audio_layers": "1", "loss.groups": "tv"}
    o.update({k: str(v) for k, v in over.items()})
    return ["pretrain"] + [f"--{k}={v}" for k, v in o.items()]


def _history(run):
    return json.loads((run / "history.json").read_text())


def _ckpts(run):
    return sorted(os.listdir(run / "checkpoints"))


@pytest.fixture
def pkg_log():
    """Messages of the package's loggers (they write to the stderr of their creation, not capsys)."""
    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())
    h = Keep()
    lg = logging.getLogger("valor_fast")
    lg.addHandler(h)
    yield h.lines
    lg.removeHandler(h)


@pytest.fixture(scope="module")
def base_run(data_root, tmp_path_factory):
    """Two steps, a checkpoint after each (keep 2): the run later tests copy and resume."""
    out = tmp_path_factory.mktemp("base")
    assert main(_args(data_root, out, **{"train.ckpt_every": 1, "train.keep_ckpts": 2})) == 0
    return out / "t"


def _copy(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "t")
    return tmp_path / "t"


# ---------------- refusals before any work ----------------

def test_a_locked_run_folder_refuses_a_second_run(data_root, tmp_path, capsys):
    run = tmp_path / "t"
    with RunLock(str(run)):                       # another run holds the folder
        assert main(_args(data_root, tmp_path)) == 2
        err = capsys.readouterr().err
        assert "is in use by pid" in err and str(run) in err and "Traceback" not in err
        assert os.listdir(run) == [".valor-fast.lock"]   # nothing written into it


def test_resume_with_another_model_config_is_refused(data_root, tmp_path, capsys):
    run = tmp_path / "t"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "meta.json").write_text('{"step": 2}')
    over = dict(a[2:].split("=", 1) for a in _args(data_root, tmp_path)[1:])
    dump(load_config(None, over), str(run / "config.yaml"))
    before = (run / "config.yaml").read_text()
    argv = _args(data_root, tmp_path, **{"train.resume": "auto", "model.text_layers": 3, "loss.mga_mode": "coarse",
                                         "train.steps": 4})
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "model.text_layers: 1 -> 3" in err
    assert "loss.mga_mode: 'fine' -> 'coarse'" in err
    assert "train.steps" not in err.split("refusing")[1] and "--train.resume_partial" in err
    assert (run / "config.yaml").read_text() == before
    # a fresh run (no resume) into a trained folder is refused too
    assert main(_args(data_root, tmp_path)) == 2
    assert "already holds a trained run" in capsys.readouterr().err


# ---------------- resume: history, fallback, partial ----------------

def test_history_is_kept_across_a_resume(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    before = _history(run)
    assert [h["step"] for h in before] == [1, 2]
    assert main(_args(_data(run), tmp_path, **{"train.resume": "auto", "train.steps": 3, "train.keep_ckpts": 2})) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    after = _history(run)
    assert [h["step"] for h in after] == [1, 2, 3] and after[:2] == before


def _data(run):
    return load_config(str(run / "config.yaml")).data.root


def test_all_corrupt_fallback_starts_from_the_initial_weights_and_prunes_nothing_new(base_run, tmp_path, capsys):
    """Both checkpoints (steps 1, 2) fail to load: the run restarts at step 0 from the initial
    weights (its first loss is the original first loss), the failed ones are set aside, and
    keep_ckpts=1 keeps the new step 1 (by step number the corrupt step 2 would have won)."""
    run = _copy(base_run, tmp_path)
    first = _history(run)[0]["loss"]
    for f in glob.glob(str(run / "checkpoints" / "*" / "*.distcp")):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    assert main(_args(_data(run), tmp_path, **{"train.resume": "auto", "train.steps": 1, "train.keep_ckpts": 1})) == 0
    assert "starting from the initial weights at step 0" in capsys.readouterr().out
    hist = _history(run)
    assert [h["step"] for h in hist] == [1]
    assert hist[0]["loss"] == pytest.approx(first, rel=1e-5, abs=1e-6)   # the very first step again
    assert _ckpts(run) == ["step_00000001", "step_00000001.corrupt-unreadable", "step_00000002.corrupt-unreadable"]


def test_resume_partial_loads_what_fits_and_lists_every_difference(base_run, tmp_path, pkg_log):
    run = _copy(base_run, tmp_path)
    assert main(_args(_data(run), tmp_path, **{"train.resume": "auto", "train.steps": 3, "model.contra_dim": 64,
                                               "train.resume_partial": "true"})) == 0
    text = "\n".join(pkg_log)
    assert "text_proj.weight (128, 128) vs (64, 128)" in text and "audio_proj.weight" in text
    assert "the optimiser starts fresh" in text
    assert [h["step"] for h in _history(run)] == [1, 2, 3]


# ---------------- stops ----------------

def _stop_at(monkeypatch, step, sig):
    after = Trainer.after_step

    def after_step(self):
        after(self)
        if self.step == step:
            os.kill(os.getpid(), sig)   # delivered to the trainer's handler, taken before the next step
    monkeypatch.setattr(Trainer, "after_step", after_step)


def test_sigterm_after_an_undetected_nan_writes_no_checkpoint(base_run, tmp_path, capsys, monkeypatch):
    """Resumed at step 2, step 3 is NaN (train.fail_at_step=2) and its check is due at step 4
    (checkpoint) or 5 (log): at the SIGTERM after step 3 nothing has noticed it yet."""
    run = _copy(base_run, tmp_path)
    _stop_at(monkeypatch, 3, signal.SIGTERM)
    rc = main(_args(_data(run), tmp_path, **{"train.resume": "auto", "train.steps": 6, "train.ckpt_every": 4,
                                             "train.log_every": 5, "train.fail_at_step": 2, "train.nan_policy": "stop",
                                             "train.keep_ckpts": 2}))
    err = capsys.readouterr().err
    assert rc == 143 and "Traceback" not in err
    assert "NOT checkpointed" in err and "non-finite loss or gradient norm at step 2" in err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_00000002'}" in err
    assert _ckpts(run) == ["step_00000001", "step_00000002"]
    hist = _history(run)
    assert [h["step"] for h in hist] == [1, 2] and all(h["loss"] == h["loss"] for h in hist)


def test_ctrl_c_checkpoints_the_step_reached(data_root, tmp_path, capsys, monkeypatch):
    handler = signal.getsignal(signal.SIGINT)
    _stop_at(monkeypatch, 1, signal.SIGINT)
    assert main(_args(data_root, tmp_path, **{"train.steps": 3})) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 1" in err and "step_00000001" in err and "Traceback" not in err
    assert _ckpts(tmp_path / "t") == ["step_00000001"]
    assert signal.getsignal(signal.SIGINT) is handler   # restored


def test_full_disk_at_export_keeps_the_checkpoint(data_root, tmp_path, capsys, monkeypatch):
    def full_disk(sd, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckmod, "save_file", full_disk)
    assert main(_args(data_root, tmp_path, **{"train.steps": 1})) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("valor-fast: error:")]
    assert len(lines) == 1 and "No space left" in lines[0] and "step_00000001" in lines[0], err
    run = tmp_path / "t"
    assert _ckpts(run) == ["step_00000001"] and not (run / "model.safetensors").exists()
    assert not glob.glob(str(run / "*.tmp.*"))
    monkeypatch.undo()
    assert main(_args(data_root, tmp_path, **{"train.steps": 1, "train.resume": "auto"})) == 0
    assert "was missing: written from checkpoint" in capsys.readouterr().err
    assert (run / "model.safetensors").exists()


def test_eval_refuses_a_nan_checkpoint_naming_it(base_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(base_run / "model.safetensors"))
    sd["text_proj.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan" / "model.safetensors"
    bad.parent.mkdir()
    save_file(sd, str(bad))
    shutil.copy(base_run / "config.yaml", bad.parent / "config.yaml")
    assert main(["eval", "--ckpt", str(bad), "--no-caption", "--eval.batch_size", "4"]) == 2
    err = capsys.readouterr().err
    assert f"text embeddings of {bad}" in err and "not scored" in err and "Traceback" not in err
