"""Benchmark the fused ops against eager PyTorch at VALOR shapes (CUDA only).

    python bench/bench_fused.py                      # all ops, bf16
    python bench/bench_fused.py --ops lm_head --dtype fp16 --chunk 8192

Times are triton.testing.do_bench medians (ms) of the forward and of forward + backward.
Memory-bound ops (add + LayerNorm, bias + GELU) also report effective GB/s over the bytes each
pass must move at minimum (same byte count for both impls, so the numbers compare directly); the
LM head reports TFLOP/s over the model's 2NCV (fwd) / 6NCV (fwd+bwd) flops and the peak memory
allocated during a fwd+bwd.  Every row is appended as one JSON line to bench/results/fused.jsonl
with device, versions, git commit and the command line.
"""
import argparse
import datetime
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
DEFAULT_OUT = os.path.join(_HERE, "results", "fused.jsonl")

# VALOR shapes: rows = 512 captions x 40 text tokens, and 64 clips x 257 ViT tokens x 4 frames;
# LM head: 3 task groups x 512 captions x 24 masked tokens, BERT-base width, BERT vocabulary
DEVICE = "cuda"
ROWS = (512 * 40, 64 * 257 * 4)
LN_WIDTHS = (768, 1024)
FFN_WIDTHS = (3072, 4096)
LM_SHAPE = (3 * 512 * 24, 768, 30522)  # (N, C, V)


def _require_cuda():
    import torch
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_fused.py: TRITON_INTERPRET=1 is set; unset it (interpreter timings mean nothing)")
    if not torch.cuda.is_available():
        sys.exit("bench_fused.py needs a CUDA GPU: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}).  Correctness on CPU is covered by "
                 "tests/kernels/test_{add_layer_norm,bias_gelu,lm_head_ce}.py under TRITON_INTERPRET=1.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_fused.py needs triton (pip install triton)")


# ----------------------------------------------------------------------------------------------
# helpers (environment record and results file: bench/common.py, shared by every bench)
# ----------------------------------------------------------------------------------------------
sys.path.insert(0, _ROOT)
from bench.common import append_result, env_info  # noqa: E402


