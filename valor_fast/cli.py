"""`valor-fast` command line.

    valor-fast data synth [--root DIR] [--seed N]
    valor-fast data check PATH [--quick] [--out report.json]
    valor-fast data pack PATH --out PATH/shards [--per-shard 256]
    valor-fast data bench [PATH] [--backends cpu,dali] [--frames 4 8] [--size 224] [--jpeg] [--out F]
    valor-fast pretrain [--config tiny] [--train.lr 3e-4 ...]
    valor-fast eval --ckpt RUN/model.safetensors [--config RUN/config.yaml] [--split test]
    valor-fast finetune --task retrieval|caption|qa --init RUN/model.safetensors [--config ...]
    valor-fast eval --ckpt RUN/model.safetensors [--task retrieval|caption|qa]
    valor-fast caption VIDEO [VIDEO ...] --ckpt RUN/model.safetensors [--audio WAV ...]
    valor-fast embed --ckpt RUN/model.safetensors --split test --out feats.safetensors
    valor-fast convert model_step_N.pt --out model.safetensors [--config valor_b]
    valor-fast info
    valor-fast config show [--config RECIPE] [--section train] [--section.field value ...]
    valor-fast bench [--quick] [--size base --batch 32 --find-max-batch]
    valor-fast bench --audit [--check] [--only csrc]   # bench/kernel_audit.py: sm_80 / sm_90a, no GPU

Dotted overrides (`--section.field value`) apply on top of the recipe; the resolved config is
printed and saved in the run folder.

Exit codes: 0 done; 1 a training stop (non-finite loss, too much bad media, a failed export) or
bad media found by `data check`; 2 a usage or input error (a config value, a recipe, a refused
resume, a locked run folder, a folder valor-fast will not overwrite, an unloadable checkpoint,
a model producing NaN); 130 Ctrl-C; 143 SIGTERM (a checkpoint of the step reached is written
first, unless a step since the last check was non-finite).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Tuple


class UsageError(ValueError):
    """A command line that cannot run as given (exit code 2)."""


def split_overrides(argv: List[str]) -> Tuple[List[str], dict]:
    """Pull `--a.b value` / `--a.b=value` pairs out of argv."""
    rest, over = [], {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=")[0][2:]:
            if "=" in a:
                k, v = a[2:].split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise UsageError(f"override {a} needs a value (--section.field VALUE)")
                k, v = a[2:], argv[i + 1]
                i += 1
            over[k] = v
        else:
            rest.append(a)
        i += 1
    return rest, over


OVERRIDES_HELP = """\
config overrides:
  Every config field can be set on the command line as --SECTION.FIELD VALUE (or
  --SECTION.FIELD=VALUE), applied on top of --config RECIPE (a YAML path or the name of a
  shipped recipe: tiny (the default), base, large, valor_b, valor_l, finetune_caption, ...).  Sections: model, data, loss, train, eval.
  Examples: --train.lr 3e-4  --train.steps 2000  --data.root /data/msrvtt  --loss.groups tav,tv
  Every value is checked before any work starts (an error names the field, the value and
  what it allows).  All fields with their type, default and meaning:
      valor-fast config show [--config RECIPE] [--section train]
"""


def _load(args, over, world=None):
    from . import tasks  # noqa: F401  (registers the task names train.task's rule allows)
    from .config import load_config, to_dict
    import yaml
    cfg = load_config(args.config, over, world=world)
    print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), file=sys.stderr)
    return cfg


def cmd_pretrain(args, over) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # one node, N processes: hand over to torchrun with the same recipe and overrides,
        # checked here first so a bad value fails once, before any process starts
        from . import tasks  # noqa: F401
        from .config import load_config
        load_config(args.config, over, world=args.nproc)
        import socket
        import subprocess
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "valor_fast.train"]
        if args.config:
            cmd += ["--config", args.config]
        cmd += [f"--{k}={v}" for k, v in over.items()]
        print("launching: " + " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    from .train.trainer import train
    cfg = _load(args, over)
    train(cfg, recipe=args.config or "tiny (the default)")
    return 0


def cmd_finetune(args, over) -> int:
    """pretrain's launcher with a task recipe: the shipped recipe finetune_<task> unless --config."""
    if args.config is None:
        from .config import RECIPES_DIR
        args.config = f"finetune_{args.task}"
        if not os.path.exists(os.path.join(RECIPES_DIR, args.config + ".yaml")):
            raise UsageError(f"no recipe {args.config} in {RECIPES_DIR}; pass --config")
    over = dict(over)
    over["train.task"] = args.task
    if args.init:
        if not os.path.exists(args.init):
            raise UsageError(f"--init {args.init!r} not found")
        over["train.init"] = os.path.abspath(args.init)
    else:
        print("finetune without --init: starting from random / HF-initialised weights", file=sys.stderr)
    return cmd_pretrain(args, over)


