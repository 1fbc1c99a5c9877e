"""Benchmark the contrastive (MGA) losses: each backend vs the eager reference (CUDA only).

    python bench/bench_contrastive.py                          # everything, bf16
    python bench/bench_contrastive.py --cases coarse --batches 1024,4096 --backends triton,torch

coarse: symmetric InfoNCE, B in {1k, 4k, 16k, 64k} x D=512.
fine:   T-V, T-A, T-AV grouped loss at global batch 512 and 4096, T=40 text tokens, 4 frame
        tokens + 1 audio token per clip, D=512 (the three groups from one call).
Backends: triton (valor_fast.kernels.contrastive), cuda (csrc/, when built), torch (= the eager
reference in valor_fast.kernels.contrastive, which materialises B x B, and for fine B x B x T x M).
Per row: forward and forward+backward medians (triton.testing.do_bench, ms), peak memory allocated
above the inputs during one fwd+bwd (MB), and a correctness check against the reference at a small
batch.  An eager OOM is caught and recorded as status "oom".  Rows are appended as JSON lines to
bench/results/contrastive.jsonl with device, versions, git commit and the command line.
"""
import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)

from bench.common import append_result, do_bench, env_info  # noqa: E402

DEFAULT_OUT = os.path.join(_HERE, "results", "contrastive.jsonl")
COARSE_B = (1024, 4096, 16384, 65536)
FINE_B = (512, 4096)
D, T, MV, MA = 512, 40, 4, 1
DEVICE = "cuda"   # bench/gpu_suite.py dry-kernels builds the inputs on the CPU


def _require_cuda():
    import torch
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_contrastive.py: TRITON_INTERPRET=1 is set; unset it (interpreter timings mean nothing)")
    if not torch.cuda.is_available():
        sys.exit("bench_contrastive.py needs a CUDA GPU: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}).  Correctness on CPU is covered by tests/kernels/test_contrastive.py "
                 "under TRITON_INTERPRET=1.")


def _peak_mb(fn):
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _coarse_inputs(B, dtype, seed=0):
    import torch
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    t = torch.randn(B, D, device=DEVICE, generator=g)
    m = torch.randn(B, D, device=DEVICE, generator=g)
    t = (t / t.norm(dim=-1, keepdim=True)).to(dtype).requires_grad_()
    m = (m / m.norm(dim=-1, keepdim=True)).to(dtype).requires_grad_()
    tau = torch.tensor(0.07, device=DEVICE, requires_grad=True)
    return t, m, tau


def _fine_inputs(B, dtype, seed=0):
    import torch
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    norm = lambda x: (x / x.norm(dim=-1, keepdim=True)).to(dtype).requires_grad_()  # noqa: E731
    lengths = torch.randint(8, T + 1, (B,), device=DEVICE, generator=g)
    tm = torch.arange(T, device=DEVICE)[None] < lengths[:, None]  # (B, T) captions of 8..40 tokens
    return dict(text=norm(r(B, T, D)), tw=r(B, T).requires_grad_(), tm=tm,
                v=norm(r(B, MV, D)), wv=r(B, MV).requires_grad_(),
                a=norm(r(B, MA, D)), wa=r(B, MA).requires_grad_(),
                tau=torch.tensor(0.07, device=DEVICE, requires_grad=True))


def _coarse_fn(backend):
    import valor_fast.kernels.contrastive as K
    from valor_fast.ops import contrastive as C

    def f(t, m, tau):
        if backend == "torch":
            return K.contrastive_loss_ref(t, m, tau, mode="coarse")
        with C.use_backend(backend):
            return C.contrastive_loss(t, m, tau, mode="coarse")
    return f


def _fine_fn(backend):
    import valor_fast.kernels.contrastive as K
    from valor_fast.ops import contrastive as C

    def f(x):
        groups = {"v": (x["v"], x["wv"], None), "a": (x["a"], x["wa"], None), "av": ("v", "a")}
        kw = dict(mode="fine", text_weight=x["tw"], text_mask=x["tm"])
        if backend == "torch":
            res = K.grouped_contrastive_loss_ref(x["text"], groups, x["tau"], **kw)
        else:
            with C.use_backend(backend):
                res = C.grouped_contrastive_loss(x["text"], groups, x["tau"], **kw)
        return res["v"] + res["a"] + res["av"]
    return f


