#!/usr/bin/env bash
# The one script to run on the GPU machine (issue 12), from the repo root, with $OUT set:
#
#     PYTHONPATH=$PWD bash bench/gpu_check.sh                 # default steps: cuda profile bench
#     PYTHONPATH=$PWD bash bench/gpu_check.sh bench           # only the benchmark
#     PYTHONPATH=$PWD bash bench/gpu_check.sh cuda bench-quick      # chosen steps
#
# Steps (each under `timeout`; a failure or timeout is recorded and the next step runs):
#   cuda         the CUDA tests (tests/test_cuda.py, the Triton backend and kernel CUDA tests, the tests of every
#                kernel configuration last; -v, so a timed-out step still says which passed), one kernel
#                configuration each (ROUTEFX_TRITON_TUNE=first: correctness, not speed) -> $OUT/cuda.log
#   profile      python bench/gpu_profile.py --out $OUT: the whole model's device time by kernel class (HF
#                torch.compile, routefx Dense, Duo 0.5), compiled-vs-eager route agreement, the picked kernel
#                configurations -> $OUT/profile.log, gpu_profile.json
#   tune         python bench/gpu_tune.py --out $OUT: per-kernel times and every autotuned configuration's time
#                at T=8192 / 1024, weights by pointers and through tensor descriptors -> $OUT/tune.log
#   suite        the whole suite on CPU (CUDA hidden, so the Triton interpreter tests run), -n 8 -> $OUT/suite.log
#   bench        python bench/gpu.py --out $OUT --time-budget (BENCH_TIMEOUT - 20) (gpu.json, gpu.md) -> $OUT/bench.log
#   bench-quick  the same with --quick
#   moe          python bench/gpu_moe.py --out $OUT --quick (issue 15's Mixtral shape on CUDA) -> $OUT/moe.log
#   generate     python bench/gpu_generate.py --out $OUT (tokens/s: HF generate vs CUDA-graph decode) -> $OUT/generate.log
#   flex         python bench/gpu_flex_probe.py --out $OUT (where the experimental FlexAttention lowering fails;
#                each stage in its own process) -> $OUT/flex.log, gpu_flex_probe.json
# Installs nothing. Outputs: at most 8 files, all directly in $OUT. The caller sees only the end of the output,
# so the summary comes last. Time limits (seconds) can be changed with CUDA_TIMEOUT, PROFILE_TIMEOUT, SUITE_TIMEOUT,
# BENCH_TIMEOUT and TOTAL_TIMEOUT (default 570: each step is cut to what is left of it; a step with < 30 s left is skipped);
# CUDA_TESTS (the cuda step's test files or ids), GENERATE_TIMEOUT, GENERATE_ARGS, MOE_TIMEOUT; for trying the script on a CPU machine: SUITE_TESTS (default tests), SUITE_WORKERS (default 8), BENCH_ARGS
# (extra bench/gpu.py arguments, e.g. "--smoke-cpu --no-inductor"), PROFILE_ARGS (e.g. "--smoke-cpu"), TUNE_ARGS
# (e.g. "--cases 8192:0.5").
set -u

OUT="${OUT:?set OUT to an output folder}"
PY="${PYTHON:-python3}"
CUDA_TIMEOUT="${CUDA_TIMEOUT:-170}"  # all CUDA tests need ~210 s on an H200 (2026-11-26): raise it when time allows
PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-150}"
TUNE_TIMEOUT="${TUNE_TIMEOUT:-150}"
SUITE_TIMEOUT="${SUITE_TIMEOUT:-140}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
GENERATE_TIMEOUT="${GENERATE_TIMEOUT:-150}"
MOE_TIMEOUT="${MOE_TIMEOUT:-150}"
FLEX_TIMEOUT="${FLEX_TIMEOUT:-150}"
TOTAL_TIMEOUT="${TOTAL_TIMEOUT:-570}"  # the whole script: a step gets at most what is left of this (less 10 s)
SUITE_TESTS="${SUITE_TESTS:-tests}"
SUITE_WORKERS="${SUITE_WORKERS:-8}"
BENCH_ARGS="${BENCH_ARGS:-}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
export TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 PYTHONUNBUFFERED=1

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(cuda profile bench-quick)
for s in "${steps[@]}"; do
  case "$s" in cuda|profile|tune|suite|bench|bench-quick|generate|moe|flex) ;; *) echo "unknown step '$s'; steps: cuda profile tune suite bench bench-quick generate moe flex"; exit 2;; esac
done

T0=$(date +%s)
SUMMARY=()

note() { SUMMARY+=("$1"); }

# run_step NAME TIMEOUT LOG CMD...: runs CMD under timeout with its output in LOG; records status and duration
run_step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(date +%s)
  local left=$(( TOTAL_TIMEOUT - (t - T0) - 10 ))
  if [ $left -lt 30 ]; then note "$name: SKIPPED (only ${left}s of TOTAL_TIMEOUT=${TOTAL_TIMEOUT}s left)"; return 125; fi
  [ $left -lt "$limit" ] && limit=$left
  echo "=== $name: $* (timeout ${limit}s) -> $log"
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t ))
  local status="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMED OUT after ${limit}s"; elif [ $rc -ne 0 ]; then status="FAILED (rc=$rc)"; fi
  note "$name: $status in ${dt}s"
  return $rc
}

