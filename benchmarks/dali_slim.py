"""A self-contained, slimmed DALI install bundle for the offline GPU machine.

Why: the GPU machine has no network and no DALI, a device call carries at most 64 MiB, and DALI's wheel
alone is 189 MiB. Worse, that wheel is not enough: DALI imports `optree`, `gast`, `astunparse`, ... and
decodes, even on the CPU, through nvImageCodec (`nvidia-nvimgcodec-cu13[all]`: nvJPEG, nvJPEG2000,
nvTIFF, nvCOMP), none of which that machine has. So this script downloads DALI's whole dependency
closure for the GPU machine's Python, and makes it small without changing any code that runs there:

- every CUDA fat binary (`.nv_fatbin` ELF section) is rewritten in place to hold only its cubins for
  the target architecture (sm_90: H100 and H200), as `nvcc -gencode arch=compute_90,code=sm_90` would
  have built it: its header counts only those entries, moved up behind it byte for byte, and the space
  the other architectures' cubins and the PTX took is zeroed. Nothing else in the library moves, and
  the blob still starts where the host code's registration points. A fat binary with no cubin for the
  target is left whole (the driver would need its PTX);
- extension modules built for other Python versions are dropped (`--pythons`);
- the wheels are re-zipped uncompressed with a fresh RECORD, tarred and compressed with xz, which turns
  the zeros into nothing.

The result (`dali-bundle-*.tar.xz`, 77 MiB against 260 MiB of wheels) is what `dali_pieces.sh split`
cuts into pieces. Usage (dev machine, with PyPI or a mirror):

    python benchmarks/dali_slim.py build OUTDIR [--python 3.12] [--arch 90] [--pythons 3.12]
    python benchmarks/dali_slim.py fatbins LIB.so ...      # what a library's fat binaries hold
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
DALI_PKG = "nvidia-dali-cuda130==2.4.0"
# On the GPU machine already (docs/gpu-runs.md: Python 3.12 with torch, numpy, pyyaml, ...): not carried.
SKIP = ("numpy", "pyyaml", "typing_extensions")
_EXT = re.compile(r"\.cpython-(\d)(\d+)t?-")


@dataclass(frozen=True)
class Entry:
    """One image in a fat binary: a cubin (ELF) or PTX for one architecture. Its header starts at `head`,
    its payload (compressed or not) is [start, end)."""

    kind: int
    arch: int
    head: int
    start: int
    end: int

    @property
    def label(self) -> str:
        return f"{'ptx' if self.kind == KIND_PTX else 'elf'} sm_{self.arch}"


def fatbin_section(data: bytes) -> tuple[int, int] | None:
    """(offset, size) of the `.nv_fatbin` section of a 64-bit little-endian ELF file, or None."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0:
        return None

    def header(i: int) -> tuple[int, ...]:  # sh_name, type, flags, addr, offset, size
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)

    names = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        end = data.index(b"\0", names + h[0])
        if data[names + h[0] : end] == b".nv_fatbin":
            return h[4], h[5]
    return None


def fatbins(data: bytes, offset: int, size: int) -> Iterator[tuple[int, list[Entry]]]:
    """The fat binaries in a section (blobs padded apart), each as (its offset, its entries).

    Layout (nvcc's fatbin): a header (magic u32, version u16, header size u16, entries' size u64), then
    the entries, each a header (kind u16, ?, header size u32, payload size u64, ..., arch u32 at 28)
    followed by its payload.
    """
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos, stop = offset, offset + size
    while (pos := data.find(magic, pos, stop)) >= 0:  # skips the padding between blobs
        _, _, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        e, end, blob = pos + hsize, pos + hsize + fsize, []
        while e < end:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", data, e)
            (arch,) = struct.unpack_from("<I", data, e + 28)
            blob.append(Entry(kind, arch, e, e + ehsize, e + ehsize + psize))
            e += ehsize + psize
        if e != end or end > stop:
            raise ValueError(f"malformed fat binary at {pos:#x}: its entries overrun it")
        yield pos, blob
        pos = end


def prune_fatbins(path: Path, arch: int) -> int:
    """Keep only the sm_`arch` cubins in `path`'s fat binaries, in place; returns the bytes freed."""
    data = path.read_bytes()
    sec = fatbin_section(data)
    if sec is None:
        return 0
    out, freed = bytearray(data), 0
    for pos, blob in fatbins(data, *sec):
        keep = [e for e in blob if e.kind == KIND_ELF and e.arch == arch]
        if not keep or len(keep) == len(blob):
            continue  # no cubin for the target (its PTX may be what runs), or nothing else to drop
        magic, version, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        body = b"".join(data[e.head : e.end] for e in keep)
        new = struct.pack("<IHHQ", magic, version, hsize, len(body)) + data[pos + 16 : pos + hsize] + body
        end = pos + hsize + fsize
        out[pos:end] = new + bytes(end - pos - len(new))
        freed += fsize - len(body)
    if freed:
        path.write_bytes(bytes(out))
    return freed


