"""FFCV .beton files: fields image (RGBImageField), label (IntField), index (IntField), one per split."""

from __future__ import annotations

import errno
import os
import queue
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fastvpd.convert import files
from fastvpd.convert.decode import load_rgb
from fastvpd.convert.scan import Source, Split


class FFCVSource:
    """Indexed dataset FFCV's writer workers read: (uint8 HWC RGB image, label, sample index)."""

    def __init__(self, sources: list[Source]) -> None:
        self.paths = [s.abspath for s in sources]
        self.labels = [s.label for s in sources]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return np.asarray(load_rgb(self.paths[i]), dtype=np.uint8), self.labels[i], i


def _worker_failed(msg: str, path: str, page: int) -> Exception:
    """A worker's death as an error: a full disk (its likeliest cause while writing) is an OSError."""
    try:
        if shutil.disk_usage(os.path.dirname(path)).free < page:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    except OSError:
        pass
    return RuntimeError(msg)


def _ffcv_writer_cls() -> type:
    """FFCV's DatasetWriter, with our progress bar and a check for dead workers (FFCV itself would wait
    forever for a worker that raised)."""
    from ffcv.writer import DatasetWriter  # under write_ffcv's torch_threads_kept

    class SafeDatasetWriter(DatasetWriter):
        progress: bool = True
        desc: str = "ffcv"

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):  # type: ignore[no-untyped-def]
            import ctypes
            from multiprocessing import Process, Queue, Value

            from ffcv.memory_allocator import MemoryAllocator

            self.num_samples = num_samples
            self.prepare()
            workqueue: Queue = Queue()
            for todo in queue_content:
                workqueue.put(todo)
            allocations_queue: Queue = Queue()
            for _ in range(self.num_workers):
                workqueue.put(None)
            done_number = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            worker_args = (
                workqueue,
                self.metadata_sm,
                self.metadata_type,
                self.fields,
                allocator,
                done_number,
                allocations_queue,
                *extra_worker_args,
            )
            processes = [Process(target=work_fn, args=worker_args) for _ in range(self.num_workers)]
            bar = tqdm(total=num_samples, desc=self.desc, unit="img", disable=not self.progress, leave=False)
            try:
                for p in processes:
                    p.start()
                previous = 0
                while True:
                    # exit states first, then the counter: when every worker has exited the count is final
                    dead = [p for p in processes if p.exitcode not in (None, 0)]
                    exited = all(p.exitcode is not None for p in processes)
                    val = done_number.value
                    if val > previous:
                        bar.update(val - previous)
                        previous = val
                    if previous == num_samples:
                        break
                    if dead or exited:
                        code = dead[0].exitcode if dead else 0
                        raise _worker_failed(
                            f"FFCV writer worker failed (exit code {code}) after {previous}/{num_samples} "
                            "samples",
                            self.fname,
                            self.page_size,
                        )
                    time.sleep(0.02)
                allocation_list = []
                for _ in processes:
                    while True:
                        try:
                            allocation_list.extend(allocations_queue.get(timeout=1.0))
                            break
                        except queue.Empty:
                            if any(p.exitcode not in (None, 0) for p in processes):
                                raise _worker_failed(
                                    "FFCV writer worker failed while finishing", self.fname, self.page_size
                                ) from None
                for p in processes:
                    p.join()
                self.finalize(allocation_list)
            finally:
                bar.close()
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                        p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return SafeDatasetWriter


def write_ffcv(split_dir: Path, sp: Split, o: dict[str, Any]) -> list[Path]:
    """<split>.beton of one split, under a temp name until complete.

    FFCV's import and its writer set torch's thread count (to 1): it is put back afterwards, else every
    later model step in this process (the demo) runs on one core.
    """
    from fastvpd.data import torch_threads_kept

    with torch_threads_kept():
        return _write_ffcv(split_dir, sp, o)


def _write_ffcv(split_dir: Path, sp: Split, o: dict[str, Any]) -> list[Path]:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE

    path = split_dir / f"{sp.name}.beton"
    fields = {
        "image": RGBImageField(
            write_mode=o["write_mode"], max_resolution=o["max_res"] or None, jpeg_quality=o["jpeg_quality"]
        ),
        "label": IntField(),
        "index": IntField(),
    }
    # FFCV pages must hold the largest sample; small sets get small pages so the file is not mostly padding
    longest = max(max(s.height, s.width) for s in sp.good)
    scale = min(1.0, o["max_res"] / longest) if o["max_res"] else 1.0
    biggest = max(s.height * s.width for s in sp.good) * 3 * scale * scale
    page = MIN_PAGE_SIZE if len(sp.good) < 5000 else 4 * MIN_PAGE_SIZE
    while page < biggest + (1 << 16):
        page *= 2
    workers = max(1, o["workers"])
    writer = _ffcv_writer_cls()(str(files.tmp(path)), fields, page_size=page, num_workers=workers)
    writer.progress, writer.desc = o["progress"], f"ffcv {sp.name}"
    writer.from_indexed_dataset(
        FFCVSource(sp.good), chunksize=max(1, min(100, len(sp.good) // o["workers"] or 1))
    )
    files.commit(o, "ffcv")
    files.replace(files.tmp(path), path)
    return [path]
