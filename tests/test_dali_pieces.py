"""benchmarks/dali_pieces.sh: DALI's wheel crosses to the GPU machine in pieces, one per call; the joined
file must be the wheel, byte for byte, and a missing or damaged piece must stop the install."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dali_pieces.sh"


def _run(pieces: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DALI_PIECES_DIR": str(pieces), "DALI_PIECE_SIZE": "1000"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_split_status_join_and_damage(tmp_path: Path) -> None:
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    wheel.write_bytes(os.urandom(2500))
    pieces = tmp_path / "pieces"
    assert _run(pieces, "split", str(wheel)).returncode == 0
    assert sorted(p.name for p in pieces.iterdir()) == ["1", "2", "3"]  # 1000 + 1000 + 500 bytes
    assert "3 pieces; missing: none" in _run(pieces, "status").stdout

    (pieces / "2").rename(tmp_path / "held")  # a piece still to come
    assert "missing: 2" in _run(pieces, "status").stdout
    out = _run(pieces, "join")
    assert out.returncode == 2 and "pieces missing: 2" in out.stderr
    (tmp_path / "held").rename(pieces / "2")

    joined = _run(pieces, "join")
    assert joined.returncode == 0 and Path(joined.stdout.strip()).read_bytes() == wheel.read_bytes()

    part = next((pieces / "3").glob("part.*"))
    damaged = bytearray(part.read_bytes())
    damaged[-1] ^= 0xFF  # one flipped byte in transit
    part.write_bytes(bytes(damaged))
    bad = _run(pieces, "join")
    assert bad.returncode == 2 and "checksum mismatch" in bad.stderr


def test_without_pieces_or_command_it_says_what_to_do(tmp_path: Path) -> None:
    none = _run(tmp_path / "absent", "status")
    assert none.returncode == 2 and "carry it first" in none.stderr
    usage = _run(tmp_path, "nonsense")
    assert usage.returncode == 2 and "split" in usage.stdout
