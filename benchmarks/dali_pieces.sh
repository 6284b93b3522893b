#!/usr/bin/env bash
# DALI's wheel (about 189 MiB) is too big for one device call, which carries at most 64 MiB of ignored
# files. So: split it here into pieces of at most 60 MiB, carry one piece per call while the machine stays
# warm (ignored files already on it are kept between calls), and join, check and install it with the last.
#
#   here:    bash benchmarks/dali_pieces.sh split [WHEEL]  -> dali_pieces/1 ... dali_pieces/N (gitignored;
#            without WHEEL, pip downloads DALI_PKG)
#   device:  call k carries ["dali_pieces/k"] (call 1 may also carry "wheels"); with the last piece,
#            bash benchmarks/dali_pieces.sh install    (gpu_suite.sh does this itself once all are there)
#   either:  bash benchmarks/dali_pieces.sh status     -> which pieces are present
#            bash benchmarks/dali_pieces.sh join       -> the checked wheel, rebuilt in dali_pieces/
#
# DALI_PKG picks the wheel (default nvidia-dali-cuda130==2.4.0; its wheels are py3-none, so one serves the
# dev machine's Python 3.11 and the GPU machine's 3.12). PYTHON picks the interpreter that installs it.
# DALI_PIECES_DIR (default dali_pieces/) and DALI_PIECE_SIZE (default 60M, split -b syntax) are for tests.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${DALI_PIECES_DIR:-$ROOT/dali_pieces}
PKG=${DALI_PKG:-nvidia-dali-cuda130==2.4.0}
PY=${PYTHON:-python3}
PIECE=${DALI_PIECE_SIZE:-60M}

die() { echo "dali_pieces: $*" >&2; exit 2; }

count() { [ -f "$DIR/1/COUNT" ] || die "no dali_pieces/1 here (it carries COUNT, NAME and SHA256: carry it first)"; cat "$DIR/1/COUNT"; }

missing() {
  local n k out=""
  n=$(count)
  for k in $(seq 1 "$n"); do ls "$DIR/$k"/part.* >/dev/null 2>&1 || out="$out $k"; done
  echo "${out# }"
}

join() {  # rebuild the wheel from its pieces and check it; prints its path
  local n m name
  n=$(count)
  m=$(missing)
  [ -z "$m" ] || die "pieces missing: $m (carry them in later calls while the machine is warm)"
  name=$(cat "$DIR/1/NAME")
  for k in $(seq 1 "$n"); do cat "$DIR/$k"/part.*; done > "$DIR/$name"  # piece k holds part k-1
  if ! echo "$(cat "$DIR/1/SHA256")  $DIR/$name" | sha256sum -c --quiet - >/dev/null 2>&1; then
    rm -f "$DIR/$name"
    die "checksum mismatch: a piece is damaged"
  fi
  echo "$DIR/$name"
}

case "${1:-}" in
  split)
    rm -rf "$DIR" && mkdir -p "$DIR/src"
    if [ -n "${2:-}" ]; then
      [ -f "$2" ] || die "no such wheel: $2"
      cp "$2" "$DIR/src/"
    else
      echo "downloading $PKG (no dependencies) ..."
      "$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$DIR/src" "$PKG" \
        || die "pip could not download $PKG"
    fi
    whl=$(ls "$DIR"/src/* | head -1)
    name=$(basename "$whl")
    (cd "$DIR/src" && split -b "$PIECE" -d -a 2 "$name" part.)
    n=0
    for p in "$DIR"/src/part.*; do
      n=$((n + 1))
      mkdir -p "$DIR/$n" && mv "$p" "$DIR/$n/"
    done
    sha256sum "$whl" | cut -d' ' -f1 > "$DIR/1/SHA256"
    echo "$name" > "$DIR/1/NAME"
    echo "$n" > "$DIR/1/COUNT"
    rm -rf "$DIR/src"
    du -sh "$DIR"/*/
    echo "carry dali_pieces/1 ... dali_pieces/$n, one per device call; install with the last"
    ;;
  status)
    n=$(count)
    m=$(missing)
    echo "$(cat "$DIR/1/NAME"): $n pieces; missing: ${m:-none}"
    ;;
  join)
    join
    ;;
  install)
    whl=$(join)
    "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check "$whl"
    rm -f "$whl"
    "$PY" -c 'import nvidia.dali as d; print("nvidia.dali", d.__version__, "installed")'
    ;;
  *)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
