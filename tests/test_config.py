"""Clear errors before work starts: every config field is validated when the config is resolved
(one line naming the field, the value and what is allowed), recipes that are not mappings or
name unknown fields are refused, and the cli says so with exit code 2 and no traceback."""
import dataclasses

import pytest

import valor_fast.tasks  # noqa: F401  (registers the task names train.task allows)
from valor_fast.cli import main
from valor_fast.config import RULES, Config, ConfigError, load_config, show

# (field, bad value as typed on the command line, a fragment of what the error says is allowed)
BAD = [
    ("train.lr", "-1e-3", "> 0"), ("train.lr", "0", "> 0"), ("train.lr", "nan", "finite"), ("train.lr", "inf", "finite"),
    ("train.steps", "0", ">= 1"), ("train.steps", "-5", ">= 1"), ("train.batch_size", "0", ">= 1"),
    ("train.grad_accum", "0", ">= 1"), ("data.frames_train", "0", ">= 1"), ("data.frames_test", "0", ">= 1"),
    ("train.betas", "0.9,1.0", "[0, 1)"), ("train.betas", "-0.1,0.9", "[0, 1)"), ("train.eps", "0", "> 0"),
    ("train.warmup", "1.5", "[0, 1]"), ("train.warmup", "-0.1", "[0, 1]"), ("train.weight_decay", "-1", ">= 0"),
    ("train.grad_clip", "-1", ">= 0"), ("train.keep_ckpts", "0", ">= 1"), ("train.ckpt_every", "-1", ">= 0"),
    ("train.log_every", "0", ">= 1"), ("data.max_bad_rate", "1.5", "[0, 1]"), ("loss.mask_prob", "2", "[0, 1]"),
    ("loss.label_smoothing", "1", "[0, 1)"), ("data.crop_scale_min", "0", "(0, 1]"), ("loss.mga_weight", "-1", ">= 0"),
    ("train.precision", "fp8", "bf16"), ("train.parallel", "zero3", "fsdp"), ("train.nan_policy", "ignore", "skip"),
    ("loss.mga_mode", "medium", "coarse"), ("loss.groups", "tv,vt", "tav"), ("loss.groups", "tv,tv", "distinct"),
    ("loss.mgc_groups", "av", "the same as loss.groups"),
    ("loss.mga_group_weights", "tv:0", "weight > 0"), ("loss.mga_group_weights", "tv:2,tv:1", "distinct"),
    ("loss.mga_group_weights", "av:2", "group:weight"), ("loss.mga_group_weights", "tv", "group:weight"),
    ("loss.mga_group_weights", "tv:x", "weight > 0"), ("loss.mga_group_weights", "tv:inf", "weight > 0"),
    ("model.vision_pos_std", "-1", ">= 0"),
    ("data.backend", "gpu", "dali"), ("train.task", "segmentation", "retrieval"), ("eval.caption_group", "av", "tav"),
    ("eval.retrieval_captions", "some", "all"), ("train.activation_checkpointing", "half", "selective"),
    ("model.pool", "max", "mean"), ("model.vision", "resnet", "swin"), ("data.video_dtype", "fp16", "bf16"),
    ("train.device", "tpu", "cuda"), ("train.run_name", "../elsewhere", "no '/'"), ("eval.beam", "0", ">= 1"),
    ("model.temperature", "0", "> 0"), ("loss.scst_samples", "1", ">= 2"), ("data.num_workers", "-1", ">= 0"),
]


