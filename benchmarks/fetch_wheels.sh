#!/usr/bin/env bash
# Fill wheels/ (gitignored) with what benchmarks/gpu_suite.sh installs offline on a GPU machine
# (CPython 3.12, manylinux x86_64, no network there): omegaconf + antlr4 runtime, FFCV (self-contained wheel
# built by ../shared/tools/build_ffcv_wheel.sh) and FFCV's small pure-Python needs.
# Usage: bash benchmarks/fetch_wheels.sh [WHEEL_DIR]   (default: wheels/ at the repository root)
# Carry it to the GPU machine with the tree (device tool: carry=["wheels"]).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(realpath -m "${1:-$ROOT/wheels}")
PY=${PYTHON:-python3}
mkdir -p "$W"
# name==version as the GPU side needs them (omegaconf 2.3 pins antlr4 4.9.*).
PKGS=(omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 terminaltables fastargs assertpy psutil pytorch-pfn-extras)
for spec in "${PKGS[@]}"; do
  name=${spec%%==*}
  stem=$(echo "$name" | tr '-' '_')
  if ls "$W"/"$stem"-*.whl >/dev/null 2>&1 || ls "$W"/"$name"-*.whl >/dev/null 2>&1; then
    echo "[wheels] have $name"; continue
  fi
  if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
       --implementation cp -d "$W" "$spec" 2>/dev/null; then
    echo "[wheels] downloaded $spec"
  else
    # sdist-only (pure Python, e.g. antlr4 4.9.3, fastargs): build a py3-none-any wheel here.
    "$PY" -m pip wheel -q --no-deps -w "$W" "$spec"
    echo "[wheels] built $spec from its sdist"
  fi
done
if ! ls "$W"/ffcv-*.whl >/dev/null 2>&1; then
  TOOL="$ROOT/../shared/tools/build_ffcv_wheel.sh"
  [ -f "$TOOL" ] || { echo "[wheels] $TOOL not found: no ffcv wheel (the GPU run will skip ffcv)"; exit 0; }
  if ! [ -f /usr/include/turbojpeg.h ] || ! [ -f /usr/lib/x86_64-linux-gnu/libopencv_core.a ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libopencv-core-dev libopencv-imgproc-dev libturbojpeg0-dev >/dev/null
    else
      echo "[wheels] need: apt-get install libopencv-core-dev libopencv-imgproc-dev libturbojpeg0-dev"; exit 1
    fi
  fi
  bash "$TOOL" "$W" "$PY" >/dev/null
  echo "[wheels] built the ffcv wheel"
fi
ls -la "$W"
total=$(du -sb "$W" | cut -f1)
echo "[wheels] total $((total / 1024)) KiB in $W"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then echo "[wheels] over 60 MiB: too big to carry"; exit 1; fi