def _need_ckpt(args) -> None:
    """A command that scores or uses a model refuses a random one unless --random-init."""
    if not args.ckpt and not args.random_init:
        raise UsageError(f"{args.cmd}: no --ckpt given; pass --ckpt RUN/model.safetensors, or --random-init to "
                         f"use a randomly initialised model on purpose (its outputs mean nothing)")
    if args.ckpt and not os.path.exists(args.ckpt):
        raise UsageError(f"{args.cmd}: --ckpt {args.ckpt!r} not found")


def cmd_caption(args, over) -> int:
    from .infer import caption_files, load_run
    if args.audio and len(args.audio) != len(args.videos):
        raise UsageError(f"--audio takes one file per video: {len(args.audio)} audio for {len(args.videos)} videos")
    _need_ckpt(args)
    cfg, model, dev = load_run(args.ckpt, args.config, over)
    caps = caption_files(model, cfg, dev, args.videos, args.audio, beam=args.beam,
                         source=args.ckpt or "a randomly initialised model")
    for path, c in caps.items():
        print(f"{path}\t{c}")
    return 0


def cmd_embed(args, over) -> int:
    from .data.synth import prepare_data
    from .infer import embed_split, load_run, save_features
    _need_ckpt(args)
    cfg, model, dev = load_run(args.ckpt, args.config, over)
    prepare_data(cfg)
    feats = embed_split(model, cfg, dev, args.split, cfg.eval.batch_size, source=args.ckpt or "a random model")
    save_features(feats, args.out)
    print(f"{len(feats['_ids'])} clips: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in feats.items() if k != "_ids")
          + f" -> {args.out}")
    return 0


def _frame_slots(arg: str):
    """--frame-slots: auto | none | N,S."""
    if arg in ("auto", "none"):
        return None if arg == "none" else "auto"
    try:
        n, s = (int(x) for x in arg.split(","))
    except ValueError:
        raise SystemExit(f"--frame-slots must be auto, none or N,S (frames,slices), got {arg!r}")
    if n < 1 or s < 1:
        raise SystemExit(f"--frame-slots: frames and slices must be >= 1, got {arg!r}")
    return n, s


def cmd_convert(args, over) -> int:
    from .config import load_config
    from .model.convert import load_valor_checkpoint
    from .model.valor import build_model
    from .train.checkpoint import save_model, write_json
    cfg = load_config(args.config, over)
    model = build_model(cfg.model)
    rep = load_valor_checkpoint(model, args.ckpt, frame_slots=_frame_slots(args.frame_slots))
    save_model(model, args.out, metadata={"converted_from": os.path.basename(args.ckpt), "size": cfg.model.size})
    write_json(args.out + ".report.json", rep)
    print(f"{rep['loaded']} tensors converted -> {args.out}; {len(rep['missing'])} of ours left at init, "
          f"{len(rep['unused'])} upstream tensors unused (listed in {args.out}.report.json)")
    return 0


