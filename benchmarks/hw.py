"""Hardware facts and utilisation sampling for the benchmarks.

Everything here degrades gracefully: psutil falls back to /proc/stat, NVML (nvidia-ml-py) is optional and a
missing GPU just yields empty GPU figures, so the benchmark never crashes for want of a sampler.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. The key is a
# lowercase substring of torch.cuda.get_device_name(); the first match wins, so the specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("a10g", 70.0),
    ("a10", 125.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("rtx 4090", 165.0),
    ("rtx 3090", 71.0),
    ("v100", 125.0),  # fp16 (V100 has no bf16 tensor cores)
    ("t4", 65.0),  # fp16
)

ROOT = Path(__file__).resolve().parents[1]


def peak_bf16_tflops(device_name: str) -> float | None:
    """Data-sheet dense bf16 peak for a known GPU name, else None (then measure it with a matmul)."""
    low = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in low:
            return tflops
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Achieved TFLOP/s of a large square matmul: the practical peak when the data sheet is unknown."""
    if device.type != "cuda":
        n = min(n, 1024)
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return 2.0 * n**3 * reps / dt / 1e12


def cpu_model() -> str:
    """CPU model string from /proc/cpuinfo (Linux) or platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware, so containers report their real share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def git_commit() -> str:
    """Short commit of the checkout (with '+dirty' when there are local changes), or 'unknown'.

    `FASTVPD_GIT_COMMIT` overrides it: a tree copied to a lent GPU machine can carry git metadata older than
    its files (the first H100 runs recorded a stale commit), so the caller names the commit it sent.
    """
    if os.environ.get("FASTVPD_GIT_COMMIT"):
        return os.environ["FASTVPD_GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _nvml() -> Any | None:
    """The initialised pynvml module (nvidia-ml-py), or None when absent or no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError_LibraryNotFound, driver not loaded...
        return None


