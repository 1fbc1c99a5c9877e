"""The CPU costs of the embedded default's step that valor-fast chooses (pytest-benchmark; not part
of the default `tests` run), at the tiny recipe's shapes.

    python -m pytest bench/bench_cpu_step.py --benchmark-enable -q
    python bench/bench_cpu_step.py [--out bench/results/cpu_step.jsonl]   # rows with median ms

- The LM head + cross-entropy of MGC: N = 950 masked tokens a step (three groups of 32 captions,
  what a tiny step gathers), C = 128, V = 30522, fp32, forward + backward: our chunked torch path
  (the CPU default) against eager PyTorch (the full (N, V) logits and F.cross_entropy).
- AdamW over the tiny model's 5.6M parameters: torch's fused CPU kernel (our CPU default) against
  foreach.
"""
import argparse
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import valor_fast.kernels.lm_head_ce as lm  # noqa: E402
from bench.common import append_result, env_info, time_ms  # noqa: E402

N, C, V = 950, 128, 30522
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_step.jsonl")


def _lm_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g).requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.05).requires_grad_()
    b = torch.zeros(V).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, b, y


def lm_head_step(impl: str):
    h, w, b, y = _lm_inputs()
    if impl == "chunked_torch":
        def fn():
            lm.lm_head_cross_entropy(h, w, b, y, 0.0, "mean", -100, lm.DEFAULT_CHUNK, use_triton=False).backward()
    elif impl == "eager":
        def fn():
            lm.lm_head_ce_ref(h, w, b, y).backward()
    else:
        raise ValueError(impl)
    return fn


def adamw_step(fused: bool):
    from valor_fast.config import load_config
    from valor_fast.model.valor import build_model
    from valor_fast.train.optim import build_optimizer
    cfg = load_config("tiny", {})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"), fused=fused)
    return opt.step


CASES = {"lm_head_ce fwd+bwd chunked_torch": lambda: lm_head_step("chunked_torch"),
         "lm_head_ce fwd+bwd eager": lambda: lm_head_step("eager"),
         "adamw fused": lambda: adamw_step(True),
         "adamw foreach": lambda: adamw_step(False)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_step_part(benchmark, case):
    benchmark(CASES[case]())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args(argv)
    env = env_info()
    for name, make in CASES.items():
        ms = time_ms(make(), "cpu", warmup=3, iters=args.iters)
        row = dict(env, bench="cpu_step", case=name, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                   shape=dict(N=N, C=C, V=V) if name.startswith("lm_head") else "tiny model",
                   median_ms=round(statistics.median(ms), 2), raw_ms=[round(x, 2) for x in ms],
                   loadavg=list(os.getloadavg()))
        append_result(args.out, row)
        print(f"{name:36s} {row['median_ms']:9.2f} ms (median of {len(ms)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
