#!/usr/bin/env python
"""The bookkeeping half of bench/gpu_suite.sh (the shell script runs the steps; this records them).

    python bench/gpu_suite.py start   --run-dir D --results R       # snapshot R's results files
    python bench/gpu_suite.py step    --run-dir D --results R --name N --rc RC --seconds S [--junit X]
    python bench/gpu_suite.py summary --run-dir D --results R       # the one-page summary
    python bench/gpu_suite.py dry-kernels                           # kernel benches' inputs, small, CPU
    python bench/gpu_suite.py audit-cases                           # the audit's default cases, comma list

`start` writes D/mark.json (each R/*.jsonl's line count), so `summary` reads only the rows this
run appended.  `step` appends one row per suite step to R/gpu_suite.jsonl with the device,
versions and commit (bench.common.env_info), its exit status, wall seconds and, for the pytest
step, the passed / failed / skipped counts from its JUnit XML.  `summary` writes
R/gpu_suite_<run_id>.md: the measured peaks, each step's status, and every benchmark row as
time, rate and share of the measured matmul peak (copy bandwidth for GB/s rows), then the
headline ratios (fast vs eager samples/s and MFU, largest batch, KV-cache decode speed-up, Swin
ours vs eager, DALI vs CPU decode).  `dry-kernels` is the `--dry-run` of the kernel benchmarks,
which need CUDA: it imports each bench_<op>.py, parses the arguments the suite passes, and builds
its inputs at a small size on the CPU (bench_fused builds its inputs inside the timed functions:
parsed and imported only).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

from bench.run_all import QUICK_ARGS  # noqa: E402  (what --quick passes each kernel benchmark)


def _counts(path: str) -> dict:
    return {os.path.basename(p): sum(1 for _ in open(p)) for p in glob.glob(os.path.join(path, "*.jsonl"))}


def cmd_start(a) -> int:
    os.makedirs(a.run_dir, exist_ok=True)
    with open(os.path.join(a.run_dir, "mark.json"), "w") as f:
        json.dump({"run_id": os.path.basename(os.path.normpath(a.run_dir)), "lines": _counts(a.results)}, f)
    return 0


def junit_counts(path: str) -> dict:
    """passed / failed / errors / skipped of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


def cmd_step(a) -> int:
    from bench.common import append_result, env_info
    status = "ok" if a.rc == 0 else ("skipped" if a.rc == 3 else ("timeout" if a.rc in (124, 137) else "failed"))
    row = dict(env_info(), bench="gpu_suite", run_id=os.path.basename(os.path.normpath(a.run_dir)), step=a.name,
               rc=a.rc, status=status, seconds=round(a.seconds, 1), dry_run=a.dry_run, note=a.note)
    if a.junit and os.path.exists(a.junit):
        row["tests"] = junit_counts(a.junit)
    append_result(os.path.join(a.results, "gpu_suite.jsonl"), row)
    return 0


def _new_rows(a) -> dict:
    mark = json.load(open(os.path.join(a.run_dir, "mark.json")))
    out = {}
    for name, n in _counts(a.results).items():
        rows = [json.loads(line) for i, line in enumerate(open(os.path.join(a.results, name)))
                if i >= mark["lines"].get(name, 0)]
        if rows:
            out[name[:-len(".jsonl")]] = rows
    return out


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def _headlines(rows: dict) -> list:
    """The ratios a reader wants first, from whatever rows this run wrote."""
    out = []
    steps = {r["impl"]: r for r in rows.get("train_step", [])}
    if "fast" in steps and "eager" in steps:
        f, e = steps["fast"], steps["eager"]
        out.append(f"- train step {f['size']} B={f['batch']}: fast {f['samples_per_s']:.1f} vs eager "
                   f"{e['samples_per_s']:.1f} samples/s (x{f['samples_per_s'] / e['samples_per_s']:.2f}); "
                   f"MFU fast {_fmt(f.get('mfu'), '.3f')}, eager {_fmt(e.get('mfu'), '.3f')}; largest batch "
                   f"fast {f.get('max_batch', '-')}, eager {e.get('max_batch', '-')}")
    cap = {bool(r.get("kv_cache")): r for r in rows.get("caption", [])}
    if True in cap and False in cap:
        out.append(f"- caption decode: {cap[True]['tokens_per_s']:.0f} tokens/s with the KV cache, "
                   f"{cap[False]['tokens_per_s']:.0f} without (x{cap[True]['tokens_per_s'] / cap[False]['tokens_per_s']:.2f})")
    swin = {r["impl"]: r for r in rows.get("swin", [])}
    if "ours" in swin and "eager" in swin:
        out.append(f"- Swin-{swin['ours']['size']}: ours {swin['ours']['clips_per_s']:.1f} vs eager "
                   f"{swin['eager']['clips_per_s']:.1f} clips/s (x{swin['ours']['clips_per_s'] / swin['eager']['clips_per_s']:.2f})")
    for r in rows.get("data_backends", []):
        out.append(f"- decode {r.get('backend')} ({r.get('device')}) {r.get('frames')} frames: {r.get('clips_per_s', 0):.1f} clips/s")
    audit = rows.get("kernel_audit", [])
    if audit:
        bad = [f"{r['kernel']} {r['arch']}: {'; '.join(r['findings'])}" for r in audit if r.get("findings")]
        out.append(f"- kernel audit (installed Triton {audit[0].get('triton')}): {len(audit)} rows, {len(bad)} with findings"
                   + "".join(f"\n  - {b}" for b in bad[:10]))
    return out


