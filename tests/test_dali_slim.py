"""benchmarks/dali_slim.py: the slimmed DALI bundle must keep the target's cubins byte for byte in a fat
binary the CUDA tools still read, leave the rest of each library untouched, and install offline with its
dependencies (benchmarks/dali_pieces.sh install)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks import dali_slim as ds

PIECES = Path(__file__).resolve().parents[1] / "benchmarks" / "dali_pieces.sh"


# ---------------------------------------------------------------- synthetic ELF with a .nv_fatbin section
def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    """An entry header as nvcc writes it (64 bytes; kind, header size, payload size, arch at 28)."""
    head = bytearray(64)
    struct.pack_into("<HHIQ", head, 0, kind, 0x0101, 64, len(payload))
    struct.pack_into("<I", head, 28, arch)
    return bytes(head) + payload


def _blob(entries: list[bytes]) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", ds.FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf(section: bytes, host: bytes = b"host code " * 10) -> tuple[bytes, int]:
    """A minimal ELF64 file: host bytes, a .nv_fatbin section, a section-name table, section headers.
    Returns (file, offset of the section)."""
    names = b"\0.nv_fatbin\0.shstrtab\0"
    sec_off = 64 + len(host)
    names_off = sec_off + len(section)
    shoff = names_off + len(names)
    shoff += -shoff % 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    shdrs = bytes(64)  # the null section
    shdrs += struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, sec_off, len(section), 0, 0, 8, 0)
    shdrs += struct.pack("<IIQQQQIIQQ", 12, 3, 0, 0, names_off, len(names), 0, 0, 1, 0)
    data = head + host + section + names
    return data + bytes(shoff - len(data)) + shdrs, sec_off


def test_prune_keeps_the_target_cubins_byte_for_byte(tmp_path: Path) -> None:
    sm80, sm90a, sm90b, ptx = (os.urandom(n) for n in (40, 48, 24, 32))
    mixed = _blob([_entry(2, 80, sm80), _entry(2, 90, sm90a), _entry(1, 120, ptx), _entry(2, 90, sm90b)])
    ptx_only = _blob([_entry(1, 120, ptx)])  # no sm_90 cubin: the driver would JIT this PTX, so it stays
    section = mixed + bytes(16) + ptx_only  # blobs padded apart
    data, sec_off = _elf(section)
    lib = tmp_path / "libx.so"
    lib.write_bytes(data)

    freed = ds.prune_fatbins(lib, 90)
    assert freed == (64 + 40) + (64 + 32)
    out = lib.read_bytes()
    assert len(out) == len(data)
    assert out[:sec_off] == data[:sec_off] and out[sec_off + len(section) :] == data[sec_off + len(section) :]
    blobs = list(ds.fatbins(out, *ds.fatbin_section(out)))  # type: ignore[misc]
    assert [p - sec_off for p, _ in blobs] == [0, len(mixed) + 16]  # both blobs where they were
    (_, first), (_, second) = blobs
    assert [(e.kind, e.arch) for e in first] == [(2, 90), (2, 90)]
    assert [out[e.start : e.end] for e in first] == [sm90a, sm90b]
    assert out[first[-1].end : sec_off + len(mixed)] == bytes(freed)  # the freed space is zeros
    assert [(e.kind, e.arch) for e in second] == [(1, 120)]
    assert out[second[0].start : second[0].end] == ptx
    assert ds.prune_fatbins(lib, 90) == 0  # already slim


def test_files_without_fat_binaries_are_left_alone(tmp_path: Path) -> None:
    text = tmp_path / "a.py"
    text.write_bytes(b"print('hi')\n")
    assert ds.prune_fatbins(text, 90) == 0 and text.read_bytes() == b"print('hi')\n"
    assert ds.fatbin_section(b"\x7fELF") is None


def _libdali_kernels() -> Path | None:
    try:
        import nvidia.dali as dali
    except Exception:
        return None
    lib = Path(dali.__file__).parent / "libdali_kernels.so"
    return lib if lib.exists() else None


def _cuobjdump() -> str | None:
    try:
        import triton
    except Exception:
        return shutil.which("cuobjdump")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.exists() else shutil.which("cuobjdump")


def test_a_real_dali_library_still_reads_as_an_sm90_fat_binary(tmp_path: Path) -> None:
    """NVIDIA's own cuobjdump lists only sm_90 in the slimmed libdali_kernels.so and extracts a cubin
    identical to the one it extracts from the original (the cubins are compressed: this is what the
    driver will decompress). Where the installed DALI is itself the slimmed build (dali_pieces.sh
    installed it), slimming again must change nothing."""
    lib, tool = _libdali_kernels(), _cuobjdump()
    if lib is None or tool is None:
        pytest.skip("needs DALI installed and cuobjdump (Triton ships one)")

    def only_sm90(path: Path) -> bool:
        listing = subprocess.run(
            [tool, "-lelf", str(path)], capture_output=True, text=True, check=True
        ).stdout
        assert listing.strip(), f"cuobjdump lists no cubin in {path}"
        return all("sm_90" in line for line in listing.strip().splitlines())

    slim = tmp_path / "slim" / lib.name
    slim.parent.mkdir()
    shutil.copy(lib, slim)
    if only_sm90(lib):  # already slimmed: idempotent
        assert ds.prune_fatbins(slim, 90) == 0 and slim.read_bytes() == lib.read_bytes()
        return
    assert ds.prune_fatbins(slim, 90) > 0
    assert only_sm90(slim)

    def sm90(path: Path, where: Path) -> bytes:
        where.mkdir()
        subprocess.run([tool, "-xelf", "sm_90", str(path)], cwd=where, capture_output=True, check=True)
        (cubin,) = where.glob("*.cubin")
        return cubin.read_bytes()

    assert sm90(slim, tmp_path / "x_slim") == sm90(lib, tmp_path / "x_orig")


# ---------------------------------------------------------------- wheels and the offline install
def _wheel(where: Path, name: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    dist = f"{name}-1.0.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    files = {
        **files,
        f"{dist}/METADATA": meta.encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = where / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arc, content in files.items():
            z.writestr(arc, content)
        z.writestr(f"{dist}/RECORD", "")  # stale on purpose: slim_wheel must write a true one
    return path


def test_slim_wheel_drops_other_pythons_and_writes_a_true_record(tmp_path: Path) -> None:
    data, _ = _elf(_blob([_entry(2, 75, b"a" * 40), _entry(2, 90, b"b" * 40)]))
    src = _wheel(
        tmp_path,
        "pkg",
        {
            "pkg/__init__.py": b"",
            "pkg/lib.so": data,
            "pkg/ext.cpython-310-x86_64-linux-gnu.so": b"old",
            "pkg/ext.cpython-312-x86_64-linux-gnu.so": b"new",
            "pkg/ext.cpython-313t-x86_64-linux-gnu.so": b"free-threaded",
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    freed, dropped = ds.slim_wheel(src, out, 90, {"3.12"})
    assert (freed, dropped) == (64 + 40, 2)
    with zipfile.ZipFile(out / src.name) as z:
        names = set(z.namelist())
        assert "pkg/ext.cpython-312-x86_64-linux-gnu.so" in names
        assert not any("cpython-310" in n or "cpython-313" in n for n in names)
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        record = z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
        rows = {r.split(",")[0]: r for r in record}
        assert set(rows) == names
        for arc, row in rows.items():
            if arc.endswith("RECORD"):
                continue
            blob = z.read(arc)
            digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()
            assert row == f"{arc},sha256={digest},{len(blob)}"


def _pieces(pieces: Path, *args: str, python: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DALI_PIECES_DIR": str(pieces), "DALI_PIECE_SIZE": "700"}
    if python:
        env["PYTHON"] = python
    return subprocess.run(["bash", str(PIECES), *args], capture_output=True, text=True, env=env)


def test_a_bundle_travels_in_pieces_and_installs_offline_with_its_dependencies(tmp_path: Path) -> None:
    """The install step of the GPU session: join the pieces, unpack the bundle, let pip resolve DALI's
    dependencies from it alone (--no-index), then import nvidia.dali. A stand-in DALI that needs a
    stand-in dependency plays the real one, into a throwaway virtual environment."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    standin = {"nvidia/dali/__init__.py": b"__version__ = 'standin'\n"}
    _wheel(wheels, "nvidia_dali_standin", standin, ("depx",))
    _wheel(wheels, "depx", {"depx/__init__.py": os.urandom(1500)})  # incompressible: several pieces
    bundle = tmp_path / "dali-bundle-test.tar.xz"
    with tarfile.open(bundle, "w:xz") as tar:
        for w in wheels.iterdir():
            tar.add(w, arcname=w.name)
    pieces = tmp_path / "pieces"
    assert _pieces(pieces, "split", str(bundle)).returncode == 0
    assert len(list(pieces.iterdir())) >= 2

    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True)
    out = _pieces(pieces, "install", python=str(env / "bin" / "python"))
    assert out.returncode == 0, out.stderr
    assert "nvidia.dali standin installed" in out.stdout
    assert not (pieces / "bundle").exists()  # unpacked files cleaned up

    (pieces / "1" / "SHA256").write_text("0" * 64 + "\n")
    bad = _pieces(pieces, "install", python=str(env / "bin" / "python"))
    assert bad.returncode == 2 and "checksum mismatch" in bad.stderr
