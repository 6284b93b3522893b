"""WebDataset tar shards with DALI v1.2 index files, one set per split."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from fastvpd.convert import files
from fastvpd.convert.decode import imap, load_rgb, read_bytes
from fastvpd.convert.scan import Split


def wds_job(args: tuple[str, bool, int]) -> bytes:
    """JPEG bytes for the tar: the original file when it is a baseline RGB JPEG, else a re-encode."""
    path, copy, quality = args
    data = read_bytes(path)
    if copy:
        return data
    buf = io.BytesIO()
    load_rgb(data).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_dali(split_dir: Path, sp: Split, o: dict[str, Any]) -> list[Path]:
    """WebDataset shards (<key>.jpg, <key>.cls; key = zero-padded sample index, members in a fixed random
    order) + DALI v1.2 index files.

    Old shards stay untouched until every new shard is written (a failed rebuild leaves them usable)."""
    wds = split_dir / "wds"
    wds.mkdir(parents=True, exist_ok=True)
    old_files = set(wds.glob("*.tar")) | set(wds.glob("*.idx"))
    n, size = len(sp.good), o["shard_size"]
    # Members in a fixed random order, not class-sorted: DALI's buffer shuffle (initial_fill) then mixes
    # classes on a large set too. Keys stay the sample indices, so readers lose nothing.
    order = np.random.default_rng(0).permutation(n)
    jobs = [(sp.good[j].abspath, sp.good[j].copy, o["jpeg_quality"]) for j in order]
    payloads = imap(wds_job, jobs, o["workers"], f"dali {sp.name}", o["progress"])
    written: list[tuple[Path, Path]] = []
    try:
        for shard, start in enumerate(range(0, n, size)):
            stop = min(n, start + size)
            tar_path = wds / f"{sp.name}-{shard:05d}.tar"
            idx_path = tar_path.with_suffix(".idx")
            written.append((tar_path, idx_path))
            lines: list[str] = []
            with (
                open(files.tmp(tar_path), "wb") as f,
                tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
            ):
                for i in (int(j) for j in order[start:stop]):
                    key = f"{i:08d}"
                    parts = []
                    for ext, data in (("jpg", next(payloads)), ("cls", str(sp.good[i].label).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 0, "", ""
                        tar.addfile(info, io.BytesIO(data))
                        data_off = tar.offset - ((len(data) + 511) // 512) * 512
                        parts.append(f"{ext} {data_off} {len(data)} {key}.{ext}")
                    lines.append(" ".join(parts))
            with open(files.tmp(idx_path), "w") as f:
                f.write(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
        files.commit(o, "dali")
        for tar_path, idx_path in written:
            files.replace(files.tmp(tar_path), tar_path)
            files.replace(files.tmp(idx_path), idx_path)
    finally:
        payloads.close()
    new = [p for pair in written for p in pair]
    for stale in old_files - set(new):  # shards of a larger previous conversion
        stale.unlink(missing_ok=True)
    return new