def _measure(loss_fn, grads):
    import torch

    def fwd():
        with torch.no_grad():
            loss_fn()

    def fwd_bwd():
        loss_fn().backward()

    out = {}
    try:
        out["ms_fwd"] = do_bench(fwd)
        out["ms_fwd_bwd"] = do_bench(fwd_bwd, grad_to_none=grads)
        out["peak_mem_mb"] = round(_peak_mb(fwd_bwd), 1)
        out["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        out["status"] = "oom"
    except RuntimeError as e:  # a kernel that cannot launch is recorded, not fatal
        out["status"] = "error: " + str(e).splitlines()[0][:200]
    finally:
        for g in grads:
            g.grad = None
        torch.cuda.empty_cache()
    return out


def _check(case, backend, dtype):
    """Max |loss - eager loss| and max relative grad error at a small batch (not a test; a guard
    against timing something wrong)."""
    if case == "coarse":
        ins = _coarse_inputs(256, dtype, seed=1)
        run = lambda be: _coarse_fn(be)(*ins)  # noqa: E731
        leaves = list(ins)
    else:
        ins = _fine_inputs(64, dtype, seed=1)
        run = lambda be: _fine_fn(be)(ins)  # noqa: E731
        leaves = [v for v in ins.values() if v.requires_grad]
    outs = {}
    for be in (backend, "torch"):
        for x in leaves:
            x.grad = None
        loss = run(be)
        loss.backward()
        outs[be] = (loss.detach().float(), [x.grad.float().clone() for x in leaves])
    l_err = float((outs[backend][0] - outs["torch"][0]).abs())
    g_err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                for a, b in zip(outs[backend][1], outs["torch"][1]))
    return {"check_loss_abs_err": l_err, "check_grad_rel_err": g_err}


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="coarse,fine")
    p.add_argument("--backends", default="triton,cuda,torch")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--batches", default=None, help="comma list overriding the batch sizes")
    p.add_argument("--out", default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    _require_cuda()
    import torch
    from valor_fast.ops import _cuda
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    backends = [b for b in args.backends.split(",") if b]
    if "cuda" in backends and not _cuda.available():
        print(f"[bench] skipping cuda backend: {_cuda.why_unavailable()}", file=sys.stderr)
        backends.remove("cuda")
    env = env_info()
    for case in args.cases.split(","):
        sizes = [int(b) for b in args.batches.split(",")] if args.batches else (COARSE_B if case == "coarse" else FINE_B)
        checks = {be: _check(case, be, dtype) for be in backends if be != "torch"}
        for B in sizes:
            for be in backends:
                if case == "coarse":
                    ins = _coarse_inputs(B, dtype)
                    fn = _coarse_fn(be)
                    res = _measure(lambda: fn(*ins), list(ins))
                    shape = {"B": B, "D": D}
                else:
                    ins = _fine_inputs(B, dtype)
                    fn = _fine_fn(be)
                    res = _measure(lambda: fn(ins), [v for v in ins.values() if v.requires_grad])
                    shape = {"B": B, "D": D, "T": T, "M_v": MV, "M_a": MA, "groups": "v,a,av"}
                del ins
                row = {"bench": "contrastive", "case": case, "backend": be, "dtype": args.dtype, **shape, **res,
                       **checks.get(be, {}), **env}
                append_result(args.out, row)
                print(f"{case:6s} B={B:6d} {be:6s} {res.get('status'):6s} fwd {res.get('ms_fwd', float('nan')):9.3f} ms"
                      f"  fwd+bwd {res.get('ms_fwd_bwd', float('nan')):9.3f} ms  peak {res.get('peak_mem_mb', float('nan')):10.1f} MB")
    print(f"[bench] rows appended to {args.out}")


if __name__ == "__main__":
    main()