def device_facts(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to place a number: device, software versions, CPU, commit and date."""
    facts: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "cpu_cores_total": os.cpu_count(),
        "device_type": device.type,
        "device_name": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "driver": None,
        "gpu_memory_gib": None,
    }
    try:
        import torchvision

        facts["torchvision"] = torchvision.__version__
    except ImportError:
        facts["torchvision"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        facts["gpu_sm_count"] = props.multi_processor_count
        facts["gpu_capability"] = f"{props.major}.{props.minor}"
        nv = _nvml()
        if nv is not None:
            try:
                drv = nv.nvmlSystemGetDriverVersion()
                facts["driver"] = drv.decode() if isinstance(drv, bytes) else drv
            except Exception:
                pass
    return facts


def device_slug(facts: dict[str, Any]) -> str:
    """Folder-safe short name of the measured device, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc'."""
    name = facts["device_name"] if facts["device_type"] == "cuda" else f"cpu-{facts['cpu_model']}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:48] or "device"


# ---------------------------------------------------------------------------------------------------------
# CPU utilisation


def _proc_stat() -> list[tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            vals = [int(v) for v in line.split()[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
            total = sum(vals[:8])  # guest time is already counted in user
            out.append((total - idle, total))
    return out


class CpuTimes:
    """Per-core busy fraction between `start()` and `stop()` (psutil when present, else /proc/stat)."""

    def __init__(self) -> None:
        try:
            import psutil

            self._psutil: Any = psutil
        except ImportError:
            self._psutil = None
        self._t0: Any = None
        self._proc0: Any = None

    def _snap(self) -> Any:
        if self._psutil is not None:
            return self._psutil.cpu_times(percpu=True)
        return _proc_stat()

    def start(self) -> None:
        self._t0 = self._snap()
        self._proc0 = os.times()
        self._wall0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        """Busy % per core, mean over the cores this process may use, and this process's own CPU seconds."""
        t1, proc1, wall = self._snap(), os.times(), time.perf_counter() - self._wall0
        per_core: list[float] = []
        if self._psutil is not None:
            for a, b in zip(self._t0, t1):
                busy0 = sum(a) - a.idle - getattr(a, "iowait", 0.0)
                busy1 = sum(b) - b.idle - getattr(b, "iowait", 0.0)
                dt = sum(b) - sum(a)
                per_core.append(100.0 * (busy1 - busy0) / dt if dt > 0 else 0.0)
        else:
            for (b0, t0), (b1, t1_) in zip(self._t0, t1):
                per_core.append(100.0 * (b1 - b0) / (t1_ - t0) if t1_ > t0 else 0.0)
        try:
            allowed = sorted(os.sched_getaffinity(0))
            mine = [per_core[i] for i in allowed if i < len(per_core)] or per_core
        except (AttributeError, OSError):
            mine = per_core
        proc_cpu = (proc1.user - self._proc0.user) + (proc1.system - self._proc0.system)
        proc_cpu += (proc1.children_user - self._proc0.children_user) + (
            proc1.children_system - self._proc0.children_system
        )
        return {
            "cpu_util_pct": round(statistics.fmean(mine), 1) if mine else None,
            "cpu_util_per_core_pct": [round(v, 1) for v in mine],
            "process_cpu_s": round(proc_cpu, 3),
            "wall_s": round(wall, 3),
        }


# ---------------------------------------------------------------------------------------------------------
# GPU sampling


@dataclass
class GpuSamples:
    """Raw NVML samples (one row per tick) and their summary."""

    sm_util: list[float] = field(default_factory=list)
    mem_util: list[float] = field(default_factory=list)
    mem_used_gib: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    sm_clock_mhz: list[float] = field(default_factory=list)
    mem_clock_mhz: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def stats(v: list[float]) -> dict[str, float] | None:
            if not v:
                return None
            return {"mean": round(statistics.fmean(v), 1), "max": round(max(v), 1), "min": round(min(v), 1)}

        return {
            "samples": len(self.sm_util),
            "sm_util_pct": stats(self.sm_util),
            "mem_bw_util_pct": stats(self.mem_util),
            "mem_used_gib": stats(self.mem_used_gib),
            "power_w": stats(self.power_w),
            "sm_clock_mhz": stats(self.sm_clock_mhz),
            "mem_clock_mhz": stats(self.mem_clock_mhz),
        }


class HwMonitor:
    """Context manager: CPU busy % over the block, plus NVML GPU samples from a background thread.

    `with HwMonitor(device) as hw: ...; hw.result` — the thread polls every `interval` s (NVML's utilisation
    counters are themselves averages over ~1/6 s to 1 s windows, so faster polling adds nothing).
    """

    def __init__(self, device: torch.device | None = None, interval: float = 0.1) -> None:
        self.device = device
        self.interval = interval
        self.cpu = CpuTimes()
        self.gpu = GpuSamples()
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: Any = None
        self._nv: Any = None
        if device is not None and device.type == "cuda":
            self._nv = _nvml()
            if self._nv is not None:
                try:
                    index = device.index if device.index is not None else torch.cuda.current_device()
                    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                    if visible and visible.split(",")[index].strip().isdigit():
                        index = int(visible.split(",")[index])
                    self._handle = self._nv.nvmlDeviceGetHandleByIndex(index)
                except Exception:
                    self._nv = None

    @property
    def nvml_available(self) -> bool:
        return self._handle is not None

    def _poll(self) -> None:
        nv, h = self._nv, self._handle
        while not self._stop.is_set():
            try:
                u = nv.nvmlDeviceGetUtilizationRates(h)
                m = nv.nvmlDeviceGetMemoryInfo(h)
                self.gpu.sm_util.append(float(u.gpu))
                self.gpu.mem_util.append(float(u.memory))
                self.gpu.mem_used_gib.append(m.used / 2**30)
                self.gpu.power_w.append(nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
                self.gpu.sm_clock_mhz.append(float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
                self.gpu.mem_clock_mhz.append(float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)))
            except Exception:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> HwMonitor:
        self.cpu.start()
        if self._handle is not None:
            self._thread = threading.Thread(target=self._poll, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.result = dict(self.cpu.stop())
        self.result["gpu"] = self.gpu.summary() if self._handle is not None else None
