"""Every benchmark on the current device, one table (`valor-fast bench` runs this).

    python bench/run_all.py                         # CUDA: kernels + base train step
    python bench/run_all.py --quick                 # smaller kernel shapes, fewer steps
    python bench/run_all.py --only step --size tiny --batch 4   # the step benchmark alone (CPU too)
    python bench/run_all.py --quick --dry-run                  # CPU: each script a CUDA run calls, --help

1. The device's ceilings are measured first, in the same process and run as everything else:
   dense bf16 matmul TFLOP/s and copy bandwidth GB/s (bench/common.measure_peaks).
2. Each benchmark script runs as a subprocess writing to a scratch results file: the kernels
   (bench_contrastive.py, bench_attention.py, bench_fused.py; CUDA only), caption decoding with and
   without the KV cache (bench_caption.py; CUDA only) and the training step (train_step.py, eager
   vs fast).
3. Every row gets `peak_share` (its TFLOP/s over the measured matmul peak, or its GB/s over the
   measured copy bandwidth) and the run id, is appended to its bench/results/<name>.jsonl, and
   one table is printed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)

from bench.common import append_result, env_info, measure_peaks  # noqa: E402

RESULTS = os.path.join(_HERE, "results")
KERNELS = ("contrastive", "attention", "fused")
# what --quick passes each kernel benchmark (bench/gpu_suite.py dry-kernels parses these too)
QUICK_ARGS = {"contrastive": ["--batches", "1024,4096"], "attention": ["--tokens", "16384"], "fused": []}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="all", choices=("all", "kernels", "step"))
    p.add_argument("--size", default="base", help="model size of the step benchmark")
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch of the step benchmark")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--find-max-batch", action="store_true")
    p.add_argument("--compile", action="store_true", help="step benchmark: fast impl compiled per block")
    p.add_argument("--quick", action="store_true", help="smaller kernel shapes, fewer steps")
    p.add_argument("--results", default=RESULTS, help="folder of the results files")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU check (bench/gpu_suite.sh --dry-run): list the commands a CUDA run makes and run each "
                        "with --help (imports and parser); nothing is timed or written")
    return p.parse_args(argv)


def dry_run(args) -> int:
    """Every command a CUDA run would make, each started with --help: the script imports and its
    parser builds (the arguments themselves are parsed by bench/gpu_suite.py dry-kernels)."""
    bad = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, cmd in _commands(args, True, scratch):
            r = subprocess.run(cmd[:2] + ["--help"], cwd=_ROOT, capture_output=True, text=True)
            print(f"dry-run {name}: {' '.join(cmd[1:])} -> --help exit {r.returncode}", flush=True)
            if r.returncode != 0:
                bad.append(name)
                print(r.stdout[-2000:] + r.stderr[-2000:], file=sys.stderr)
    if bad:
        print("bench --dry-run: failed: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad else 0


def _commands(args, cuda: bool, scratch: str):
    py = sys.executable
    cmds = []
    if args.only in ("all", "kernels"):
        if not cuda:
            print("bench: kernel benchmarks need a CUDA GPU; skipped (their correctness is tested on the CPU "
                  "under TRITON_INTERPRET=1)")
        else:
            for k in KERNELS:
                cmds.append((k, [py, os.path.join(_HERE, f"bench_{k}.py"), "--out", os.path.join(scratch, f"{k}.jsonl")]
                             + (QUICK_ARGS[k] if args.quick else [])))
            cmds.append(("caption", [py, os.path.join(_HERE, "bench_caption.py"), "--size", args.size,
                                     "--out", os.path.join(scratch, "caption.jsonl")]
                         + (["--clips", "16"] if args.quick else [])))
    if args.only in ("all", "step"):
        steps = 3 if args.quick else args.steps
        cmd = [py, os.path.join(_HERE, "train_step.py"), "--size", args.size, "--batch", str(args.batch),
               "--steps", str(steps), "--out", os.path.join(scratch, "train_step.jsonl")]
        if args.find_max_batch:
            cmd.append("--find-max-batch")
        if args.compile:
            cmd.append("--compile")
        if not cuda:
            cmd += ["--device", "cpu"]
        cmds.append(("train_step", cmd))
    return cmds


def summarize(name: str, row: dict, peaks: dict) -> dict:
    """One table line of a results row: what was measured, its time, its rate, its peak share."""
    if name == "train_step":
        what = f"step {row['size']} B={row['batch']} {row['impl']}" + (" +compile" if row.get("compile") else "")
        return {"what": what, "ms": row["step_ms_median"], "rate": row["model_tflops"], "unit": "TFLOP/s",
                "extra": f"{row['samples_per_s']:.1f} samples/s"}
    if name == "caption":
        return {"what": f"caption {row['size']} beam {row['beam']} kv_cache={row['kv_cache']}", "ms": row["ms"],
                "rate": None, "unit": "", "extra": f"{row['tokens_per_s']:.0f} tokens/s"}
    if name == "attention":
        what = f"attn {row.get('shape')} {row.get('backend')} fwd+bwd"
        return {"what": what, "ms": row.get("fwd_bwd_ms"), "rate": row.get("fwd_bwd_tflops"), "unit": "TFLOP/s",
                "extra": row.get("skipped") or row.get("error", "")}
    if name == "contrastive":
        shape = ",".join(f"{k}={row[k]}" for k in ("B", "T", "D") if k in row)
        return {"what": f"mga {row.get('case')} {shape} {row.get('backend')} fwd+bwd", "ms": row.get("ms_fwd_bwd"),
                "rate": None, "unit": "", "extra": f"{row.get('peak_mem_mb', '-')} MB {row.get('status', '')}"}
    what = f"{row.get('op')} {row.get('impl')} {row.get('mode')}"
    if "gbps" in row:
        return {"what": what, "ms": row.get("ms_median"), "rate": row["gbps"], "unit": "GB/s", "extra": ""}
    return {"what": what, "ms": row.get("ms_median"), "rate": row.get("tflops"), "unit": "TFLOP/s", "extra": ""}


def main(argv=None) -> int:
    import torch
    args = parse(argv)
    if args.dry_run:
        return dry_run(args)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench: TRITON_INTERPRET=1 is set; unset it (interpreter timings mean nothing)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    run_id = time.strftime("%Y%m%dT%H%M%S")
    info = env_info()
    peaks = measure_peaks(device)
    print(f"bench on {info['device']}: measured matmul {peaks['matmul_tflops']:.1f} TFLOP/s "
          f"({peaks['matmul_dtype']}), copy {peaks['copy_gbps']:.0f} GB/s", flush=True)
    append_result(os.path.join(args.results, "peaks.jsonl"), {**info, **peaks, "run_id": run_id})
    lines, failed = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for name, cmd in _commands(args, cuda, scratch):
            print(f"\n== {name}: {' '.join(cmd)}", flush=True)
            rc = subprocess.call(cmd, cwd=_ROOT)
            if rc != 0:
                failed.append(f"{name} (exit {rc})")
            path = os.path.join(scratch, f"{name}.jsonl")
            if not os.path.exists(path):
                continue
            for raw in open(path):
                row = json.loads(raw)
                s = summarize(name, row, peaks)
                ceiling = peaks["copy_gbps"] if s["unit"] == "GB/s" else peaks["matmul_tflops"]
                row["peak_share"] = None if s["rate"] is None else s["rate"] / ceiling
                row["run_id"] = run_id
                row["measured_peaks"] = peaks
                append_result(os.path.join(args.results, f"{name}.jsonl"), row)
                lines.append((s, row["peak_share"]))
    print(f"\n{'benchmark':62s} {'ms':>9s} {'rate':>14s} {'of peak':>8s}  notes")
    for s, share in lines:
        ms = "-" if s["ms"] is None else f"{s['ms']:.3f}"
        rate = "-" if s["rate"] is None else f"{s['rate']:.1f} {s['unit']}"
        sh = "-" if share is None else f"{100 * share:.0f}%"
        print(f"{s['what'][:62]:62s} {ms:>9s} {rate:>14s} {sh:>8s}  {s['extra']}")
    print(f"\nrows appended under {args.results} (run_id {run_id})")
    if failed:
        print("bench: failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