def _record_line(root: Path, f: Path) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_bytes()).digest()).rstrip(b"=").decode()
    return f"{f.relative_to(root).as_posix()},sha256={digest},{f.stat().st_size}"


def slim_wheel(src: Path, dst_dir: Path, arch: int, pythons: set[str]) -> tuple[int, int]:
    """Rewrite wheel `src` into `dst_dir` (same name): fat binaries cut to sm_`arch`, extension modules
    for Pythons outside `pythons` ("3.12", ...) dropped, a fresh RECORD, stored uncompressed (xz packs
    the tar better than deflate). Returns (bytes freed in fat binaries, files dropped)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(src) as z:
            z.extractall(root)
        freed = dropped = 0
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            m = _EXT.search(f.name)
            if m and f"{m[1]}.{m[2]}" not in pythons:
                f.unlink()
                dropped += 1
                continue
            freed += prune_fatbins(f, arch)  # 0 for a file that is no ELF or has no fat binary
        records = list(root.glob("*.dist-info/RECORD"))
        if len(records) != 1:
            raise ValueError(f"{src.name}: expected one .dist-info/RECORD, found {len(records)}")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p != records[0])
        lines = [_record_line(root, f) for f in files]
        lines.append(f"{records[0].relative_to(root).as_posix()},,")
        records[0].write_text("\n".join(lines) + "\n")
        with zipfile.ZipFile(dst_dir / src.name, "w", zipfile.ZIP_STORED) as z:
            for f in files + records:
                z.write(f, f.relative_to(root).as_posix())
    return freed, dropped


def _skipped(wheel: Path) -> bool:
    return wheel.name.split("-", 1)[0].lower() in SKIP


def build(out: Path, python: str, arch: int, pythons: set[str], pkg: str) -> Path:
    """Download `pkg` and its closure for `python`, slim every wheel, and pack them into one tar.xz."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        dl, slim = Path(tmp) / "dl", Path(tmp) / "bundle"
        slim.mkdir()
        tag = python.replace(".", "")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(dl)]
        cmd += ["--python-version", python, "--implementation", "cp"]
        cmd += ["--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none"]
        for plat in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1"):
            cmd += ["--platform", f"{plat}_x86_64"]
        print(f"downloading {pkg} and its dependencies for Python {python} ...", flush=True)
        if subprocess.run([*cmd, pkg]).returncode:
            raise SystemExit(f"dali_slim: pip could not download {pkg} (needs PyPI or a mirror)")
        for whl in sorted(dl.glob("*.whl")):
            if _skipped(whl):
                print(f"  skip  {whl.name} (already on the GPU machine)")
                continue
            freed, dropped = slim_wheel(whl, slim, arch, pythons)
            gone = f"{freed / 2**20:.1f} MiB of other targets' GPU code, {dropped} files dropped"
            print(f"  slim  {whl.name}: {gone}")
        target = out / f"dali-bundle-{pkg.split('==')[-1]}-py{tag}-sm{arch}.tar.xz"
        print(f"packing {target.name} (xz -9, a few minutes) ...", flush=True)
        with target.open("wb") as fh:
            tar = subprocess.Popen(["tar", "-C", str(slim), "-cf", "-", "."], stdout=subprocess.PIPE)
            xz = subprocess.run(["xz", "-9", "-T0", "-c"], stdin=tar.stdout, stdout=fh)
            if tar.wait() or xz.returncode:
                target.unlink(missing_ok=True)
                raise SystemExit("dali_slim: tar | xz failed")
    print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB")
    return target


def describe(paths: list[Path]) -> None:
    """Print, per library, the MiB each (kind, arch) takes in its fat binaries."""
    for p in paths:
        data = p.read_bytes()
        sec = fatbin_section(data)
        if sec is None:
            print(f"{p}: no .nv_fatbin section")
            continue
        sizes: collections.Counter[str] = collections.Counter()
        for _, blob in fatbins(data, *sec):
            for e in blob:
                sizes[e.label] += e.end - e.start
        print(f"{p}: {sec[1] / 2**20:.1f} MiB of fat binaries")
        for label, n in sorted(sizes.items()):
            print(f"  {label:<10} {n / 2**20:8.2f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, slim and pack DALI with its dependencies")
    b.add_argument("out", type=Path)
    b.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    b.add_argument("--arch", type=int, default=90, help="the cubins to keep: sm_ARCH (default 90)")
    b.add_argument("--pythons", default="", help="more Pythons whose extension modules stay (3.11,...)")
    b.add_argument("--pkg", default=os.environ.get("DALI_PKG", DALI_PKG))
    d = sub.add_parser("fatbins", help="what a library's fat binaries hold")
    d.add_argument("libs", type=Path, nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "fatbins":
        describe(a.libs)
        return 0
    if not shutil.which("xz"):
        print("dali_slim: xz not found (apt-get install xz-utils)", file=sys.stderr)
        return 2
    build(a.out, a.python, a.arch, {a.python, *filter(None, a.pythons.split(","))}, a.pkg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
