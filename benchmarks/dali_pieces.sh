#!/usr/bin/env bash
# DALI on the offline GPU machine. DALI's wheel is 189 MiB and needs packages that machine lacks (optree,
# gast, ..., and nvImageCodec with nvJPEG, through which DALI decodes even on the CPU), while a device call
# carries at most 64 MiB of ignored files. So: `split` builds one slimmed bundle of DALI and its dependency
# closure (benchmarks/dali_slim.py: cubins for sm_90 only, one Python; 77 MiB), cuts it into pieces of at
# most 54 MiB, and each device call carries one piece while the machine stays warm (ignored files already
# on it are kept between calls); the call with the last piece joins, checks and installs it.
#
#   here:    bash benchmarks/dali_pieces.sh split [FILE]  -> dali_pieces/1 ... dali_pieces/N (gitignored;
#            without FILE it builds the bundle, which needs PyPI; FILE: a bundle or a wheel made before)
#   device:  call k carries ["dali_pieces/k"] (call 1 also "wheels"); with the last piece,
#            bash benchmarks/dali_pieces.sh install    (gpu_suite.sh does this itself once all are there)
#   either:  bash benchmarks/dali_pieces.sh status     -> which pieces are present
#            bash benchmarks/dali_pieces.sh join       -> the checked file, rebuilt in dali_pieces/
#
# DALI_PKG picks the package (default nvidia-dali-cuda130==2.4.0), DALI_PY the Python it is for (default
# 3.12, the GPU machine's), DALI_SM the GPU architecture kept (default 90: H100, H200). PYTHON picks the
# interpreter that builds or installs it. DALI_PIECES_DIR (default dali_pieces/) and DALI_PIECE_SIZE
# (default 54M, split -b syntax) are for tests.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${DALI_PIECES_DIR:-$ROOT/dali_pieces}
PKG=${DALI_PKG:-nvidia-dali-cuda130==2.4.0}
TARGET_PY=${DALI_PY:-3.12}
SM=${DALI_SM:-90}
PY=${PYTHON:-python3}
PIECE=${DALI_PIECE_SIZE:-54M}  # + the tracked tree (4 MiB) + wheels/ (2 MiB): under 64 MiB a call

die() { echo "dali_pieces: $*" >&2; exit 2; }

count() { [ -f "$DIR/1/COUNT" ] || die "no dali_pieces/1 here (it carries COUNT, NAME and SHA256: carry it first)"; cat "$DIR/1/COUNT"; }

missing() {
  local n k out=""
  n=$(count)
  for k in $(seq 1 "$n"); do ls "$DIR/$k"/part.* >/dev/null 2>&1 || out="$out $k"; done
  echo "${out# }"
}

join() {  # rebuild the file (bundle or wheel) from its pieces and check it; prints its path
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
      [ -f "$2" ] || die "no such file: $2"
      cp "$2" "$DIR/src/"
    else
      DALI_PKG="$PKG" "$PY" "$ROOT/benchmarks/dali_slim.py" build "$DIR/src" --python "$TARGET_PY" --arch "$SM" \
        || die "could not build the DALI bundle (see above)"
    fi
    file=$(ls "$DIR"/src/* | head -1)  # the bundle or the wheel
    name=$(basename "$file")
    (cd "$DIR/src" && split -b "$PIECE" -d -a 2 "$name" part.)
    n=0
    for p in "$DIR"/src/part.*; do
      n=$((n + 1))
      mkdir -p "$DIR/$n" && mv "$p" "$DIR/$n/"
    done
    sha256sum "$file" | cut -d' ' -f1 > "$DIR/1/SHA256"
    echo "$name" > "$DIR/1/NAME"
    echo "$n" > "$DIR/1/COUNT"
    rm -rf "$DIR/src"
    du -sh "$DIR"/*/
    echo "carry dali_pieces/1 ... dali_pieces/$n, one per device call; install with the last"
    if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then  # what call 1 moves: tree + wheels/ + piece 1
      tree=$(cd "$ROOT" && { git ls-files -z | xargs -0 cat 2>/dev/null || true; } | wc -c)
      extra=$({ cat "$ROOT"/wheels/*.whl "$DIR"/1/* 2>/dev/null || true; } | wc -c)  # wheels/ may be absent
      echo "call 1 with wheels/ carries $(( (tree + extra) / 1048576 )) MiB of the 64 MiB a call may move"
    fi
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
    f=$(join)
    if [[ "$f" == *.tar.xz ]]; then  # the bundle: DALI and every dependency this machine lacks
      rm -rf "$DIR/bundle" && mkdir -p "$DIR/bundle"
      tar -C "$DIR/bundle" -xJf "$f" || die "could not unpack $(basename "$f")"
      rm -f "$f"
      whl=$(ls "$DIR"/bundle/nvidia_dali*.whl 2>/dev/null | head -1)
      [ -n "$whl" ] || die "no DALI wheel in the bundle"
      find="$DIR/bundle"
    else  # a bare wheel: its dependencies must already be installed
      whl=$f
      find=$(dirname "$f")
    fi
    "$PY" -m pip install -q --no-index --find-links "$find" --disable-pip-version-check "$whl" \
      || die "pip could not install $(basename "$whl") offline (a dependency missing from the bundle?)"
    rm -rf "$DIR/bundle" "$f"
    "$PY" -c 'import nvidia.dali as d; print("nvidia.dali", d.__version__, "installed")'
    ;;
  *)
    sed -n '2,19p' "$0"
    exit 2
    ;;
esac
