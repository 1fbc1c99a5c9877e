"""Video Swin forward + backward throughput, ours vs eager (VALOR-B's vision encoder).

    python bench/bench_swin.py                                # CUDA: Swin-B, 4 frames x 224 px, bf16
    python bench/bench_swin.py --batch 16 --frames 8
    python bench/bench_swin.py --device cpu --size tiny --image 64 --batch 2 --dtype fp32   # smoke run

Same weights, same clips, for two implementations:
  eager  window attention as explicit matmuls (the `math` attention backend: q k^T, + the
         (nW, H, N, N) bias, softmax, @ v, as upstream Video Swin runs it) and unfused bias+GELU /
         LayerNorm (fused backend "eager");
  ours   the engine's choice for the device: attention on "auto" (on CUDA with bf16 / fp16 and a
         bias: our Triton flash kernel, bias tiles loaded next to the scores), fused ops on "auto".
For each: clips/s of a forward + backward step (loss = mean of the output tokens), the share of
that step spent in window attention (the same step re-timed with attention replaced by a cheap
stand-in of the same shapes: ours_step - stand_in_step), peak memory, and the max difference of
the outputs between the two.  Rows are appended as JSON lines to bench/results/swin.jsonl with the
device, versions, git commit and command line (not written when --out is '').

Needs a GPU for meaningful numbers; on the CPU it runs as a smoke test (--device cpu), with SDPA as
"ours" (the Triton interpreter is for tests only).
"""
import argparse
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
DEFAULT_OUT = os.path.join(_HERE, "results", "swin.jsonl")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size", default="B", help="Swin size from valor_fast.model.swin.SWIN_SIZES (default B)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=8, help="clips a step")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (fp32: no autocast)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=10, help="timed steps an implementation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", nargs="+", default=["eager", "ours"], choices=["eager", "ours"])
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON-lines results file (appended; '' = none)")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_swin.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run with --device cpu --size tiny for a smoke test", file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, _ROOT)
    import importlib

    from bench.common import append_result, env_info, time_ms
    from valor_fast.model.swin import VideoSwin, swin_arch
    from valor_fast.ops import fused as fused_ops
    from valor_fast.model.flops import swin_flops
    A = importlib.import_module("valor_fast.ops.attention")

    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    model = VideoSwin(**swin_arch(args.size, 0.0)).to(dev)  # drop-path off: both impls run the same math
    video = torch.randn(args.batch, args.frames, 3, args.image, args.image, device=dev)
    fwd_flops = swin_flops(args.size, args.frames, args.image)[0] * args.batch
    impl_cfg = {"eager": ("math", "eager"), "ours": (None if dev.type == "cuda" else "sdpa", None)}

    def step(stand_in: bool = False):
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            if stand_in:  # attention replaced by a same-shape elementwise op: the rest of the step
                A_mod = sys.modules["valor_fast.ops"]
                prev = A_mod.attention
                A_mod.attention = lambda q, k, v, **kw: q * 1.0 + v * 0.0 + k.sum() * 0.0
                try:
                    out = model(video)
                finally:
                    A_mod.attention = prev
            else:
                out = model(video)
        out.float().mean().backward()
        return out

    env = env_info()
    outs = {}
    for impl in args.impls:
        attn_backend, fused_backend = impl_cfg[impl]
        with A.use_backend(attn_backend), fused_ops.use_backend(fused_backend):
            chosen = A.choose_backend(torch.empty(1, 1, 1, 32, device=dev, dtype=dtype if dev.type == "cuda"
                                                  else torch.float32), bias=torch.empty(1, 1, 1, device=dev))
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = statistics.median(time_ms(step, dev, args.warmup, args.steps))
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
            rest = statistics.median(time_ms(lambda: step(stand_in=True), dev, 1, max(3, args.steps // 2)))
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                outs[impl] = model(video).float()
        row = dict(env, bench="swin", impl=impl, attention_backend=chosen, size=args.size, frames=args.frames,
                   image=args.image, batch=args.batch, dtype=args.dtype, step_ms=ms,
                   clips_per_s=args.batch / (ms / 1e3), attention_share=max(0.0, (ms - rest) / ms),
                   tflops=3 * fwd_flops / (ms * 1e-3) / 1e12, peak_mem_gb=mem)
        if args.out:
            append_result(args.out, row)
        print(f"{impl:<6} attn={chosen:<7} {args.size} {args.frames}x{args.image} batch {args.batch} {args.dtype}: "
              f"{ms:8.1f} ms/step  {row['clips_per_s']:7.1f} clips/s  {row['tflops']:6.1f} TFLOP/s  "
              f"attention {100 * row['attention_share']:4.1f}% of the step"
              + (f"  peak {mem:.1f} GiB" if mem is not None else ""))
    if len(outs) == 2:
        print(f"max |ours - eager| over the output tokens: {(outs['ours'] - outs['eager']).abs().max().item():.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
