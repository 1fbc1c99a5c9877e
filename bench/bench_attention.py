"""Benchmark every available attention backend at VALOR's shapes (CUDA only).

    python bench/bench_attention.py                          # all shapes, bf16, ~64k query tokens
    python bench/bench_attention.py --shapes vit_b16 bert_causal --backends triton sdpa --tokens 32768

For each shape and backend: `triton.testing.do_bench` medians (ms) of the forward (under no_grad)
and of forward + backward, TFLOP/s over the attention matmul flops (forward 4*B*H*Lq*Lk*Dh, halved
for causal; forward + backward 3.5x that: the backward does five matmuls to the forward's two;
padded keys are counted, as every kernel here still visits them), and, on a slice of the batch,
the max error of the output and dq/dk/dv against the fp32 math reference.  The row of the backend
`valor_fast.ops.attention` picks automatically is marked `auto_choice`.  Every row is appended as
one JSON line to bench/results/attention.jsonl with device, versions, git commit and command line.
"""
import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
DEFAULT_OUT = os.path.join(_HERE, "results", "attention.jsonl")
DEVICE = "cuda"   # bench/gpu_suite.py dry-kernels builds the inputs on the CPU

# name: (Lq, Lk, H, Dh, causal, key padding).  ViT / AST: one frame or clip per sequence, no
# padding; BERT text: 40 tokens, padded captions; decoder: causal self-attention over the caption,
# cross-attention over cat(video, audio) tokens of one (325) or two (643) frame groups, padded.
SHAPES = {
    "vit_b16": (197, 197, 12, 64, False, False),
    "vit_l14": (257, 257, 16, 64, False, False),
    "ast": (129, 129, 12, 64, False, False),
    "bert_text": (40, 40, 12, 64, False, True),
    "bert_causal": (40, 40, 12, 64, True, True),
    "cross_325": (40, 325, 12, 64, False, True),
    "cross_643": (40, 643, 12, 64, False, True),
    # Video Swin-B windows at 4 frames x 224 px: window (4, 7, 7) = 196 tokens, head dim 32, with
    # the additive bias (relative position + shift mask) shared by window index: stage 1 has
    # 8 x 8 = 64 windows a clip at 4 heads, stage 3 2 x 2 = 4 windows at 16 heads
    "swin_s1": (196, 196, 4, 32, False, False),
    "swin_s3": (196, 196, 16, 32, False, False),
}
# shapes run with a learnable (nB, H, L, L) bias, batch item b using slice b % nB
BIAS_WINDOWS = {"swin_s1": 64, "swin_s3": 4}


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE",
                   help="shapes to run (default: all): " + ", ".join(SHAPES))
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="backends to run (default: every one available): flash_attn xformers sdpa triton math")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--tokens", type=int, default=65536,
                   help="query tokens per call, B*Lq (default 65536: fills an H100 at these shapes)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    p.add_argument("--check-batch", type=int, default=4, help="batch slice for the accuracy check (0: skip)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON-lines results file (appended)")
    return p.parse_args(argv)