def _bench_table(rows: dict, peaks: dict) -> list:
    from bench.run_all import summarize
    lines = ["| benchmark | ms | rate | of peak | notes |", "| --- | ---: | ---: | ---: | --- |"]
    for name in ("attention", "contrastive", "fused", "caption", "train_step"):
        for r in rows.get(name, []):
            s = summarize(name, r, peaks)
            share = r.get("peak_share")
            lines.append(f"| {s['what']} | {_fmt(s['ms'], '.3f')} | {_fmt(s['rate'])} {s['unit'] if s['rate'] is not None else ''}"
                         f" | {'-' if share is None else f'{100 * share:.0f}%'} | {s['extra']} |")
    for r in rows.get("swin", []):
        mm = peaks.get("matmul_tflops")
        share = f"{100 * r['tflops'] / mm:.0f}%" if mm and r.get("tflops") else "-"
        lines.append(f"| swin {r['size']} {r['impl']} B={r.get('batch')} | {_fmt(r.get('step_ms'), '.3f')} | "
                     f"{_fmt(r.get('tflops'))} TFLOP/s | {share} | {r['clips_per_s']:.1f} clips/s |")
    return lines if len(lines) > 2 else []


def cmd_summary(a) -> int:
    rows = _new_rows(a)
    run_id = os.path.basename(os.path.normpath(a.run_dir))
    peaks = (rows.get("peaks") or [{}])[-1]
    suite = rows.get("gpu_suite", [])
    env = suite[0] if suite else {}
    lines = [f"# GPU suite {run_id}" + (" (dry run: shapes and imports only, no timings)" if a.dry_run else ""), "",
             f"device {env.get('device')} (cc {env.get('device_capability', '-')}, {env.get('sm_count', '-')} SMs), "
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, commit "
             f"{(env.get('git_commit') or '?')[:12]}{' (dirty)' if env.get('git_dirty') else ''}", "",
             f"measured peaks: matmul {_fmt(peaks.get('matmul_tflops'))} TFLOP/s ({peaks.get('matmul_dtype', '-')}), "
             f"copy {_fmt(peaks.get('copy_gbps'), '.0f')} GB/s", "", "| step | status | seconds | notes |",
             "| --- | --- | ---: | --- |"]
    for r in suite:
        t = r.get("tests")
        note = (f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped" if t else "")
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {note or r.get('note') or ''} |")
    head = _headlines(rows)
    if head:
        lines += ["", "## Headlines", ""] + head
    table = _bench_table(rows, peaks)
    if table:
        lines += ["", "## Benchmarks (share of the measured peak: matmul for TFLOP/s, copy for GB/s)", ""] + table
    lines += ["", f"rows: {', '.join(f'{k} ({len(v)})' for k, v in sorted(rows.items()))} under {a.results}"]
    path = os.path.join(a.results, f"gpu_suite_{run_id}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nsummary: {path}")
    return 0


def cmd_dry_kernels(a) -> int:
    """Import each kernel benchmark, parse the suite's arguments, build small inputs on the CPU."""
    import importlib

    import torch
    for name in ("attention", "contrastive", "fused"):
        mod = importlib.import_module(f"bench.bench_{name}")
        if hasattr(mod, "DEVICE"):
            mod.DEVICE = "cpu"
        made = []
        if name == "attention":
            args = mod._parse(QUICK_ARGS[name])
            for shp in args.shapes:
                Lq, Lk, H, Dh, causal, pad = mod.SHAPES[shp][:6]
                q, k, v, kpm = mod._inputs(1, min(Lq, 8), min(Lk, 8), 2, min(Dh, 16), pad, torch.float32)
                made.append(f"{shp}{tuple(q.shape)}")
        elif name == "contrastive":
            mod._parse(QUICK_ARGS[name])
            made += [f"coarse{tuple(mod._coarse_inputs(8, torch.float32)[0].shape)}",
                     f"fine{tuple(mod._fine_inputs(8, torch.float32)['text'].shape)}"]
        else:
            mod._parse(QUICK_ARGS[name])
        print(f"dry-kernels: bench_{name}.py {' '.join(QUICK_ARGS[name])}: parsed"
              + (f"; inputs {', '.join(made)}" if made else " (inputs are built inside its timed functions)"))
    return 0


def default_audit_cases() -> list:
    """The kernel audit's default cases (what CI audits: per family its CI_CASES, else the case
    names without a "/", the first configuration of each autotuned set at its VALOR shape), and
    the csrc build: the full sweep (~900 rows, ~5 min of one core) does not fit the suite."""
    from bench import kernel_audit as ka
    return ["csrc"] + ka.ci_case_names()


def cmd_audit_cases(a) -> int:
    print(",".join(default_audit_cases()))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cmd", choices=("start", "step", "summary", "dry-kernels", "audit-cases"))
    p.add_argument("--run-dir")
    p.add_argument("--results")
    p.add_argument("--name")
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--junit")
    p.add_argument("--note", default="")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if a.cmd in ("start", "step", "summary") and not (a.run_dir and a.results):
        p.error(f"{a.cmd} needs --run-dir and --results")
    return {"start": cmd_start, "step": cmd_step, "summary": cmd_summary, "dry-kernels": cmd_dry_kernels,
            "audit-cases": cmd_audit_cases}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
