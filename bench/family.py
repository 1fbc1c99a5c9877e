"""The family on the embedded default: VALOR tiny, CoAVT tiny and VLSA tiny pretrained on the same
synthetic set, one row a (model, seed) appended to bench/results/family.jsonl.

    python bench/family.py --seeds 0 1                      # all three models, seeds 0 and 1
    python bench/family.py --models coavt --seeds 0 --set train.steps=20   # a quick look
    python bench/family.py --models vlsa --seeds 0 --no-save --out-dir /tmp/fam

Each run goes through the real Trainer (`valor_fast.train.trainer.Trainer`) with the model's
recipe (the shipped recipes tiny, coavt_tiny, vlsa_tiny in valor_fast/recipes/) and
`train.seed` = the seed.  Before the first step the Trainer's freshly initialised model is
evaluated on the test split (`untrained`: the same evaluation, so every metric has its chance
level measured beside it), then `fit()` trains, exports and evaluates again (`trained`).

A row: model, seed, recipe, steps, batch, git commit (+ dirty flag), device, versions, command;
train_s (wall seconds of fit: the steps, checkpoint export and the final evaluation), eval_s (of
that final evaluation), steps_per_s (steps over train_s - eval_s); every retrieval metric the
model reports (VALOR: t2v/t2a/t2av and reverses; CoAVT: t2av/t2v/t2a and reverses, re-ranked
t2av/av2t; VLSA: t2v/t2a/v2a and reverses: R@1, R@5, R@10, MdR), captioning (BLEU-4, METEOR,
ROUGE-L, CIDEr) where the model captions, both for `untrained` and `trained`; the first and
last logged value of every loss term; and the load the run saw (os.getloadavg before and after,
and a 512 x 512 fp32 matmul throughput probe before and after on this process's threads: on a
shared machine, times compare only at a similar probe).
"""
import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.common import append_result, env_info  # noqa: E402

RECIPES = {"valor": os.path.join(_ROOT, "valor_fast", "recipes", "tiny.yaml"),
           "coavt": os.path.join(_ROOT, "valor_fast", "recipes", "coavt_tiny.yaml"),
           "vlsa": os.path.join(_ROOT, "valor_fast", "recipes", "vlsa_tiny.yaml")}
RESULTS = os.path.join(_HERE, "results", "family.jsonl")
# metric prefixes kept in a row (eval/seconds etc. are recorded apart)
KEEP = ("retrieval/", "retrieval_rerank/", "caption/")


def matmul_probe(n: int = 512, reps: int = 10) -> float:
    """GFLOP/s of an n x n fp32 matmul on this process's threads: a load indicator."""
    import torch
    a = torch.randn(n, n)
    a @ a
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    return round(reps * 2 * n ** 3 / (time.perf_counter() - t) / 1e9, 2)


def _metrics(m: dict) -> dict:
    return {k: round(float(v), 4) for k, v in m.items() if k.startswith(KEEP) and k != "caption/n_clips"}


def _loss_ends(run_dir: str) -> dict:
    """{key: [first, last]} of every logged loss term of the run's history."""
    with open(os.path.join(run_dir, "history.json")) as f:
        hist = [h for h in json.load(f) if "loss" in h]
    if not hist:
        return {}
    keys = [k for k in hist[0] if k not in ("step", "grad_norm")]
    return {k: [round(hist[0][k], 4), round(hist[-1][k], 4)] for k in keys}


def run_one(model: str, seed: int, out_dir: str, sets: dict) -> dict:
    """Train `model` with `seed`; the row (without the environment fields)."""
    from valor_fast import tasks  # noqa: F401  (registers the tasks train.task names)
    from valor_fast.config import load_config
    from valor_fast.train.dist import init_distributed, shutdown
    from valor_fast.train.trainer import Trainer
    over = {"train.seed": str(seed), "train.out_dir": out_dir, "train.run_name": f"{model}_seed{seed}",
            "train.tensorboard": "false", **sets}
    cfg = load_config(RECIPES[model], over)
    probe0, load0 = matmul_probe(), os.getloadavg()
    info = init_distributed(cfg.train.device, cfg.train.hsdp_replicas)
    try:
        tr = Trainer(cfg, info)
        untrained = tr.evaluate("test")            # step 0: the freshly initialised model
        t0 = time.time()
        trained = tr.fit()
        train_s = time.time() - t0
        run_dir = tr.run_dir
    finally:
        shutdown()
    eval_s = float(trained.get("eval/seconds", 0.0))
    return {"model": model, "seed": seed, "recipe": os.path.relpath(RECIPES[model], _ROOT),
            "overrides": sets, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "steps_per_s": round(cfg.train.steps / max(train_s - eval_s, 1e-9), 4),
            "untrained": _metrics(untrained), "trained": _metrics(trained), "losses": _loss_ends(run_dir),
            "load": {"loadavg_before": [round(x, 2) for x in load0], "loadavg_after":
                     [round(x, 2) for x in os.getloadavg()], "matmul_gflops_before": probe0,
                     "matmul_gflops_after": matmul_probe()},
            "run_dir": run_dir}


def summary(row: dict) -> str:
    u, t = row["untrained"], row["trained"]
    keys = [k for k in t if k.endswith("/R@1") or k == "caption/CIDEr"]
    parts = [f"{k.split('/', 1)[1] if k.startswith('retrieval/') else k} {u.get(k, float('nan')):.3f}->{t[k]:.3f}"
             for k in keys]
    return f"{row['model']} seed {row['seed']}: {row['train_s']:.0f} s ({row['steps_per_s']:.3f} steps/s)  " + "  ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out-dir", default=os.path.join(_ROOT, "runs", "bench_family"),
                   help="run folders (one a model and seed; an existing one is refused, as by the Trainer)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (e.g. train.steps=20, train.threads=1)")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--no-save", action="store_true", help="print the rows, append nothing")
    args = p.parse_args(argv)
    sets = {}
    for s in args.set:
        if "=" not in s:
            p.error(f"--set {s!r}: expected KEY=VALUE")
        k, v = s.split("=", 1)
        sets[k] = v
    env = env_info()
    for seed in args.seeds:
        for model in args.models:
            row = {**env, **run_one(model, seed, args.out_dir, sets)}
            print(summary(row), flush=True)
            if not args.no_save:
                append_result(args.results, row)
    if not args.no_save:
        print(f"rows appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