pytest_result() {  # the pytest totals line of a log, or a note
  grep -sE "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)" "$1" | tail -1 || true
}

echo "=== versions"
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
for name in ("triton", "transformers", "onnxruntime", "onnx", "onnxscript", "pytest", "xdist"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT importable:", type(e).__name__, e)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,utilization.gpu --format=csv,noheader 2>&1 \
  | tee -a "$OUT/versions.txt" || true

for s in "${steps[@]}"; do
  case "$s" in
    cuda)
      export ROUTEFX_TRITON_TUNE=first
      run_step cuda "$CUDA_TIMEOUT" "$OUT/cuda.log" $PY -m pytest -v -p no:cacheprovider --tb=short -m cuda \
        ${CUDA_TESTS:-tests/test_cuda.py tests/generate/test_window.py tests/backends/test_triton_backend.py tests/backends/triton/test_ffn_cuda.py} -rfEs
      unset ROUTEFX_TRITON_TUNE
      grep -sE "^(FAILED|ERROR|SKIPPED) " "$OUT/cuda.log" | cut -c1-300 | head -n 20
      [ -f "$OUT/cuda.log" ] && note "  cuda tests: $(pytest_result "$OUT/cuda.log")"
      ;;
    profile)
      run_step profile "$PROFILE_TIMEOUT" "$OUT/profile.log" $PY bench/gpu_profile.py --out "$OUT" ${PROFILE_ARGS:-}
      grep -sE "^(default|===|config)" "$OUT/profile.log" | cut -c1-220
      ;;
    flex)
      run_step flex "$FLEX_TIMEOUT" "$OUT/flex.log" $PY bench/gpu_flex_probe.py --out "$OUT" --timeout 60
      cut -c1-300 "$OUT/flex.log"
      ;;
    tune)
      run_step tune "$TUNE_TIMEOUT" "$OUT/tune.log" $PY bench/gpu_tune.py --out "$OUT" ${TUNE_ARGS:-}
      sed -n '/=== summary/,$p' "$OUT/tune.log"
      ;;
    suite)
      # CUDA hidden: the suite's CPU view (the Triton kernels under TRITON_INTERPRET=1, set by the tests)
      CUDA_VISIBLE_DEVICES="" run_step suite "$SUITE_TIMEOUT" "$OUT/suite.log" \
        $PY -m pytest -q -p no:cacheprovider -n "$SUITE_WORKERS" $SUITE_TESTS -rfE
      grep -sE "^(FAILED|ERROR) " "$OUT/suite.log" | cut -c1-160 | head -n 20
      [ -f "$OUT/suite.log" ] && note "  suite: $(pytest_result "$OUT/suite.log")"
      ;;
    moe)
      run_step moe "$MOE_TIMEOUT" "$OUT/moe.log" $PY bench/gpu_moe.py --out "$OUT" --quick \
        --time-budget $(( MOE_TIMEOUT - 40 ))
      grep -sE "^\[gpu_moe\]|Error" "$OUT/moe.log" | cut -c1-200 | head -n 12
      sed -n '/"ratios"/,/}/p' "$OUT/moe.log"
      ;;
    generate)
      run_step generate "$GENERATE_TIMEOUT" "$OUT/generate.log" $PY bench/gpu_generate.py --out "$OUT" \
        --time-budget $(( GENERATE_TIMEOUT - 40 )) ${GENERATE_ARGS:-}
      grep -sE "^\[gpu_generate\]|Error" "$OUT/generate.log" | cut -c1-200 | head -n 16
      ;;
    bench|bench-quick)
      extra="$BENCH_ARGS"
      [ "$s" = bench-quick ] && extra="$extra --quick"
      limit=$BENCH_TIMEOUT
      left=$(( TOTAL_TIMEOUT - ($(date +%s) - T0) - 10 ))
      [ $left -lt "$limit" ] && limit=$left
      run_step "$s" "$limit" "$OUT/bench.log" $PY bench/gpu.py --out "$OUT" --time-budget $(( limit - 20 )) $extra
      grep -sE "Error|Traceback|failed" "$OUT/bench.log" | cut -c1-200 | head -n 12
      if [ -f "$OUT/gpu.md" ]; then cat "$OUT/gpu.md"; else tail -n 40 "$OUT/bench.log" 2>/dev/null; fi
      ;;
  esac
done

{
  echo "=== summary (total $(( $(date +%s) - T0 ))s; logs in $OUT)"
  head -n 2 "$OUT/versions.txt"
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  [ -f "$OUT/gpu.json" ] && $PY - "$OUT/gpu.json" <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))
wm = res.get("whole_model") or {}
for k, c in wm.get("candidates", {}).items():
    ms, x = c.get("latency_ms"), c.get("speedup_vs_hf_inductor")
    print(f"  {k:18s} {ms if ms is None else round(ms, 2)} ms, x inductor {x if x is None else round(x, 3)}, "
          f"efficiency {c.get('efficiency') if c.get('efficiency') is None else round(c['efficiency'], 3)}")
for k, t in wm.get("targets", {}).items():
    print(f"  target {k} {t['target']}: {t['value']} ({'met' if t['met'] else 'NOT met'})")
for k, e in {**wm.get("errors", {}), **res.get("errors", {})}.items():
    print(f"  ERROR {k}: {e}")
EOF
} | tee "$OUT/summary.txt"
