#!/usr/bin/env bash
# The first command on a machine with a GPU: every kernel's GPU tests, the kernel audit against the
# installed Triton, the benchmarks, and a one-page summary -- in under 8 minutes on one H100/H200.
#
#   bash bench/gpu_suite.sh                    # on the GPU machine, from anywhere in the checkout
#   bash bench/gpu_suite.sh --copy-to "$OUT"   # ... and copy the summary + a tarball of rows and logs there
#   bash bench/gpu_suite.sh --dry-run          # on the CPU (CI): every step parses, imports, builds small inputs
#
# Steps, each under its own time budget (seconds; `timeout` stops a step that overruns, the suite
# goes on and the summary says so), in the order that matters when time is short:
#   build   csrc/ for sm_80 + sm_90a (python csrc/build.py --out valor_fast/_lib)               40
#   tests   the kernels' tests on the GPU: VALOR_FAST_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest
#           tests/kernels/ tests/ops/test_fused.py tests/csrc/test_csrc_contrastive.py
#           (float64-checked forward and every gradient)                                       125
#   bench   valor-fast bench --quick --find-max-batch (bench/run_all.py: measured matmul / copy
#           peaks, the attention / contrastive / fused kernels, caption tokens/s with and without
#           the KV cache, the base train step eager vs fast with its largest batch)             170
#   swin    bench/bench_swin.py (Swin-B, 4 x 224 px, ours vs eager)                              40
#   audit   valor-fast bench --audit --check over the default cases (bench/kernel_audit.py:
#           registers, spills, shared memory, HMMA/HGMMA, against the Triton installed there;
#           the csrc build and CI's selection, ~50 rows: the full ~900-row sweep takes ~5 min)  60
#   dali    valor-fast data bench --backends cpu,dali, when nvidia.dali imports                  35
# Every step appends rows (device, versions, commit, command) to bench/results/*.jsonl, one row
# per step to bench/results/gpu_suite.jsonl, and bench/results/gpu_suite_<run id>.md is the
# summary (bench/gpu_suite.py).  Logs: runs/gpu_suite/<run id>/<step>.log.
# Exit status: 0 when every step that ran passed, 1 otherwise.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0 COPY_TO=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --copy-to) COPY_TO="${2:?--copy-to needs a folder}"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --dry-run, --copy-to DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)"
if [ "$DRY" = 1 ]; then
  SCRATCH="$(mktemp -d)"; trap 'rm -rf "$SCRATCH"' EXIT
  RESULTS="$SCRATCH/results" LOGS="$SCRATCH/$RUN_ID"
else
  RESULTS="$ROOT/bench/results" LOGS="$ROOT/runs/gpu_suite/$RUN_ID"