def bench_ms(fn, grad_to_none=None):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def peak_mem_mb(fn):
    """Peak memory allocated above the baseline during one call of fn."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------------------------
# benches
# ----------------------------------------------------------------------------------------------
def _fwd_bwd(fn, inputs, n_out):
    """A closure running fn(*inputs) and a backward with fixed upstream gradients."""
    import torch
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ups = [torch.randn_like(o) for o in outs[:n_out]]

    def run():
        o = fn(*inputs)
        o = o if isinstance(o, tuple) else (o,)
        torch.autograd.backward(list(o[:n_out]), ups)
    return run


def _check(name, got, ref, atol, rtol):
    import torch
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def bench_add_ln(args, emit):
    import torch
    import valor_fast.kernels.add_layer_norm as k
    dt = args.torch_dtype
    elt = torch.finfo(dt).bits // 8
    for rows in ROWS:
        for width in LN_WIDTHS:
            x = torch.randn(rows, width, device=DEVICE, dtype=dt, requires_grad=True)
            r = torch.randn(rows, width, device=DEVICE, dtype=dt, requires_grad=True)
            w = torch.randn(width, device=DEVICE, dtype=dt, requires_grad=True)
            b = torch.randn(width, device=DEVICE, dtype=dt, requires_grad=True)
            ins = [x, r, w, b]
            impls = {"eager": lambda *a: k.add_layer_norm_ref(*a, 1e-12),
                     "triton": lambda *a: k.add_layer_norm(*a, 1e-12)}
            if args.check:
                _check("add_layer_norm", impls["triton"](*ins), impls["eager"](*ins), 0.05, 0.02)
            shape = {"rows": rows, "width": width}
            for impl, fn in impls.items():
                with torch.no_grad():
                    ms = bench_ms(lambda: fn(*ins))
                # fwd: read x, r; write out, new_residual
                emit("add_layer_norm", impl, "fwd", shape, ms, gbytes=4 * rows * width * elt / 1e9)
                ms = bench_ms(_fwd_bwd(fn, ins, 2), grad_to_none=ins)
                # + bwd: read new_residual, d_out, d_new_residual; write dx (dresidual aliases it)
                emit("add_layer_norm", impl, "fwd+bwd", shape, ms, gbytes=8 * rows * width * elt / 1e9)
            del x, r, w, b, ins
            torch.cuda.empty_cache()


def bench_bias_gelu(args, emit):
    import torch
    import valor_fast.kernels.bias_gelu as k
    dt = args.torch_dtype
    elt = torch.finfo(dt).bits // 8
    for rows in ROWS:
        for width in FFN_WIDTHS:
            for approx in ("none", "quick"):
                x = torch.randn(rows, width, device=DEVICE, dtype=dt, requires_grad=True)
                b = torch.randn(width, device=DEVICE, dtype=dt, requires_grad=True)
                ins = [x, b]
                impls = {"eager": lambda *a: k.bias_gelu_ref(*a, approx),
                         "triton": lambda *a: k.bias_gelu(*a, approx)}
                if args.check:
                    _check("bias_gelu", impls["triton"](*ins), impls["eager"](*ins), 0.05, 0.02)
                shape = {"rows": rows, "width": width, "approximate": approx}
                for impl, fn in impls.items():
                    with torch.no_grad():
                        ms = bench_ms(lambda: fn(*ins))
                    emit("bias_gelu", impl, "fwd", shape, ms, gbytes=2 * rows * width * elt / 1e9)
                    ms = bench_ms(_fwd_bwd(fn, ins, 1), grad_to_none=ins)
                    # fwd (read x, write y) + bwd (read x, dy; write dx)
                    emit("bias_gelu", impl, "fwd+bwd", shape, ms, gbytes=5 * rows * width * elt / 1e9)
                del x, b, ins
                torch.cuda.empty_cache()


def bench_lm_head(args, emit):
    import torch
    import valor_fast.kernels.lm_head_ce as k
    dt = args.torch_dtype
    n, c, v = LM_SHAPE
    h = torch.randn(n, c, device=DEVICE, dtype=dt, requires_grad=True)
    w = (torch.randn(v, c, device=DEVICE, dtype=dt) * 0.02).requires_grad_()
    b = torch.zeros(v, device=DEVICE, dtype=dt, requires_grad=True)
    labels = torch.randint(0, v, (n,), device=DEVICE)
    ins = [h, w, b, labels]
    impls = {
        "eager": lambda *a: k.lm_head_ce_ref(*a, args.label_smoothing),
        "torch_chunked": lambda *a: k.lm_head_cross_entropy(*a, args.label_smoothing, chunk_size=args.chunk,
                                                            use_triton=False),
        "triton": lambda *a: k.lm_head_cross_entropy(*a, args.label_smoothing, chunk_size=args.chunk),
    }
    if args.check:
        _check("lm_head_ce", impls["triton"](*ins), impls["eager"](*ins), 2e-2, 1e-2)
    shape = {"N": n, "C": c, "V": v, "chunk": args.chunk, "label_smoothing": args.label_smoothing}
    flops = 2.0 * n * c * v
    for impl, fn in impls.items():
        with torch.no_grad():
            ms = bench_ms(lambda: fn(*ins))
            mem = peak_mem_mb(lambda: fn(*ins))
        emit("lm_head_ce", impl, "fwd", shape, ms, tflops=flops / ms / 1e9, peak_mem_mb=mem)
        run = _fwd_bwd(fn, ins, 1)
        ms = bench_ms(run, grad_to_none=ins[:3])
        for t in ins[:3]:
            t.grad = None
        mem = peak_mem_mb(run)
        emit("lm_head_ce", impl, "fwd+bwd", shape, ms, tflops=3 * flops / ms / 1e9, peak_mem_mb=mem)


BENCHES = {"add_ln": bench_add_ln, "bias_gelu": bench_bias_gelu, "lm_head": bench_lm_head}


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="add_ln,bias_gelu,lm_head", help="comma list of " + ",".join(BENCHES))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--chunk", type=int, default=4096, help="LM head vocabulary chunk (columns)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the triton-vs-eager check")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.op_list = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.op_list if o not in BENCHES]
    if bad:
        p.error(f"unknown --ops {bad}; choose from {list(BENCHES)}")
    return args


def main(argv=None):
    args = _parse(argv)
    ops = args.op_list
    _require_cuda()

    import torch
    sys.path.insert(0, _ROOT)
    args.torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    info = env_info()
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def emit(op, impl, mode, shape, ms, gbytes=None, tflops=None, peak_mem_mb=None):
        row = {"bench": "fused", "op": op, "impl": impl, "mode": mode, "shape": shape,
               "dtype": args.dtype, "ms_median": ms, "timestamp": stamp, "command": command, **info}
        if gbytes is not None:
            row["gbytes"] = gbytes
            row["gbps"] = gbytes / (ms / 1e3)
        if tflops is not None:
            row["tflops"] = tflops
        if peak_mem_mb is not None:
            row["peak_mem_mb"] = peak_mem_mb
        append_result(args.out, row)
        extra = "".join([f"  {row['gbps']:8.1f} GB/s" if gbytes is not None else "",
                         f"  {tflops:6.1f} TFLOP/s" if tflops is not None else "",
                         f"  {peak_mem_mb:9.1f} MB peak" if peak_mem_mb is not None else ""])
        print(f"{op:15s} {impl:14s} {mode:8s} {json.dumps(shape):70s} {ms:8.3f} ms{extra}", flush=True)

    print(f"# {info['device']}  torch {info['torch']}  triton {info['triton']}  commit {info['git_commit']}")
    for op in ops:
        BENCHES[op](args, emit)
    print(f"# appended to {args.out}")


if __name__ == "__main__":
    main()