def cmd_eval(args, over) -> int:
    from .data import build_loader, prepare_data
    from .data.annotations import check_splits
    from .eval.dispatch import evaluate_task
    from .eval.evaluate import format_table
    from .model.family import build_model
    from .runtime import autocast_ctx, resolve_device
    from .train.checkpoint import load_model, write_json
    _need_ckpt(args)
    cfg_path = args.config
    if cfg_path is None and args.ckpt:
        cand = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "config.yaml")
        cfg_path = cand if os.path.exists(cand) else None
    args.config = cfg_path
    if args.task:
        over = dict(over, **{"train.task": args.task})
    elif args.no_caption:
        over = dict(over, **{"train.task": "retrieval"})
    cfg = _load(args, over)
    if cfg.train.task == "pretrain":
        cfg.train.task = "caption"   # pretrained models: retrieval + captioning
    device = resolve_device(cfg.train.device)
    prepare_data(cfg)
    check_splits(cfg.data, [args.split])   # the split's annotations readable before the model is built
    model = build_model(cfg.model).to(device)
    if args.ckpt:
        load_model(model, args.ckpt)   # strict: a mismatch raises, naming the keys
        print(f"loaded {args.ckpt}", file=sys.stderr)
    else:
        print("--random-init: evaluating a randomly initialised model", file=sys.stderr)
    amp, _ = autocast_ctx(cfg.train.precision, device)
    loader = build_loader(cfg.data, args.split, cfg.model.image_size, cfg.eval.batch_size, False, cfg.train.seed,
                          mel_bins=cfg.model.audio_mel_bins)
    m = evaluate_task(model, loader, cfg, device, amp, source=args.ckpt or "a randomly initialised model")
    print(format_table(m))
    if args.out:
        write_json(args.out, m)
        print(f"metrics written to {args.out}")
    return 0


def cmd_data(args, over) -> int:
    if args.action == "synth":
        from .data.synth import generate
        summary = generate(args.root, seed=args.seed, clips_per_combo=args.clips_per_combo)
        print(json.dumps(summary, indent=2, default=str))
        return 0
    if args.action == "check":
        from .config import load_config
        from .data.tools import check_dataset, format_check, write_json
        root = args.path or args.root
        rep = check_dataset(root, load_config(args.config, over).data if (args.config or over) else None,
                            quick=args.quick, workers=args.workers)
        print(format_check(rep))
        if args.out:
            write_json(args.out, rep)
            print(f"report written to {args.out}")
        return 1 if rep["bad"] else 0
    if args.action == "bench":
        return _data_bench(args)
    if args.action == "pack":
        from .data.tools import write_shards
        if not args.path or not args.out:
            raise UsageError("data pack needs the dataset folder and --out SHARD_FOLDER")
        for ann in args.ann.split(","):
            split = os.path.splitext(os.path.basename(ann))[0]
            paths = write_shards(args.path, args.out, per_shard=args.per_shard, prefix=split, ann=ann,
                                 video_dir=args.video_dir, audio_dir=args.audio_dir)
            print(f"{ann}: {len(paths)} shard(s) in {args.out} (use data.{split}_ann=shards:{os.path.basename(args.out)}/"
                  f"{split}-*.tar with data.root={args.path}, or data.shards=... beside the annotations)")
        return 0
    raise SystemExit(f"unknown data action {args.action!r}")


