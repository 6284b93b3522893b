#!/usr/bin/env bash
# The GPU check, in under 8 minutes, offline: install the carried wheels, print device facts, run the CUDA
# tests, then the full throughput benchmark. Everything lands flat in OUTDIR (at most 8 files):
#   suite.log (this script's whole output) · device.txt · pytest.txt · results.json · results.md · chart.png
#   · trace.json.gz (torch.profiler, Chrome format)
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_suite.sh [OUTDIR]   (default: $OUT)
# Fill wheels/ first on a networked machine: bash benchmarks/fetch_wheels.sh (and carry wheels/ along).
# Name the commit you sent (a copied tree's git metadata may lag its files; results.json records this):
#   FASTVPD_GIT_COMMIT=1a2b3c4 bash benchmarks/gpu_suite.sh
# The calls a GPU session makes (docs/gpu-runs.md, "The planned calls"): BENCH_ARGS="--compile ..."
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUTDIR=$(realpath -m "${1:-${OUT:-$ROOT/benchmarks/results/gpu-suite}}")
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
START=$SECONDS
BUDGET=${SUITE_BUDGET_S:-470}  # whole suite; each stage gets a `timeout` so a hang cannot eat it
exec > >(tee -a "$OUTDIR/suite.log") 2>&1
export PYTHONUNBUFFERED=1  # a stage killed by its timeout still leaves what it printed (run 2 lost pytest's)
left() { echo $((BUDGET - (SECONDS - START))); }
stage() { echo; echo "=== [$((SECONDS - START)) s] $*"; }

stage "install carried wheels (offline)"
if ls wheels/*.whl >/dev/null 2>&1; then
  # DALI only if a wheel travelled; never the network.
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check wheels/*.whl \
    || echo "wheel install failed (continuing: missing pieces are skipped by the benchmark)"
else
  echo "no wheels/ folder: omegaconf/ffcv missing unless already installed (run benchmarks/fetch_wheels.sh)"
fi
if [ -f "${DALI_PIECES_DIR:-dali_pieces}/1/COUNT" ]; then  # DALI and its deps travel in pieces (dali_pieces.sh)
  if "$PY" -c 'import nvidia.dali' 2>/dev/null; then
    echo "DALI already installed (an earlier call on this machine)"
  else  # with pieces still to come, install says which and stops
    PYTHON="$PY" timeout 240 bash benchmarks/dali_pieces.sh install || echo "DALI not installed (continuing)"
  fi
fi
if ! timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e . \
    2>/dev/null; then
  echo "editable install unavailable: using PYTHONPATH=$ROOT"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

stage "device facts"
{
  nvidia-smi || echo "nvidia-smi not found"
  timeout 60 "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"| {p.total_memory / 2**30:.1f} GiB | sm {p.major}.{p.minor}",
          f"| {p.multi_processor_count} SMs")
else:
    print("no CUDA device visible")
for mod in ("omegaconf", "ffcv", "nvidia.dali", "pynvml", "psutil", "numba", "cv2", "matplotlib"):
    try:
        m = __import__(mod, fromlist=["_"])
        print(f"{mod}: {getattr(m, '__version__', 'ok')}")
    except Exception as e:
        print(f"{mod}: MISSING ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
PY
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
} 2>&1 | tee "$OUTDIR/device.txt"

stage "pytest -m cuda"
if [ -n "${SKIP_PYTEST:-}" ]; then
  echo "skipped (SKIP_PYTEST set)"
else
  # -v: one line per test as it ends, so a run cut off by the timeout still shows which passed
  # PYTEST_K (a -k expression) runs a subset, e.g. the DALI tests once its pieces have arrived
  timeout $(( $(left) < 300 ? $(left) / 2 : 150 )) "$PY" -m pytest -m cuda ${PYTEST_K:+-k "$PYTEST_K"} -v \
    --durations=8 -p no:cacheprovider tests 2>&1 | tee "$OUTDIR/pytest.txt" | tail -40
  echo "pytest exit: ${PIPESTATUS[0]} (124 = timed out)"
fi

stage "throughput benchmark (full, with --profile)"
T=$(( $(left) - 15 ))
if [ "$T" -lt 60 ]; then
  echo "only $T s left: running the quick benchmark"
  timeout "$(( T > 20 ? T : 20 ))" "$PY" benchmarks/throughput.py --quick --out "$OUTDIR"
else
  timeout "$T" "$PY" benchmarks/throughput.py --profile --out "$OUTDIR" ${BENCH_ARGS:-}
fi
echo "benchmark exit: $? (124 = timed out)"

stage "done"
ls -la "$OUTDIR"
