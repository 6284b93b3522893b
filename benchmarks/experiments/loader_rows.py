"""Loader rows no GPU run has decided yet, built through the loaders' constructor hooks (no config key):
DALI with four pipelines side by side (DALILoader(pipelines=4): a quarter of every batch each), and the
views' pixel work by torch ops where the device default is the Triton kernels (`aug_kernel="torch"`)."""

from __future__ import annotations

from benchmarks.loaders import LoaderRow

TORCH_OPS = (("aug_kernel", "torch"),)

LOADER_ROWS: tuple[LoaderRow, ...] = (
    LoaderRow("dali_x4", "dali", hooks=(("pipelines", 4),), about="four DALI pipelines side by side"),
    LoaderRow("dali_torch", "dali", hooks=TORCH_OPS, gpu=True, about="the device finishing with torch ops"),
    LoaderRow("ffcv_torch", "ffcv", hooks=TORCH_OPS, gpu=True, about="the device finishing with torch ops"),
    LoaderRow("cache_torch", "cache", hooks=TORCH_OPS, gpu=True, about="the views by torch ops"),
    LoaderRow(
        "cache_graphed_torch",
        "cache",
        hooks=TORCH_OPS,
        graphed=True,
        gpu=True,
        e2e=False,
        about="the views by torch ops, replayed from one CUDA graph",
    ),
)