def _require_cuda():
    """Exit 2 with a clear message where timings would mean nothing."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench_attention.py: TRITON_INTERPRET=1 is set; unset it (interpreter timings mean nothing)",
              file=sys.stderr)
        sys.exit(2)
    import torch
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}).  Correctness on the CPU is covered by "
              "tests/kernels/test_flash_attention.py under TRITON_INTERPRET=1.", file=sys.stderr)
        sys.exit(2)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_attention.py needs triton (pip install triton)", file=sys.stderr)
        sys.exit(2)


def _inputs(B, Lq, Lk, H, D, pad, dtype, seed=0):
    import torch
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, H, Lq, D, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(B, H, Lk, D, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(B, H, Lk, D, device=DEVICE, dtype=dtype, generator=g)
    kpm = None
    if pad:  # right padding, valid lengths uniform in [Lk/2, Lk]: captions / short clips
        lens = torch.randint(Lk // 2, Lk + 1, (B,), device=DEVICE, generator=g)
        kpm = torch.arange(Lk, device=DEVICE)[None, :] < lens[:, None]
    return q, k, v, kpm


def _accuracy(A, backend, q, k, v, kpm, causal, n, bias=None):
    """Max |err| of out, dq, dk, dv (and dbias) on the first n batch entries (a multiple of the
    bias's window count) vs the fp32 math reference."""
    import torch
    from valor_fast.kernels.flash_attention import attention_ref
    q, k, v = (t[:n].detach().clone().requires_grad_() for t in (q, k, v))
    m = None if kpm is None else kpm[:n]
    b16 = None if bias is None else bias.detach().clone().requires_grad_()
    do = torch.randn_like(q)
    with A.use_backend(backend):
        out = A.attention(q, k, v, m, causal, bias=b16)
    out.backward(do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    b32 = None if bias is None else bias.detach().float().requires_grad_()
    ref = attention_ref(q32, k32, v32, m, causal, bias=b32)
    ref.backward(do.float())
    errs = {"out": (out.float() - ref).abs().max().item()}
    pairs = [("dq", q, q32), ("dk", k, k32), ("dv", v, v32)] + ([("dbias", b16, b32)] if bias is not None else [])
    for name, a, b in pairs:
        errs[name] = (a.grad.float() - b.grad).abs().max().item()
    return errs


def main(argv=None):
    args = _parse(argv)
    _require_cuda()
    import importlib

    import torch
    sys.path.insert(0, _ROOT)
    from bench.common import append_result, do_bench, env_info
    A = importlib.import_module("valor_fast.ops.attention")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    backends = args.backends or [b for b in A.BACKENDS if A.available_backends()[b][0]]
    for b in backends:
        if b not in A.BACKENDS:
            sys.exit(f"bench_attention.py: unknown backend {b!r}; choose from {A.BACKENDS}")
    env = env_info()
    print(f"# {env.get('device')}  torch {env['torch']}  triton {env.get('triton')}  commit {env.get('git_commit')}")
    print(f"{'shape':<12} {'B':>5} {'backend':<10} {'fwd ms':>8} {'TF/s':>6} {'f+b ms':>8} {'TF/s':>6}  err(out/dq)")
    env_var = os.environ.pop("VALOR_FAST_ATTN", None)  # the auto choice is what we mark
    try:
        for name in args.shapes:
            Lq, Lk, H, D, causal, pad = SHAPES[name]
            nb = BIAS_WINDOWS.get(name)
            B = max(1, args.tokens // Lq)
            bias = None
            if nb:
                B = max(nb, B // nb * nb)   # whole clips: every window index once a clip
                bias = torch.randn(nb, H, Lq, Lk, device="cuda", dtype=dtype, requires_grad=True)
            q, k, v, kpm = _inputs(B, Lq, Lk, H, D, pad, dtype)
            auto = A.choose_backend(q, kpm, causal, bias=bias)
            flops_fwd = 4.0 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)
            for b in backends:
                row = dict(env, bench="attention", shape=name, B=B, Lq=Lq, Lk=Lk, H=H, Dh=D, causal=causal,
                           key_padding=pad, bias_windows=nb, dtype=args.dtype, backend=b, auto_choice=(b == auto),
                           flops_fwd=flops_fwd, flops_fwd_bwd=3.5 * flops_fwd)
                why = A.unsupported_reason(b, q, kpm, causal, bias=bias)
                if why is not None:
                    row["skipped"] = why
                    append_result(args.out, row)
                    print(f"{name:<12} {B:>5} {b:<10} skipped: {why}")
                    continue
                try:
                    with A.use_backend(b):
                        if "fwd" in args.modes:
                            with torch.no_grad():
                                ms = do_bench(lambda: A.attention(q, k, v, kpm, causal, bias=bias), args.warmup, args.rep)
                            row.update(fwd_ms=ms, fwd_tflops=flops_fwd / ms * 1e-9)
                        if "fwd_bwd" in args.modes:
                            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                            do = torch.randn_like(q)

                            def step():
                                A.attention(qg, kg, vg, kpm, causal, bias=bias).backward(do)
                            ms = do_bench(step, args.warmup, args.rep,
                                          grad_to_none=[qg, kg, vg] + ([bias] if bias is not None else []))
                            row.update(fwd_bwd_ms=ms, fwd_bwd_tflops=3.5 * flops_fwd / ms * 1e-9)
                            del qg, kg, vg, do
                    if args.check_batch > 0:
                        n = min(B, args.check_batch) if nb is None else nb
                        row["max_err_vs_fp32"] = _accuracy(A, b, q, k, v, kpm, causal, n, bias)
                except Exception as e:  # noqa: BLE001 - record an OOM / kernel failure and go on
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    torch.cuda.empty_cache()
                append_result(args.out, row)
                err = row.get("max_err_vs_fp32", {})
                mark = "*" if b == auto else " "
                print(f"{name:<12} {B:>5} {b:<9}{mark} {row.get('fwd_ms', float('nan')):>8.3f} "
                      f"{row.get('fwd_tflops', float('nan')):>6.1f} {row.get('fwd_bwd_ms', float('nan')):>8.3f} "
                      f"{row.get('fwd_bwd_tflops', float('nan')):>6.1f}  "
                      f"{err.get('out', float('nan')):.2e}/{err.get('dq', float('nan')):.2e}"
                      + (f"  ERROR {row['error']}" if "error" in row else ""))
            del q, k, v, kpm, bias
            torch.cuda.empty_cache()
    finally:
        if env_var is not None:
            os.environ["VALOR_FAST_ATTN"] = env_var
    print(f"# * = the dispatcher's automatic choice; rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
