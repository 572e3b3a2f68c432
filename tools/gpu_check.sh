#!/usr/bin/env bash
# The CUDA half of stated on a real GPU, in one go: the GPU tests (tests/gpu,
# tests/kernels/test_cuda_parity.py, and tests/distributed/test_on_gpus.py where two GPUs are) and a
# short run of bench/gpu_step.py, then a one-block summary.
#
#   OUT=/tmp/gpucheck PYTHON=python3 bash tools/gpu_check.sh
#
# Runs from source (PYTHONPATH = the repo, client/, kernels/), with no install. Logs go to
# $OUT/gpu_tests.log and $OUT/gpu_bench.log. Every part runs under `timeout`, so that a hang cannot eat
# the whole budget; the script as a whole ends in well under 7 minutes. Where grpc_health (the
# grpcio-health-checking package, which the daemon and the tests import) is missing, the wheels in
# .whl/ (if any) are installed into a temporary directory first. On a machine without CuPy or a CUDA
# device the GPU tests skip themselves and the benchmark says it needs a CUDA device.
set -o pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpucheck}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT:$ROOT/client:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"
TEST_LIMIT=${TEST_LIMIT:-270}     # seconds for the whole pytest run
BENCH_LIMIT=${BENCH_LIMIT:-60}    # seconds for each of the benchmark's three parts
BENCH_ARGS=${BENCH_ARGS:---kernel-sizes 16M,128M --paged-sizes 32M --samples 5}
BENCH_PARTS=${BENCH_PARTS:-kernel paged memory}  # which of bench/gpu_step.py's figures, each run on its own

section() { printf '\n=== %s ===\n' "$*"; }

section "machine"
date -u +%FT%TZ
(command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi -L) || echo "nvidia-smi: not here"
if ! "$PY" -c 'import grpc_health' 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        SITE=$(mktemp -d /tmp/stated-site.XXXXXX)
        timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:$SITE"
    fi
fi
timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, os, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "cupy", "numpy", "grpc", "google.protobuf", "grpc_health", "prometheus_client", "uvloop", "xxhash"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:18s} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name:18s} MISSING ({type(exc).__name__}: {exc})")
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as exc:  # noqa: BLE001
    print("torch cuda: error", exc)
try:
    import cupy
    rt = cupy.cuda.runtime
    print("cupy devices", rt.getDeviceCount(), "runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion(),
          "nvrtc", cupy.cuda.nvrtc.getVersion())
except Exception as exc:  # noqa: BLE001
    print("cupy cuda: error", type(exc).__name__, exc)
try:
    from stated_kernels import cuda_sources
    print("kernel include dirs", cuda_sources.include_dirs(), "CUDA_HOME", os.environ.get("CUDA_HOME"),
          "CUDA_PATH", os.environ.get("CUDA_PATH"))
except Exception as exc:  # noqa: BLE001
    print("stated_kernels: error", exc)
EOF

section "GPU tests (limit ${TEST_LIMIT}s)"
PER_TEST=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && PER_TEST=(--timeout=120)  # per test, where pytest-timeout is here
# SIGINT first: pytest then stops like on ^C and still prints its summary of what ran.
timeout -s INT -k 20 "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rfEs "${PER_TEST[@]}" --durations=10 \
    --junitxml="$OUT/gpu_tests.xml" tests/gpu tests/kernels/test_cuda_parity.py tests/distributed/test_on_gpus.py 2>&1 | tee "$OUT/gpu_tests.log"
TEST_RC=$?

section "GPU benchmark (bench/gpu_step.py $BENCH_ARGS; ${BENCH_LIMIT}s per part)"
: >"$OUT/gpu_bench.log"
BENCH_RC=""
for part in $BENCH_PARTS; do
    echo "--- $part" | tee -a "$OUT/gpu_bench.log"
    # shellcheck disable=SC2086
    timeout -s INT -k 15 "$BENCH_LIMIT" "$PY" bench/gpu_step.py $BENCH_ARGS --only "$part" 2>&1 | tee -a "$OUT/gpu_bench.log"
    BENCH_RC="$BENCH_RC $part=$?"
    grep -q "needs a CUDA device" "$OUT/gpu_bench.log" && break
done

section "summary"
counts=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error|errors|deselected)|(passed|failed|skipped|error|errors) in [0-9.]+s' \
         "$OUT/gpu_tests.log" | tail -1)
echo "tests (rc=$TEST_RC): ${counts:-no pytest summary line (killed?)}"
[ -s "$OUT/gpu_tests.xml" ] && "$PY" - "$OUT/gpu_tests.xml" <<'EOF' 2>&1
import collections, sys, xml.etree.ElementTree as ET
counts = collections.defaultdict(collections.Counter)
for case in ET.parse(sys.argv[1]).iter("testcase"):
    where = "tests/kernels/test_cuda_parity.py" if "test_cuda_parity" in case.get("classname", "") else "tests/gpu"
    kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
    counts[where][kinds[0] if kinds else "passed"] += 1
for where, c in sorted(counts.items()):
    print(f"  {where}: " + ", ".join(f"{c[k]} {k}" for k in ("passed", "failure", "error", "skipped")))
EOF
grep -E '^(FAILED|ERROR) ' "$OUT/gpu_tests.log" | sed 's/^/  /'
echo "bench (rc:$BENCH_RC):"
grep -E '^device: |^adamw |^trainer peak' "$OUT/gpu_bench.log" | sed 's/^/  /'
grep -E 'Error|Traceback|Timeout' "$OUT/gpu_bench.log" | head -10 | sed 's/^/  ! /'
echo "done $(date -u +%FT%TZ)"
# Passes only when every test passed (none failed or errored) and every benchmark part ran to the end.
case "$TEST_RC $BENCH_RC" in
    "0 "*) [[ "$BENCH_RC" =~ =[1-9] ]] && { echo "gpu-check: FAILED (a benchmark part)"; exit 1; } ;;
    *) echo "gpu-check: FAILED (tests)"; exit 1 ;;
esac
echo "gpu-check: passed"