fi
mkdir -p "$RESULTS" "$LOGS"
DRYFLAG=(); [ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
FAILED=()
T0=$SECONDS
TOTAL_BUDGET=470   # seconds: 8 minutes less the summary

# valor_fast.kernels is the top-level kernels/ folder (setup.py's package_dir); a checkout that was
# not pip-installed needs the link the developers' worktrees have (valor_fast/kernels is git-ignored)
if ! "$PY" -c "import valor_fast.kernels" 2>/dev/null; then
  if [ ! -e valor_fast/kernels ]; then ln -s ../kernels valor_fast/kernels && echo "gpu_suite: linked valor_fast/kernels -> ../kernels"; fi
fi
"$PY" -c "import torch, valor_fast.kernels" || { echo "gpu_suite: cannot import torch / valor_fast ($PY)" >&2; exit 2; }

record() {  # record NAME RC SECONDS [extra args]
  "$PY" bench/gpu_suite.py step --run-dir "$LOGS" --results "$RESULTS" --name "$1" --rc "$2" \
    --seconds "$3" "${DRYFLAG[@]}" "${@:4}" || echo "gpu_suite: could not record step $1" >&2
}

step() {  # step NAME BUDGET_S CMD...: run under min(budget, time left), log, record
  local name="$1" budget="$2"; shift 2
  local left=$(( TOTAL_BUDGET - (SECONDS - T0) ))
  if [ "$DRY" = 0 ] && [ "$left" -lt 10 ]; then
    echo "== $name: skipped, the suite's $TOTAL_BUDGET s are spent"; record "$name" 3 0 --note "no time left"; return
  fi
  [ "$DRY" = 0 ] && [ "$budget" -gt "$left" ] && budget=$left
  echo "== $name (budget ${budget}s): $*"
  local t=$SECONDS rc
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local note=""
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="stopped at its ${budget}s budget"
  [ $rc -ne 0 ] && FAILED+=("$name (exit $rc)")
  echo "== $name: exit $rc in $((SECONDS - t)) s"
  record "$name" "$rc" "$((SECONDS - t))" --note "$note" ${JUNIT:+--junit "$JUNIT"}
}

"$PY" bench/gpu_suite.py start --run-dir "$LOGS" --results "$RESULTS" || exit 2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv \
  > "$LOGS/nvidia-smi.csv" 2>&1 && cat "$LOGS/nvidia-smi.csv"

KERNEL_TESTS=(tests/kernels tests/ops/test_fused.py tests/csrc/test_csrc_contrastive.py)

if [ "$DRY" = 1 ]; then
  # CPU: the same entry points, parsed and imported, inputs built small; no timings recorded
  export TRITON_INTERPRET=1
  step build 60 "$PY" csrc/build.py --help
  JUNIT="" step tests 120 env VALOR_FAST_TEST_DEVICE=cuda "$PY" -m pytest -q --collect-only -p no:cacheprovider "${KERNEL_TESTS[@]}"
  # (the step benchmark itself runs end to end on the CPU in tests/train/test_train_step.py)
  step bench 60 env -u TRITON_INTERPRET "$PY" -m valor_fast.cli bench --quick --find-max-batch --dry-run \
    --results "$RESULTS"
  step bench_kernels 60 env -u TRITON_INTERPRET "$PY" bench/gpu_suite.py dry-kernels
  step caption 120 env -u TRITON_INTERPRET "$PY" bench/bench_caption.py --size tiny --device cpu --clips 2 --max-len 4 \
    --iters 1 --no-save
  step swin 120 env -u TRITON_INTERPRET "$PY" bench/bench_swin.py --device cpu --size tiny --image 64 --batch 1 \
    --frames 2 --dtype fp32 --steps 1 --warmup 0 --out ""
  step audit_cases 60 env TRITON_INTERPRET=0 "$PY" bench/gpu_suite.py audit-cases
  step audit 180 "$PY" -m valor_fast.cli bench --audit --only bias_gelu_fwd --arch 80,90 --check --no-write
  if "$PY" -c "import nvidia.dali" 2>/dev/null; then
    step dali 60 "$PY" -m valor_fast.cli data bench --help
  else
    echo "== dali: nvidia.dali not installed; the real run skips this step too"; record dali 3 0 --note "nvidia.dali not installed"
  fi
else
  export TRITON_INTERPRET=0
  step build 40 "$PY" csrc/build.py --out valor_fast/_lib
  JUNIT="$LOGS/tests.xml" step tests 125 env VALOR_FAST_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml "$LOGS/tests.xml" "${KERNEL_TESTS[@]}"
  step bench 170 "$PY" -m valor_fast.cli bench --quick --find-max-batch --results "$RESULTS"
  step swin 40 "$PY" bench/bench_swin.py --steps 5 --out "$RESULTS/swin.jsonl"
  AUDIT_CASES="$(TRITON_INTERPRET=0 "$PY" bench/gpu_suite.py audit-cases)" || AUDIT_CASES=csrc
  step audit 60 "$PY" -m valor_fast.cli bench --audit --check --only "$AUDIT_CASES" --out "$RESULTS/kernel_audit.jsonl"
  if "$PY" -c "import nvidia.dali" 2>/dev/null; then
    step dali 35 "$PY" -m valor_fast.cli data bench --backends cpu,dali --frames 4 --batch 16 --batches 4 \
      --seconds 4 --out "$RESULTS/data_backends.jsonl"
  else
    echo "== dali: nvidia.dali not installed; skipped"; record dali 3 0 --note "nvidia.dali not installed"
  fi
fi

"$PY" bench/gpu_suite.py summary --run-dir "$LOGS" --results "$RESULTS" "${DRYFLAG[@]}" | tee "$LOGS/summary.md"
[ ${PIPESTATUS[0]} -ne 0 ] && FAILED+=("summary")
echo "gpu_suite: $((SECONDS - T0)) s in all"
if [ -n "$COPY_TO" ]; then
  mkdir -p "$COPY_TO"
  cp "$LOGS/summary.md" "$COPY_TO/gpu_suite_summary.md"
  tar -czf "$COPY_TO/gpu_suite_$RUN_ID.tar.gz" -C "$ROOT" "$(realpath --relative-to="$ROOT" "$RESULTS")" \
    "$(realpath --relative-to="$ROOT" "$LOGS")" && echo "gpu_suite: copied to $COPY_TO"
fi
if [ ${#FAILED[@]} -gt 0 ]; then echo "gpu_suite: FAILED: ${FAILED[*]}" >&2; exit 1; fi
echo "gpu_suite: every step passed"