@pytest.mark.parametrize("key,value,allowed", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_range_errors_name_the_field_value_and_range(key, value, allowed):
    with pytest.raises(ConfigError) as ei:
        load_config(None, {key: value})
    msg = str(ei.value)
    assert msg.startswith(f"{key}=") and allowed in msg and "\n" not in msg, msg


@pytest.mark.parametrize("key,value,expected", [
    ("train.steps", "abc", "an integer"), ("train.steps", "1.5", "an integer"), ("train.lr", "fast", "a number"),
    ("train.compile", "maybe", "a boolean"), ("train.betas", "0.9", "2 comma-separated values"),
])
def test_type_errors_name_the_field_and_the_type(key, value, expected):
    with pytest.raises(ConfigError, match=rf"^{key}=.*expected {expected}"):
        load_config(None, {key: value})


@pytest.mark.parametrize("over,fragment", [
    ({"data.max_text_len": "600"}, "model.max_positions"),
    ({"train.batch_size": "6", "train.grad_accum": "4"}, "must divide by world"),
    ({"data.frames_train": "40"}, "model.max_frames"),
    ({"model.text_heads": "3"}, "must divide model.text_width"),
    ({"loss.groups": "tv,tav", "loss.mgc_groups": "ta"}, "no group in common with loss.groups"),
])
def test_cross_field_facts(over, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, over)


def test_batch_divisible_by_the_world_size():
    load_config(None, {"train.batch_size": "12"}, world=3)
    with pytest.raises(ConfigError, match=r"world \(5\)"):
        load_config(None, {"train.batch_size": "12"}, world=5)


def test_every_field_has_a_rule_and_the_defaults_pass():
    cfg = load_config(None, {})
    keys = {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}
    assert keys - set(RULES) == set(), "fields without a rule in config.RULES"
    assert set(RULES) - keys == set(), "rules of fields that do not exist"


@pytest.mark.parametrize("text,fragment", [
    ("- a\n- b\n", "expected a mapping of sections"),
    ("just a string\n", "expected a mapping of sections"),
    ("train: 5\n", "section 'train' must be a mapping"),
    ("trian:\n  lr: 1.0e-3\n", "no section 'trian'"),
    ("train:\n  lr_max: 1.0e-3\n", "has no field 'lr_max'"),
    ("train:\n  steps: [1, 2]\n", "expected an integer"),
    ("train:\n  run_name:\n", "expected a string"),
    ("train:\n  lr: 1.0e-3\n   steps: 3\n", "not valid YAML"),
])
def test_bad_recipes_are_named(tmp_path, text, fragment):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as ei:
        load_config(str(path))
    assert "\n" not in str(ei.value)
    if "section" in fragment or "field" in fragment:
        assert str(path) in str(ei.value)


def test_cli_exit_code_2_one_line_no_traceback(tmp_path, capsys):
    for argv, fragment in (
            (["pretrain", "--train.steps", "abc"], "train.steps='abc': expected an integer"),
            (["pretrain", "--train.steps", "0"], "train.steps=0: must be an integer >= 1"),
            (["pretrain", "--train.lr=-1"], "train.lr=-1.0: must be a finite number > 0"),
            (["pretrain", "--config", str(tmp_path / "none.yaml")], "not found"),
            (["pretrain", "--train.resume", "auto", "--train.out_dir", str(tmp_path)], "needs train.run_name"),
            (["pretrain", "--nproc", "3", "--train.batch_size", "8"], "world (3)")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, (argv, err)
        assert len([l for l in err.splitlines() if l.startswith("valor-fast: error:")]) == 1


def test_help_tells_how_overrides_work(capsys):
    for cmd in ("pretrain", "finetune", "eval", "caption", "embed"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "--SECTION.FIELD VALUE" in out and "valor-fast config show" in out, cmd


def test_config_show_lists_every_field_with_type_value_and_docstring(tmp_path, capsys):
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    cfg = Config()
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            assert f"  {sec.name}.{f.name}: " in out, f.name
    assert "train.lr: float = 0.002" in out and "Peak learning rate." in out and "(no docstring)" not in out
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 3.0e-4\n")
    assert main(["config", "show", "--config", str(recipe), "--section", "train", "--train.steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "train.lr: float = 0.0003   (default 0.002)" in out and "train.steps: int = 7" in out
    assert "[model]" not in out and "  model.size:" not in out
    assert show(load_config(None, {}), "loss").startswith("[loss]")


def test_an_upstream_init_gets_upstream_semantics_unless_the_user_says_otherwise(tmp_path, caplog):
    """Issue 18: a run that starts from an upstream checkpoint (a model_step_N.pt, or safetensors
    that `valor-fast convert` wrote) computes what upstream computes: loss.fine_padding upstream,
    loss.mask_random_from 106, loss.missing_audio zeros - over the shipped recipes' choices, never
    over the user's own (a command-line override or their recipe file)."""
    import torch
    from safetensors.torch import save_file
    from valor_fast.config import UPSTREAM_SEMANTICS
    pt = tmp_path / "model_step_10.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    conv = tmp_path / "valor_b.safetensors"
    save_file({"x": torch.zeros(1)}, str(conv), metadata={"converted_from": "model_step_10.pt"})
    ours = tmp_path / "ours.safetensors"
    save_file({"x": torch.zeros(1)}, str(ours))

    def got(cfg):
        return {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in UPSTREAM_SEMANTICS}

    for init in (pt, conv):
        assert got(load_config("finetune_retrieval", {"train.init": str(init)})) == UPSTREAM_SEMANTICS
        assert got(load_config(None, {"train.init": str(init)})) == UPSTREAM_SEMANTICS
        kept = load_config("finetune_retrieval", {"train.init": str(init), "loss.fine_padding": "exclude"})
        assert kept.loss.fine_padding == "exclude" and kept.loss.mask_random_from == 106
    mine = tmp_path / "mine.yaml"
    mine.write_text("loss:\n  missing_audio: mask\n")
    c = load_config(str(mine), {"train.init": str(pt)})
    assert c.loss.missing_audio == "mask" and c.loss.fine_padding == "upstream"
    # our own weights and no init keep the recipe's choices
    for over in ({"train.init": str(ours)}, {}):
        assert got(load_config("finetune_retrieval", over)) == {"loss.fine_padding": "exclude",
                                                                "loss.mask_random_from": 999,
                                                                "loss.missing_audio": "mask"}
