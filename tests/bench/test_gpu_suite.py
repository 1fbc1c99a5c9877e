"""bench/gpu_suite.sh cannot rot: its --dry-run runs on the CPU in CI (every step's entry point
parses, imports and builds small inputs), and its summary turns results rows into the headline
ratios.  No timing is asserted."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from bench import gpu_suite  # noqa: E402

STEPS = ("build", "tests", "bench", "bench_kernels", "caption", "swin", "audit_cases", "audit", "dali")


def test_gpu_suite_dry_run():
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), "--dry-run"], capture_output=True,
                       text=True, timeout=900, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    summary = out[out.index("# GPU suite"):]
    for name in STEPS:
        line = next((x for x in summary.splitlines() if x.startswith(f"| {name} |")), None)
        assert line is not None, (name, summary)
        assert line.split("|")[2].strip() in ("ok", "skipped"), line
    assert "gpu_suite: every step passed" in out
    # the steps really ran their entry points, not a placeholder
    assert "dry-kernels: bench_attention.py --tokens 16384: parsed; inputs vit_b16" in out
    assert "dry-run train_step:" in out and "--find-max-batch -> --help exit 0" in out
    assert "_bias_gelu_fwd_kernel" in out and "sm_90a" in out


def _rows(path, name, rows):
    with open(os.path.join(path, f"{name}.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_summary_ratios(tmp_path, capsys):
    """Only the rows appended after `start` count; the headlines are ratios of those rows and the
    benchmark table gives each rate's share of the measured peak."""
    res, run = tmp_path / "results", tmp_path / "20990101T000000Z"
    res.mkdir()
    _rows(res, "train_step", [{"impl": "fast", "samples_per_s": 1.0}])   # an older run: must be ignored
    gpu_suite.main(["start", "--run-dir", str(run), "--results", str(res)])
    _rows(res, "peaks", [{"matmul_tflops": 800.0, "matmul_dtype": "bfloat16", "copy_gbps": 4000.0}])
    step = dict(size="base", batch=32, step_ms_median=100.0, compile=False)
    _rows(res, "train_step", [dict(step, impl="eager", samples_per_s=100.0, model_tflops=200.0, mfu=0.25,
                                   max_batch=64, peak_share=0.25),
                              dict(step, impl="fast", samples_per_s=250.0, model_tflops=500.0, mfu=0.625,
                                   max_batch=256, peak_share=0.625)])
    _rows(res, "swin", [{"impl": "eager", "size": "B", "clips_per_s": 10.0, "tflops": 80.0, "batch": 8},
                        {"impl": "ours", "size": "B", "clips_per_s": 15.0, "tflops": 120.0, "batch": 8}])
    gpu_suite.main(["step", "--run-dir", str(run), "--results", str(res), "--name", "bench", "--rc", "124",
                    "--seconds", "170"])
    gpu_suite.main(["summary", "--run-dir", str(run), "--results", str(res)])
    text = capsys.readouterr().out
    assert "fast 250.0 vs eager 100.0 samples/s (x2.50)" in text
    assert "largest batch fast 256, eager 64" in text
    assert "ours 15.0 vs eager 10.0 clips/s (x1.50)" in text
    assert "| swin B ours B=8 |" in text and "| 15% |" in text          # 120 / 800 TFLOP/s
    assert "| step base B=32 fast | 100.000 | 500.0 TFLOP/s | 62% |" in text
    assert "| bench | timeout | 170.0 |" in text
    assert "train_step (2)" in text                                     # the older row is not counted
    assert (res / "gpu_suite_20990101T000000Z.md").read_text().startswith("# GPU suite 20990101T000000Z")