def _data_bench(args) -> int:
    """Clips/s of each backend at VALOR's shapes on a synthetic set made for the purpose (224 px,
    10 s audio unless told otherwise), optionally appended to a results file."""
    from .data.synth import generate
    from .data.tools import bench_backends, write_frame_folders
    from .utils import deps
    root = args.path
    if root is None:
        root = os.path.join("data_cache", f"bench_{args.size}px_{args.seconds:g}s")
        if not os.path.exists(os.path.join(root, "train.jsonl")):
            print(f"writing a synthetic set for the benchmark to {root} ({args.size} px, {args.seconds:g} s)")
            generate(root, seed=0, clips_per_combo=1, image_size=args.size, seconds=args.seconds, fps=25)
    backends = args.backends.split(",") if args.backends else ["cpu"] + (["dali"] if deps.HAS_DALI else [])
    roots = [("video files", root)]
    if args.jpeg:
        jroot = root.rstrip("/") + "_jpeg"
        if not os.path.exists(os.path.join(jroot, "train.jsonl")):
            print(f"extracting JPEG frame folders to {jroot}")
            write_frame_folders(root, jroot)
        roots.append(("jpeg frames", jroot))
    rows = []
    for what, r in roots:
        for frames in args.frames:
            for row in bench_backends(r, backends, args.batch, frames, args.size, args.batches, args.device,
                                      args.workers):
                row["input"] = what
                rows.append(row)
    print(f"{'input':12s} {'backend':7s} {'device':8s} {'frames':>6s} {'size':>5s} {'clips/s':>9s}")
    for r in rows:
        print(f"{r['input']:12s} {r['backend']:7s} {r['device']:8s} {r['frames']:6d} {r['size']:5d} "
              f"{r['clips_per_s']:9.1f}")
    if args.out:
        import subprocess
        import torch
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            commit = ""
        env = {"torch": torch.__version__, "commit": commit, "cuda": torch.cuda.get_device_name() if
               torch.cuda.is_available() else None, "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**env, **r}) + "\n")
        print(f"rows appended to {args.out}")
    return 0


def cmd_config(args, over) -> int:
    """`config show`: every field with its type, value (default when it differs), what it
    allows and its docstring; of the recipe and overrides given."""
    from . import tasks  # noqa: F401  (the task names train.task allows)
    from .config import load_config, show
    print(show(load_config(args.config, over), args.section), end="")
    return 0


def cmd_bench(args, over) -> int:
    """Run bench/run_all.py of this source checkout (the bench scripts are not installed); with
    --audit, bench/kernel_audit.py (the ahead-of-time kernel audit) with the other arguments."""
    import subprocess
    rest = list(args.bench_args)
    name = "run_all.py"
    if "--audit" in rest:
        rest.remove("--audit")
        name = "kernel_audit.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "bench", name)
    if not os.path.exists(script):
        raise SystemExit(f"valor-fast bench: {script} not found; the benchmarks live in the source "
                         "repository (git clone it and `pip install -e .`)")
    return subprocess.call([sys.executable, script] + rest, cwd=root)


def cmd_info(args, over) -> int:
    import torch
    from .model.args import SIZES, model_config, swin_size_of
    from .model.valor import VALOR, count_parameters
    from .utils import deps
    print(f"valor-fast  torch {torch.__version__}  cuda {torch.cuda.is_available()}")
    print("optional backends: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in deps.summary().items()))
    print(f"{'size':<8} {'vision enc':<12} {'total':>9} {'text':>9} {'vision':>9} {'audio':>9} {'x-attn':>9}")
    for s in SIZES:
        mc = model_config(s)
        with torch.device("meta"):   # base/large without allocating their weights
            m = VALOR(mc)
        c = count_parameters(m)
        f = lambda n: f"{n / 1e6:8.1f}M"
        enc = (f"swin-{swin_size_of(mc)}" if mc.vision == "swin"
               else f"vit-{mc.vision_width}/{mc.patch_size}")
        print(f"{s:<8} {enc:<12} {f(c['total'])} {f(c['text'])} {f(c['vision'])} {f(c['audio'])} "
              f"{f(c['decoder_cross_attention'])}")
    _info_family_rows()
    return 0


def _info_family_rows() -> None:
    """Parameter counts of the CoAVT and VLSA sizes, beside VALOR's (built on the meta device)."""
    import torch
    from .model.args import COAVT_SIZES, VLSA_SIZES
    from .model.coavt import CoAVT
    from .model.family import count_parameters
    from .model.vlsa import VLSA
    f = lambda n: f"{n / 1e6:8.1f}M"  # noqa: E731
    print(f"\n{'family':<6} {'size':<6} {'total':>9}  components")
    for fam, sizes, cls in (("coavt", COAVT_SIZES, CoAVT), ("vlsa", VLSA_SIZES, VLSA)):
        for name, args in sizes.items():
            with torch.device("meta"):
                c = count_parameters(cls(args))
            parts = "  ".join(f"{k} {v / 1e6:.1f}M" for k, v in c.items() if k != "total")
            print(f"{fam:<6} {name:<6} {f(c['total'])}  {parts}")


def _sub(sub, name: str, help: str, overrides: bool = True):
    """A subcommand whose --help ends with how overrides work (for those that take them)."""
    return sub.add_parser(name, help=help, description=help, epilog=OVERRIDES_HELP if overrides else None,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _train_parsers(sub) -> None:
    sp = _sub(sub, "pretrain", "pretrain (MGA + MGC) on the configured data")
    sp.add_argument("--config", default=None, help="recipe: a shipped name (tiny, base, large, valor_b, valor_l, finetune_*) or a YAML path; default: tiny, the embedded default")
    sp.add_argument("--nproc", type=int, default=1, help="processes on this node (runs torchrun)")
    sf = _sub(sub, "finetune", "fine-tune a checkpoint on a downstream task")
    sf.add_argument("--task", required=True, choices=["retrieval", "caption", "qa", "scst"])
    sf.add_argument("--init", default=None, help="our model.safetensors / run folder, or an upstream VALOR .pt")
    sf.add_argument("--config", default=None, help="recipe name or YAML path (default: finetune_<task>)")
    sf.add_argument("--nproc", type=int, default=1, help="processes on this node (runs torchrun)")
    sc = _sub(sub, "config", "show the config fields: type, value, allowed values, docstring")
    sc.add_argument("action", choices=["show"])
    sc.add_argument("--config", default=None, help="recipe whose values to show (default: the defaults)")
    sc.add_argument("--section", default=None, choices=["model", "data", "loss", "train", "eval", "coavt", "vlsa"])


def _model_parsers(sub) -> None:
    rnd = dict(action="store_true", help="use a randomly initialised model on purpose (no --ckpt)")
    se = _sub(sub, "eval", "retrieval + captioning metrics of a checkpoint")
    se.add_argument("--config", default=None)
    se.add_argument("--ckpt", default=None, help="model.safetensors of a run")
    se.add_argument("--random-init", **rnd)
    se.add_argument("--split", default="test", choices=["train", "val", "test"])
    se.add_argument("--no-caption", action="store_true", help="retrieval only (= --task retrieval)")
    se.add_argument("--task", default=None, choices=["retrieval", "caption", "qa", "scst"],
                    help="metrics to compute (default: the run's task; pretrained runs: retrieval + caption)")
    se.add_argument("--out", default=None, help="write metrics JSON here")
    sc = _sub(sub, "caption", "caption video files with a trained model")
    sc.add_argument("videos", nargs="+", help="video files (or folders of frames)")
    sc.add_argument("--ckpt", default=None, help="model.safetensors (config.yaml beside it is used)")
    sc.add_argument("--random-init", **rnd)
    sc.add_argument("--config", default=None)
    sc.add_argument("--audio", nargs="*", default=None, help="one WAV/FLAC per video (default: the video's track)")
    sc.add_argument("--beam", type=int, default=None)
    sm = _sub(sub, "embed", "text/video/audio embeddings of a split to .safetensors / .npz")
    sm.add_argument("--ckpt", default=None)
    sm.add_argument("--random-init", **rnd)
    sm.add_argument("--config", default=None)
    sm.add_argument("--split", default="test", choices=["train", "val", "test"])
    sm.add_argument("--out", required=True, help="features file (.safetensors or .npz)")
    sv = _sub(sub, "convert", "upstream VALOR checkpoint -> our safetensors, with a key report")
    sv.add_argument("ckpt", help="upstream model_step_N.pt (read with weights_only=True)")
    sv.add_argument("--config", default=None, help="recipe of the matching size (valor_b, valor_l, base, ... or a YAML path)")
    sv.add_argument("--out", required=True)
    sv.add_argument("--frame-slots", default="auto",
                    help="frame-embedding rows past the pretraining frames,slices are copies of the last trained "
                         "one, as upstream's fine-tuning load does: auto (VALOR-B 4,1; VALOR-L 2,1), N,S, or none "
                         "(the tensors as saved)")


def _data_parser(sub) -> None:
    sd = _sub(sub, "data", "dataset tools")
    sd.add_argument("action", choices=["synth", "check", "bench", "pack"],
                    help="synth: write the synthetic set (into a new, empty or earlier synthetic folder only); "
                         "check PATH: scan a dataset for bad media; "
                         "bench [PATH]: clips/s of each decoding backend; pack PATH --out DIR: WebDataset "
                         "tar shards of each annotation file's clips (media + <id>.json captions)")
    sd.add_argument("path", nargs="?", default=None, help="dataset folder (check, bench)")
    sd.add_argument("--root", default="data_cache/synth", help="synth: where to write")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--clips-per-combo", type=int, default=4)
    sd.add_argument("--config", default=None, help="check: recipe naming the annotation files / folders")
    sd.add_argument("--quick", action="store_true", help="check: headers and packets only, no pixel decoding")
    sd.add_argument("--workers", type=int, default=2, help="check: processes; bench: loader workers / DALI threads")
    sd.add_argument("--out", default=None, help="check: JSON report; bench: results file to append rows to")
    sd.add_argument("--backends", default=None, help="bench: comma list of cpu,dali (default: all installed)")
    sd.add_argument("--frames", type=int, nargs="+", default=[4, 8], help="bench: frames per clip")
    sd.add_argument("--size", type=int, default=224, help="bench: frame size")
    sd.add_argument("--seconds", type=float, default=10.0, help="bench: clip length of the synthetic set")
    sd.add_argument("--batch", type=int, default=32, help="bench: clips per batch")
    sd.add_argument("--batches", type=int, default=8, help="bench: timed batches per backend")
    sd.add_argument("--device", default=None, help="bench: DALI's device (default cuda if present)")
    sd.add_argument("--jpeg", action="store_true", help="bench: also JPEG frame folders (VALOR's layout)")
    sd.add_argument("--ann", default="train.jsonl,val.jsonl,test.jsonl", help="pack: annotation files, comma list")
    sd.add_argument("--per-shard", type=int, default=256, help="pack: clips per shard")
    sd.add_argument("--video-dir", default="videos", help="pack: video folder under PATH")
    sd.add_argument("--audio-dir", default="audios", help="pack: audio folder under PATH")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="valor-fast", description=__doc__.split("\n")[0], epilog=OVERRIDES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    _train_parsers(sub)
    _model_parsers(sub)
    _data_parser(sub)
    sub.add_parser("info", help="parameter counts and available backends")
    sub.add_parser("bench", help="kernel + training-step benchmarks on this device, one table "
                   "(options: python bench/run_all.py --help; --audit: the kernel audit, python bench/kernel_audit.py --help)").add_argument("bench_args", nargs=argparse.REMAINDER)
    return p


COMMANDS = {"pretrain": cmd_pretrain, "eval": cmd_eval, "data": cmd_data, "info": cmd_info, "finetune": cmd_finetune,
            "caption": cmd_caption, "embed": cmd_embed, "convert": cmd_convert, "bench": cmd_bench,
            "config": cmd_config}


def _user_errors() -> tuple:
    """Errors that are the input's, not a bug: printed as one line, exit code 2.  Imported
    only when an error is being classified (so `--help` loads no torch)."""
    from .config import ConfigError
    from .eval.metrics import NonFiniteScoresError
    from .train.checkpoint import (CheckpointLoadError, CheckpointMismatchError, CheckpointWorldSizeError,
                                   NonFiniteCheckpointError)
    from .train.resume_check import ResumeRefusedError
    from .train.runlock import RunLockedError
    from .train.trainer import RunExistsError
    from .utils.fs import ForeignContentError
    return (ConfigError, UsageError, NonFiniteScoresError, CheckpointLoadError, CheckpointMismatchError,
            CheckpointWorldSizeError, NonFiniteCheckpointError, ResumeRefusedError, RunLockedError, RunExistsError,
            ForeignContentError, FileNotFoundError, ValueError)


def _stops() -> tuple:
    """A training run that stopped for a reason it reported (exit code 1)."""
    from .data.media import BadMediaError
    from .train.trainer import ExportError, NonFiniteError
    return (NonFiniteError, BadMediaError, ExportError)


def _fail(e: BaseException, code: int) -> int:
    if os.environ.get("VALOR_FAST_DEBUG"):
        raise e
    if not getattr(e, "reported", False):
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"valor-fast: error: {msg.strip() or type(e).__name__}", file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    """Run a command; errors of the input print one line (no traceback; VALOR_FAST_DEBUG=1 shows
    it) with the exit codes of the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:   # every later argument belongs to bench/run_all.py
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]), {})
    try:
        rest, over = split_overrides(argv)
        args = build_parser().parse_args(rest)
        return COMMANDS[args.cmd](args, over)
    except KeyboardInterrupt as e:
        if not getattr(e, "reported", False):
            print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        from .train.trainer import Preempted
        if isinstance(e, Preempted):
            return 128 + e.signum   # 143 SIGTERM, 130 Ctrl-C (the trainer printed the checkpoint)
        if isinstance(e, _stops()):
            return _fail(e, 1)
        if isinstance(e, _user_errors()):
            return _fail(e, 2)
        raise


if __name__ == "__main__":
    sys.exit(main())
